"""Worker processes that snap rendered images (PUNKS_SNAP_PROCESSES), away from the GIL of the process whose
GPU thread must launch a graph replay every few milliseconds. Torch-free: a worker imports only this module,
the snapper (service/pixelart.py), numpy and Pillow."""

import ctypes
import ctypes.util
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
KEPT_HEAP_BYTES = 64 * 2**20  # larger than any array of a snap (a 512 px image in float64 is 6 MB)
PARENT_POLL_S = 1.0  # how often a worker checks that the serving process is still its parent


def start(count: int) -> ProcessPoolExecutor:
    """`count` processes, spawned (this process holds CUDA and threads: a fork would copy them half-made)."""
    return ProcessPoolExecutor(
        count, mp_context=multiprocessing.get_context("spawn"), initializer=_set_up, initargs=(os.getpid(),)
    )


def _set_up(parent: int) -> None:
    keep_freed_memory()
    threading.Thread(target=_exit_with_parent, args=(parent,), name="exit-with-parent", daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """End this worker once the serving process is gone without stopping it (killed, or a host such as Ray Serve
    that ends a replica without its shutdown): a worker holds its own task pipe open, so it would wait forever."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(0)


def keep_freed_memory() -> None:
    """Keep freed arrays in the heap for the next snap. In a fresh process glibc gives every freed block of more
    than 128 KB back to the OS at once, so each snap maps and page-faults its 1-6 MB arrays again: before this, a
    snap through a worker took 27.6 ms against 20.3 ms on the server's threads on the H200 host, far more than
    moving a 512 px image and its result costs (bench/results/2026-12-02-NVIDIA-H200.json, finish_snap_ms, call 4).
    With it, 30.4 ms in call 6, on a machine whose threads were not measured: its effect there is not isolated. A
    no-op where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, KEPT_HEAP_BYTES)
    mallopt(M_TRIM_THRESHOLD, 2 * KEPT_HEAP_BYTES)
