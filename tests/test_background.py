"""The export's forked worker (`exporters.background`): its value, its errors (one clear line, the
same class where it is an ExportError), a worker that dies, a worker cancelled, its phases joining
the export's record, inline where forking is not safe; and torch in the worker after the parent ran
a parallel op (an OpenMP pool does not survive a fork: without the worker's single thread this hangs,
so it runs in a subprocess with a deadline)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from fedclip.exporters import background
from fedclip.exporters.background import Background
from fedclip.exporters.phases import Phases, phase, recording
from fedclip.sdk.errors import ExportError


@pytest.fixture(autouse=True)
def _forking(monkeypatch):
    monkeypatch.delenv(background.ENV, raising=False)
    if not background.can_fork():
        pytest.skip("this process cannot fork safely (one CPU, or other threads running)")


def test_the_value_comes_from_another_process():
    job = Background(lambda: (os.getpid(), b"\x00graph" * 1000), "tracing")
    assert job.forked
    pid, data = job.result()
    assert pid != os.getpid() and data == b"\x00graph" * 1000


def _raise_export_error():
    raise ExportError("step_model.onnx: cannot export the training step: boom")


def _raise_other():
    raise ValueError("bad shape\nsecond line")


def test_errors_come_back_as_one_line_export_errors():
    with pytest.raises(ExportError, match="^step_model.onnx: cannot export the training step: boom$"):
        Background(_raise_export_error, "tracing").result()
    with pytest.raises(ExportError, match="^ValueError: bad shape$"):
        Background(_raise_other, "tracing").result()


def test_a_worker_that_dies_is_an_export_error():
    with pytest.raises(
        ExportError, match="tracing the step graphs: the export's worker process died \\(signal 9\\)"
    ):
        Background(lambda: os.kill(os.getpid(), 9), "tracing the step graphs").result()


def test_cancel_stops_a_worker_no_one_waits_for():
    job = Background(lambda: time.sleep(60), "tracing")
    pid = job._pid
    started = time.monotonic()
    job.cancel()
    assert time.monotonic() - started < 10
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped, not a zombie
    job.cancel()  # twice is harmless


def test_the_workers_phases_join_the_exports_record():
    def work():
        with phase("step_model.onnx: tracing (make_fx)"):
            return 42

    phases = Phases(on_phase=lambda name, depth: None)
    with recording(phases):
        with phase("building"):
            pass
        assert Background(work, "tracing the step graphs").result() == 42
    names = [(r.name, r.depth, r.forked) for r in phases.records]
    assert names == [
        ("building", 0, False),
        ("step_model.onnx: tracing (make_fx)", 1, True),
        ("tracing the step graphs", 0, True),
    ]


def test_inline_when_disabled_or_other_threads_run(monkeypatch):
    monkeypatch.setenv(background.ENV, "0")
    job = Background(os.getpid, "tracing")
    assert not job.forked and job.result() == os.getpid()
    monkeypatch.delenv(background.ENV)
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        job = Background(os.getpid, "tracing")
        assert not job.forked and job.result() == os.getpid()
    finally:
        stop.set()
        t.join()


_OPENMP = """
import torch
from fedclip.exporters.background import Background
torch.set_num_threads(2)
a = torch.randn(1500, 1500)
for _ in range(3):
    a @ a  # the parent's OpenMP pool is up
def work():
    b = torch.randn(1500, 1500)
    return (b @ b).sum().item(), torch.get_num_threads()
job = Background(work, "t")
assert job.forked
value, threads = job.result()
print("ok", threads)
"""


def test_torch_in_the_worker_after_a_parallel_op_in_the_parent():
    env = dict(os.environ)
    env.pop(background.ENV, None)
    # its own process group: a hung worker is killed with its parent, not left spinning
    proc = subprocess.Popen(
        [sys.executable, "-c", _OPENMP],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the worker hung in its first parallel torch op")
    assert proc.returncode == 0, err[-2000:]
    assert out.split() == ["ok", "1"]


def test_the_parent_leaves_the_worker_a_core_and_takes_it_back():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        job = Background(lambda: 1, "tracing")
        with job.leaving_a_core():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        assert job.result() == 1
        inline = Background.__new__(Background)  # a job that did not fork leaves the threads alone
        inline._pid = None
        with inline.leaving_a_core():
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_collector_sees_everything_again_after_a_fork():
    import gc

    Background(lambda: 1, "tracing").result()
    assert gc.get_freeze_count() == 0
