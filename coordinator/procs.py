"""Child processes that live and die together: the demo's coordinator and agents.

Each child starts in its own session (so its own process group): a Ctrl-C in the terminal reaches
only the parent, which then stops the children in order instead of letting them race on shutdown,
and a child's own children (if any) go down with it because the whole group is signalled.

On Linux each child also asks the kernel to send it SIGTERM when its parent dies
(PR_SET_PDEATHSIG), so even a `kill -9` of the parent leaves no orphans behind. That request is
made in a tiny exec shim rather than in `preexec_fn`, which is unsafe while the parent runs threads
(the embedded broker is one).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from fedclip.sdk.errors import FedclipError

log = logging.getLogger(__name__)

# Runs in the child before exec: arm the parent-death signal, then make sure the parent did not
# die between fork and prctl (the signal would then never come).
_PDEATHSIG_SHIM = (
    "import ctypes,os,signal,sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(143)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


class ChildFailed(FedclipError):
    """A child process the demo depends on exited unexpectedly."""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log_path: Path | None
    out_path: Path | None = None
    stopped: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, lines: int = 15) -> str:
        """The end of the child's log, for error messages that say why it died."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


@dataclass
class ProcessGroup:
    """Starts children in their own process groups and stops every one of them on exit.

    Use as a context manager; `stop_all` runs on normal exit, on exceptions and on Ctrl-C.
    """

    log_dir: Path | None = None
    env: dict[str, str] | None = None
    children: list[Child] = field(default_factory=list)

    def spawn(self, name: str, argv: Sequence[str], capture: bool = False) -> Child:
        """Start `argv` in its own session; stderr (and stdout unless `capture`) go to LOG_DIR/NAME.log."""
        argv = [str(a) for a in argv]
        if sys.platform.startswith("linux"):
            argv = [sys.executable, "-c", _PDEATHSIG_SHIM, str(os.getpid()), *argv]
        log_path = out_path = None
        err: int | IO[bytes] = subprocess.DEVNULL
        out: int | IO[bytes] = subprocess.DEVNULL
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_path = self.log_dir / f"{name}.log"
            err = out = open(log_path, "wb")  # noqa: SIM115 - the child owns it; closed below
            if capture:
                out_path = self.log_dir / f"{name}.out"
                out = open(out_path, "wb")  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=self.env,
                start_new_session=True,
            )
        except OSError as e:
            raise ChildFailed(f"cannot start {name} ({argv[0]}): {e.strerror or e}") from None
        finally:
            for f in {id(out): out, id(err): err}.values():
                if hasattr(f, "close"):
                    f.close()
        child = Child(name, proc, log_path, out_path)
        self.children.append(child)
        log.debug("started %s pid %d", name, proc.pid)
        return child

    def run(self, name: str, argv: Sequence[str], timeout_s: float, capture: bool = False) -> str:
        """Run a short-lived child to completion; its stdout when `capture`, ChildFailed on failure."""
        # A child that overstays gets the group's graceful stop (SIGTERM, then SIGKILL).
        return procs_wait(self.spawn(name, argv, capture=capture), timeout_s, on_timeout=self.stop)

    def stop(self, child: Child, grace_s: float = 5.0) -> None:
        """Stop one child (and its group) now."""
        _signal_group(child.proc, signal.SIGTERM)
        try:
            child.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(child.proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(timeout=5.0)
        _signal_group(child.proc, signal.SIGKILL)
        child.stopped = True

    def check(self, allow_exit: Sequence[str] = ()) -> None:
        """Raise if a child other than those in `allow_exit` has exited."""
        for c in self.children:
            if c.stopped or c.name in allow_exit:
                continue
            rc = c.proc.poll()
            if rc is not None:
                tail = c.tail()
                raise ChildFailed(
                    f"{c.name} exited with code {rc}" + (f" (log: {c.log_path})\n{tail}" if tail else "")
                )

    def stop_all(self, grace_s: float = 5.0) -> None:
        """SIGTERM every live group, wait up to `grace_s`, then SIGKILL what is left."""
        live = [c for c in self.children if not c.stopped]
        for c in live:
            _signal_group(c.proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for c in live:
            try:
                c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM; killing it", c.name, c.pid)
                _signal_group(c.proc, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    c.proc.wait(timeout=5.0)
            # The group may still hold grandchildren after the leader exited.
            _signal_group(c.proc, signal.SIGKILL)
            c.stopped = True

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        # A second Ctrl-C while stopping must not leave children behind.
        with deferred_interrupts():
            self.stop_all()


def procs_wait(child: Child, timeout_s: float, on_timeout: Callable[[Child], None] | None = None) -> str:
    """Wait for a short-lived child; its captured stdout, or ChildFailed on failure or timeout.

    On timeout the child's group is killed, or handed to `on_timeout` (e.g. a graceful stop).
    """
    try:
        rc = child.proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        if on_timeout is not None:
            on_timeout(child)
        else:
            _signal_group(child.proc, signal.SIGKILL)
            child.proc.wait(timeout=5.0)
        child.stopped = True
        raise ChildFailed(
            f"{child.name} did not finish within {timeout_s:g}s (log: {child.log_path})"
        ) from None
    child.stopped = True
    if rc != 0:
        tail = child.tail()
        raise ChildFailed(
            f"{child.name} failed with exit code {rc}" + (f" (log: {child.log_path})\n{tail}" if tail else "")
        )
    if child.out_path is not None:
        return child.out_path.read_text(errors="replace")
    return ""


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    # The child is its own group leader (start_new_session), so its pid is the group id; once it
    # has been reaped that id may be reused, so only signal groups whose leader we have not reaped
    # or that still exist as our session.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if proc.returncode is None or sig == signal.SIGKILL and _group_alive(proc.pid):
            os.killpg(proc.pid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


@contextlib.contextmanager
def _signals_handled(sigs: list[signal.Signals], handler: Callable[[int, object], None]) -> Iterator[None]:
    """`handler` for `sigs` inside the block, the old handlers after; nothing outside the main thread
    (only it may set handlers)."""
    try:
        old = {s: signal.signal(s, handler) for s in sigs}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def deferred_interrupts() -> contextlib.AbstractContextManager[None]:
    """Ignore further SIGINT/SIGTERM while cleaning up: we are already on the way out."""

    def _hold(signum: int, _frame: object) -> None:
        log.warning("%s received while stopping children; still stopping", signal.Signals(signum).name)

    return _signals_handled([signal.SIGINT, signal.SIGTERM], _hold)


def sigterm_as_interrupt() -> contextlib.AbstractContextManager[None]:
    """Treat SIGTERM and SIGHUP like Ctrl-C so one cleanup path serves all three."""

    def _raise(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    return _signals_handled([signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else []), _raise)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def wait_port_free(port: int, host: str = "127.0.0.1", timeout_s: float = 10.0) -> bool:
    """Wait until nothing listens on `port`; False if it is still taken after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        if port_is_free(port, host):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def wait_port_open(port: int, host: str = "127.0.0.1", timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return True
        time.sleep(0.1)
    return False
