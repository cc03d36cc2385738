"""What signing costs: Ed25519 over the canonical envelope + tensors' sha256, per message, against
the unsigned path, in one run (issue 12's report, `results/security.md`, signing section).

For each message kind (a status, an ack, a tri-lora update and a LoRA update at ViT-B-32 width) it
times encode (build + serialize) and decode (parse + validate) with and without the signature, over
`--repeat` rounds, and reports the median and the bytes the signature adds. Pure CPU, no broker.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from fedclip.sdk import messages as m
from fedclip.sdk.signing import generate_key

RESULTS = Path(__file__).resolve().parent / "results"
FLEET, AGENT = "fleet", "cam-0001"
WIDTH, RANK, LAYERS = 768, 4, 12  # ViT-B-32's vision width; q and v of every block, both towers


def adapters(kind: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for tower in ("visual", "text"):
        for layer in range(LAYERS):
            for proj in ("q_proj", "v_proj"):
                name = f"{tower}.transformer.resblocks.{layer}.attn.{proj}"
                if kind == "tri-lora":
                    out[f"{name}.lora_C"] = rng.standard_normal((RANK, RANK)).astype(np.float32)
                else:
                    out[f"{name}.lora_A"] = rng.standard_normal((RANK, WIDTH)).astype(np.float32)
                    out[f"{name}.lora_B"] = rng.standard_normal((WIDTH, RANK)).astype(np.float32)
    return out


def samples() -> dict[str, m.WireBody]:
    hist = {"stats/label_hist": np.full(10, 30, np.float32)}
    return {
        "status": m.AgentStatus(
            "online", "b" * 64, "g-r3", 3, {"fedclip": "0.1.0"}, {"kind": "cpu"}, ("s1",), 300
        ),
        "ack": m.Ack(
            7, "installed", "g-r3", new=m.AckMetrics(0.9, 0.3, 60), current=m.AckMetrics(0.8, 0.5, 60)
        ),
        "update tri-lora": m.Update(
            3, "b" * 64, 300, "g-r2", {"loss_after": 0.3}, 1.5, 0, "d" * 64, adapters("tri-lora"), hist
        ),
        "update lora": m.Update(
            3, "b" * 64, 300, "g-r2", {"loss_after": 0.3}, 1.5, 0, "d" * 64, adapters("lora"), hist
        ),
    }


def median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=200)
    args = ap.parse_args()
    key = generate_key()
    rows = []
    for name, obj in samples().items():
        rows.append(measure(name, obj, key, args.repeat))
        print(json.dumps(rows[-1]))
    write_report(rows, args.repeat)


def measure(name: str, obj: m.WireBody, key, repeat: int) -> dict:
    cls, pub = type(obj), key.public_key()
    plain = m.encode(obj, FLEET, AGENT)
    signed = m.encode(obj, FLEET, AGENT, key=key)
    return {
        "message": name,
        "bytes_unsigned": len(plain),
        "bytes_signed": len(signed),
        "encode_ms": median_ms(lambda: m.encode(obj, FLEET, AGENT), repeat),
        "encode_signed_ms": median_ms(lambda: m.encode(obj, FLEET, AGENT, key=key), repeat),
        "decode_ms": median_ms(lambda: m.decode(cls, plain, fleet=FLEET, agent=AGENT), repeat),
        "decode_verified_ms": median_ms(
            lambda: m.decode(cls, signed, fleet=FLEET, agent=AGENT, public_key=pub), repeat
        ),
    }


def write_report(rows: list[dict], repeat: int) -> None:
    report = {
        "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "python": platform.python_version()},
        "repeat": repeat,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "security_signing.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "| message | bytes unsigned | bytes signed | + bytes | encode ms | signed ms | x "
        "| decode ms | verified ms | x |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['message']} | {r['bytes_unsigned']:,} | {r['bytes_signed']:,} | "
            f"{r['bytes_signed'] - r['bytes_unsigned']} | {r['encode_ms']:.3f} | "
            f"{r['encode_signed_ms']:.3f} | "
            f"{r['encode_signed_ms'] / r['encode_ms']:.2f} | {r['decode_ms']:.3f} | "
            f"{r['decode_verified_ms']:.3f} | {r['decode_verified_ms'] / r['decode_ms']:.2f} |"
        )
    (RESULTS / "security_signing.md").write_text(
        f"Median of {repeat} runs; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores.\n\n"
        + "\n".join(lines)
        + "\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
