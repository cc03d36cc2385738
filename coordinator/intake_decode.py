"""Update payloads decoded, their signatures checked and, when they may be accepted as sent, stored,
in worker processes ahead of the round loop.

Of the ~0.6 ms of coordinator CPU an update cost at fleet rate, a third was `wire.decode` (inflate,
safetensors, finite check, sha256) and the Ed25519 check of its signature, a sixth re-encoding the
stored blob, and the loop then waited on the batch's fsyncs: work that needs nothing of the round but
its number. The round loop's one Python thread was the limit (benchmarks/results/scale.md, "Intake"),
so that work goes to `workers` processes here: the loop takes a batch of queued messages, hands its
updates' payloads (and each sender's enrolled key, looked up by the loop) to the pool, split in
order, and handles the batch before while the pool works (`group_commit`). What comes back
(`Decoded`) is only ever used as `decode` and `verify_message` would have answered in the loop: the
same message, the same one-line errors, in the same order of checks (`UpdateIntake.stage`,
`Trust.check`); an update's blob stored ahead (durable before the answer) is the one the loop would
store (`update_blob`), and is kept only when the loop accepts that update as it was sent. Validation
against the round, the rows and the acknowledgements stay in the loop.

The pool starts with the first batch of at least `min_batch` updates (a trickle never starts it).
Its processes are spawned (the loop has threads: no fork of it), as the coordinator's own children
that the kernel kills when the coordinator dies, however it dies (PR_SET_PDEATHSIG on Linux; a
`forkserver` pool outlived a kill -9 of its coordinator). A pool that breaks (a worker killed) is
logged and dropped: that batch decodes in the loop, and the next one starts a new pool.
"""

from __future__ import annotations

import ctypes
import logging
import math
import multiprocessing
import os
import signal
import sys
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedclip.coordinator.store.blobs import Blobs
from fedclip.sdk.adapters import check_tensors, encode_tensors
from fedclip.sdk.errors import AdapterError, WireError
from fedclip.sdk.manifest import TensorSpec
from fedclip.sdk.signing import verify_message
from fedclip.sdk.wire import Message, MsgType, decode

log = logging.getLogger("fedclip.coordinator")

MIN_BATCH = 16  # updates in a batch before the pool is worth its hand-off (and its start)
Pending = list[Future[list["Decoded"]]]  # one per worker's share of a batch


@dataclass(frozen=True)
class Job:
    """One update to decode: its payload, the `where` of its errors, and the raw Ed25519 key of the
    agent its topic names (b"": none enrolled, or an unprovisioned fleet: no signature check)."""

    payload: bytes
    where: str
    key: bytes = b""
    signer: str = ""


@dataclass(frozen=True)
class Batch:
    """What a batch's jobs share: the fleet, the payload limit, and for storing ahead (`blobs` set)
    the blob folder, the round open now, the bundle's exchanged tensors and whether the fleet is
    provisioned (signed updates only)."""

    fleet: str
    max_bytes: int
    blobs: str = ""
    round: int = -1
    specs: tuple[TensorSpec, ...] = ()
    provisioned: bool = True


@dataclass(frozen=True)
class Decoded:
    """What `decode` made of a payload (`msg`, or its one-line `error`), and, when a key was given,
    what checking the signature with it said (`verify_error`, "" when it verified). `msg` None with
    no `error`: decoding failed in a way only the loop reports (it decodes that one itself).
    `blob`: the sha of the update's stored form (`update_blob`), already durable in the blob folder."""

    msg: Message | None
    error: str = ""
    key: bytes = b""
    verify_error: str = ""
    blob: str = ""

    def __reduce__(self):
        # Back from a worker as one buffer of tensor bytes: pickling each array of a message (50+ at
        # ViT-B-32 shapes) cost the worker and the loop more than decoding them did.
        if self.msg is None:
            return (Decoded, (None, self.error, self.key, self.verify_error, self.blob))
        env, digest, tensors = self.msg.envelope, self.msg.digest, self.msg.tensors
        heads = [(name, arr.dtype.str, arr.shape) for name, arr in tensors.items()]
        data = b"".join(np.ascontiguousarray(arr).tobytes() for arr in tensors.values())
        return (_unpacked, (env, digest, heads, data, self.key, self.verify_error, self.blob))


_DTYPES: dict[str, np.dtype] = {}


def _unpacked(env, digest, heads, data, key, verify_error, blob) -> Decoded:
    buf, tensors, at = bytearray(data), {}, 0  # a bytearray: the views are writable, as decode's
    for name, dtype, shape in heads:
        dt = _DTYPES.get(dtype) or _DTYPES.setdefault(dtype, np.dtype(dtype))
        count = math.prod(shape)
        tensors[name] = np.frombuffer(buf, dt, count, at).reshape(shape)
        at += count * dt.itemsize
    return Decoded(Message(env, tensors, digest), "", key, verify_error, blob)


def update_blob(
    tensors: dict[str, np.ndarray], stats: dict[str, np.ndarray], agent: str, round_id: int
) -> bytes:
    """An accepted update as the store keeps it: its tensors and statistics (float32) in one
    safetensors file; the round loop and the workers make it alike, byte for byte."""
    return encode_tensors({**tensors, **stats}, {"agent": agent, "round": str(round_id)})


