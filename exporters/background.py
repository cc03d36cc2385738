"""One piece of an export run in a forked child while the export goes on, on another core.

Why: tracing the step graphs is one Python thread's work (make_fx, translation, optimizer), and so is
exporting the inference graph and text encoder; neither needs the other, so on a machine of two or
more cores they overlap (fedclip-tiny: 0.3 s of a 4 s export; ViT-B-32: the inference export's tens
of seconds). The child inherits the built model (copy-on-write), returns plain bytes through a pipe
and exits; its phases join the export's record.

When it forks: only where `os.fork` exists, the process runs one Python thread (a fork copies no
other thread, and a lock one of them held would stay held in the child), more than one CPU is
usable, and $FEDCLIP_EXPORT_PARALLEL is not 0. Otherwise the function runs inline, in `result()`.
The child runs torch single-threaded: an OpenMP pool the parent started does not survive a fork,
and the child's first parallel region would wait on it forever.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import os
import pickle
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from fedclip.exporters import phases as _phases
from fedclip.sdk.errors import ExportError

ENV = "FEDCLIP_EXPORT_PARALLEL"


def can_fork() -> bool:
    if os.environ.get(ENV, "1").strip() == "0" or not hasattr(os, "fork"):
        return False
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return cpus > 1 and threading.active_count() == 1


class Background:
    """`fn()` in a forked child (or inline, see the module's docstring); `result()` its value."""

    def __init__(self, fn: Callable[[], Any], what: str):
        self._fn, self._what = fn, what
        self._pid: int | None = None
        self._read: int | None = None
        if not can_fork():
            return
        read, write = os.pipe()
        # The objects alive now out of the collector's sight in the child: a collection there would
        # write to every one of them and copy each page the two processes share.
        gc.freeze()
        pid = os.fork()
        if pid == 0:  # the child: never returns into the caller's code
            os.close(read)
            _child(fn, what, write)
        gc.unfreeze()
        os.close(write)
        self._pid, self._read = pid, read

    @property
    def forked(self) -> bool:
        return self._pid is not None

    def result(self) -> Any:
        if self._pid is None or self._read is None:
            return self._fn()
        with os.fdopen(self._read, "rb") as f:
            data = f.read()
        self._read = None
        _, status = os.waitpid(self._pid, 0)
        self._pid = None
        if not data:
            raise ExportError(f"{self._what}: the export's worker process died ({_status(status)})")
        kind, value, records = pickle.loads(data)
        recorder = _phases._current
        if recorder is not None:
            recorder.records.extend(dataclasses.replace(r, forked=True) for r in records)
        if kind == "error":
            raise value
        return value

    @contextlib.contextmanager
    def leaving_a_core(self) -> Iterator[None]:
        """torch in this process on one thread fewer meanwhile, while the child runs: an OpenMP team
        as wide as the machine spins between its parallel regions on the core the child traces on
        (fedclip-tiny: the inference export took 2x, the trace 1.1x, and the overlap gained nothing)."""
        if self._pid is None:
            yield
            return
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, threads - 1))
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def cancel(self) -> None:
        """Stop the child if its result will not be asked for (the export failed meanwhile)."""
        if self._pid is None:
            return
        with contextlib.suppress(OSError):
            os.kill(self._pid, 9)
        with contextlib.suppress(OSError):
            os.waitpid(self._pid, 0)
        if self._read is not None:
            with contextlib.suppress(OSError):
                os.close(self._read)
        self._pid = self._read = None


def _status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit status {os.WEXITSTATUS(status)}"


def _child(fn: Callable[[], Any], what: str, write: int) -> None:
    code = 0
    try:
        import torch

        torch.set_num_threads(1)
        # The parent's console (its progress bar, its stderr) is not the child's to write to.
        sys.stdout = sys.stderr = io.StringIO()
        recorder = _phases._current
        before = len(recorder.records) if recorder is not None else 0
        if recorder is not None:
            recorder.on_phase = None
        try:
            with _phases.phase(what):
                payload: tuple = ("ok", fn())
        except ExportError as e:
            payload = ("error", e)
        except BaseException as e:  # noqa: BLE001  (anything the trace raises, told to the parent)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            payload = ("error", ExportError(f"{type(e).__name__}: {first}"))
        records = recorder.records[before:] if recorder is not None else []
        try:
            data = pickle.dumps((*payload, records))
        except Exception as e:  # noqa: BLE001  (an unpicklable error: its text)
            data = pickle.dumps(("error", ExportError(f"{type(e).__name__}: {e}"), records))
        with os.fdopen(write, "wb") as f:
            f.write(data)
    except BaseException:  # noqa: BLE001  (nothing escapes into the parent's code)
        code = 1
    finally:
        os._exit(code)
