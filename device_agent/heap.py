"""Keep a long-running agent's heap from growing each time ONNX Runtime's training stack is reopened.

`OrtTrainer.reset_optimizer` reopens ORT's training stack (checkpoint, module with its training and
eval sessions, optimizer: ORT's Python API cannot zero AdamW's moments in place), and since session
15 the coordinator asks for that reset every round. Python frees the old stack, but glibc raises its
mmap threshold whenever a large mmapped block is freed, so the next checkpoint-sized buffers land on
the heap instead, fragment it and are never returned: an agent on fedclip-tiny grew by 20-35 MB a
round (296 MiB peak after 5 rounds of ce-lora, 164 MiB with the threshold fixed:
benchmarks/results/agent_rounds_rss.md; 8 resets of the tiny bundle: +141 MB, fixed +5.5 MB).
Setting `M_MMAP_THRESHOLD` by hand keeps glibc's initial 128 KiB and turns the raising off
(mallopt(3)). glibc only: elsewhere (musl, macOS, Windows) nothing is done.
"""

from __future__ import annotations

import ctypes
import functools
import platform

M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
THRESHOLD = 128 * 1024  # glibc's initial value: blocks this large or larger are mmapped, and unmapped on free


@functools.cache
def fix_mmap_threshold() -> bool:
    """Once per process; True when glibc took the setting."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, THRESHOLD))  # the process's own libc
    except (OSError, AttributeError):
        return False