def decode_job(job: Job, batch: Batch) -> Decoded:
    """`decode` and, with a key, `verify_message`, as the round loop would call them."""
    try:
        msg = decode(
            job.payload, fleet=batch.fleet, expect=MsgType.UPDATE, max_bytes=batch.max_bytes, where=job.where
        )
    except WireError as e:
        return Decoded(None, str(e))
    except Exception:  # a shape no check foresaw: the loop decodes it again and words the rejection
        return Decoded(None)
    if not job.key:
        return Decoded(msg)
    try:
        verify_message(_public_key(job.key), msg, job.where, signer=job.signer)
    except WireError as e:
        return Decoded(msg, key=job.key, verify_error=str(e))
    except Exception:
        return Decoded(msg)  # not checked here: the loop checks it
    return Decoded(msg, key=job.key)


def _storable(d: Decoded, batch: Batch) -> bytes | None:
    try:
        return _stored_form(d, batch)
    except Exception:  # one payload's surprise must not fail its batch: the loop stores that one
        return None


def _stored_form(d: Decoded, batch: Batch) -> bytes | None:
    """The stored form of a decoded update worth writing ahead: signed by its enrolled key (any
    sender in an unprovisioned fleet), for the open round, its tensors those of the bundle, its
    statistics floats. What the loop then refuses for another reason (not selected, its norm, a
    second update) stays an orphan blob, as a conflicting update's always did."""
    msg = d.msg
    if (
        msg is None
        or d.verify_error
        or (batch.provisioned and not d.key)
        or msg.envelope.round != batch.round
    ):
        return None
    try:
        tensors = check_tensors(msg.adapter_tensors, batch.specs, "ahead", finite_checked=True)
    except AdapterError:
        return None
    stats = msg.stats
    if any(np.asarray(v).dtype.kind != "f" for v in stats.values()):
        return None
    as_f32 = {k: np.asarray(v).astype(np.float32) for k, v in stats.items()}
    return update_blob(tensors, as_f32, msg.envelope.agent, msg.envelope.round)


_KEYS: dict[bytes, Ed25519PublicKey] = {}  # per worker: a fleet's keys, parsed once each


def _public_key(raw: bytes) -> Ed25519PublicKey:
    key = _KEYS.get(raw)
    if key is None:
        if len(_KEYS) > 100_000:
            _KEYS.clear()
        key = _KEYS[raw] = Ed25519PublicKey.from_public_bytes(raw)
    return key


def _decode_all(jobs: Sequence[Job], batch: Batch) -> list[Decoded]:
    """The worker's task: every job decoded; with `batch.blobs`, the storable ones written, durably,
    together (`Blobs.put_many`) before the answer goes back, so the loop may commit their rows."""
    out = [decode_job(job, batch) for job in jobs]
    if not batch.blobs:
        return out
    ahead = [(i, blob) for i, d in enumerate(out) if (blob := _storable(d, batch)) is not None]
    shas = Blobs(Path(batch.blobs)).put_many([blob for _, blob in ahead]) if ahead else []
    for (i, _), sha in zip(ahead, shas, strict=True):
        out[i] = replace(out[i], blob=sha)
    return out


def _bound_to(parent: int) -> None:
    """A worker's initializer: die with the coordinator (the spawning thread is its round loop,
    which lives as long as it does)."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # it died before the request was made
            os._exit(1)


def default_workers() -> int:
    """As many workers as CPUs (the loop mostly waits for them), up to 4; none on one CPU."""
    cpus = os.cpu_count() or 1
    return min(cpus, 4) if cpus >= 2 else 0


class DecodePool:
    """`submit(jobs)`: a future of their `Decoded`, in order, or None when they are better decoded in
    the loop (no workers, a small batch, a broken pool)."""

    def __init__(self, workers: int, min_batch: int = MIN_BATCH):
        self.workers, self.min_batch = workers, min_batch
        self._pool: ProcessPoolExecutor | None = None

    def submit(self, jobs: Sequence[Job], batch: Batch) -> Pending | None:
        """Start decoding `jobs`, split in order over the workers; None: decode them in the loop."""
        if self.workers < 1 or len(jobs) < self.min_batch:
            return None
        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=ctx, initializer=_bound_to, initargs=(os.getpid(),)
            )
            log.info("intake: decoding and signature checks in %d worker process(es)", self.workers)
        step = -(-len(jobs) // self.workers)
        try:
            return [
                self._pool.submit(_decode_all, list(jobs[i : i + step]), batch)
                for i in range(0, len(jobs), step)
            ]
        except (BrokenProcessPool, RuntimeError) as e:
            self._broken(e)
            return None

    def result(self, pending: Pending | None) -> list[Decoded] | None:
        """What `submit` started, in order; None (decode in the loop) when nothing was started or the
        pool broke."""
        if pending is None:
            return None
        try:
            return [d for future in pending for d in future.result()]
        except BrokenProcessPool as e:
            self._broken(e)
            return None

    def _broken(self, e: BaseException) -> None:
        log.warning("intake: the decode worker pool broke (%s); decoding in the round loop", e)
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
