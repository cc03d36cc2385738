"""Generated hostile payloads for the fuzz tests: what an attacker with broker access can send.

`hostile_payloads(valid, n, seed)` yields `(kind, payload)` pairs built from a list of valid payloads
(real messages of the fleet, signed by their real senders): random bytes, truncations, bit flips,
valid JSON envelopes with huge integers, NaN, wrong types, deep nesting or unknown fields, forged
signatures, and exact replays. Deterministic for a seed, bounded in count and size.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence

from fedclip.sdk.wire import COMPRESSED_MAGIC

HUGE_INTS = (2**63, 2**64 + 1, -(2**63) - 1, 10**30)
WRONG_VALUES = (None, True, "x" * 300, [1, 2], {"a": {"b": 1}}, 1.5, -1, float("inf"))
KINDS = (
    "random",
    "truncated",
    "bitflip",
    "huge-int",
    "wrong-type",
    "nan",
    "deep-json",
    "extra-field",
    "forged-signature",
    "replay",
    "compressed-junk",
)


def _json_header(payload: bytes) -> dict | None:
    if payload[:1] != b"{":
        return None
    try:
        header = json.loads(payload)
    except ValueError:
        return None
    return header if isinstance(header, dict) else None


def _mutate_header(rng: random.Random, header: dict, kind: str) -> bytes:
    h = json.loads(json.dumps(header))
    body = h.setdefault("body", {})
    targets = [("env", k) for k in ("round", "agent", "fleet", "sent_at", "schema", "type")]
    targets += [("body", k) for k in body] or [("body", "state")]
    where, key = rng.choice(targets)
    obj = h if where == "env" else body
    if kind == "huge-int":
        obj[key] = rng.choice(HUGE_INTS)
    elif kind == "wrong-type":
        obj[key] = rng.choice(WRONG_VALUES)
    elif kind == "nan":
        obj[key] = float("nan")
    elif kind == "extra-field":
        body["x" + str(rng.randrange(1000))] = 1
    elif kind == "forged-signature":
        body["signature"] = "A" * 86 + "=="
        obj[key] = obj.get(key)  # unchanged envelope, wrong signature
    return json.dumps(h).encode()  # Python's json writes NaN and Infinity, as a hostile sender may


def _deep(depth: int) -> bytes:
    return b'{"schema": 1, "type": "status", "body": ' + b"[" * depth + b"]" * depth + b"}"


def hostile_payloads(valid: Sequence[bytes], n: int, seed: int = 0) -> Iterator[tuple[str, bytes]]:
    """`n` hostile payloads derived from `valid` (at least one valid payload)."""
    rng = random.Random(seed)
    json_valid = [p for p in valid if _json_header(p) is not None]
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        base = rng.choice(valid)
        if kind == "random":
            yield kind, rng.randbytes(rng.randrange(1, 2048))
        elif kind == "truncated":
            yield kind, base[: rng.randrange(1, max(2, len(base)))]
        elif kind == "bitflip":
            data = bytearray(base)
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            yield kind, bytes(data)
        elif kind == "deep-json":
            yield kind, _deep(rng.choice((100, 10_000, 100_000)))
        elif kind == "replay":
            yield kind, base
        elif kind == "compressed-junk":
            yield kind, COMPRESSED_MAGIC + rng.randbytes(rng.randrange(1, 512))
        elif json_valid:
            header = _json_header(rng.choice(json_valid))
            assert header is not None
            yield kind, _mutate_header(rng, header, kind)
        else:
            yield "random", rng.randbytes(64)
