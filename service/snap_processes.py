"""Where the engine's snaps run (Snapper): on the calling thread, or in worker processes (PUNKS_SNAP_PROCESSES),
away from the GIL of the process whose GPU thread must launch a graph replay every few milliseconds. Torch-free: a
worker imports only this module, the snapper (service/pixelart.py), numpy and Pillow."""

import ctypes
import ctypes.util
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from functools import partial

from PIL import Image

from service.pixelart import PixelArt, to_pixel_art
from service.sprite_controls import KEEP

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
KEPT_HEAP_BYTES = 64 * 2**20  # larger than any array of a snap (a 512 px image in float64 is 6 MB)
PARENT_POLL_S = 1.0  # how often a worker checks that the serving process is still its parent


class Snapper:
    """Snaps an engine's raw generations to the grid. With worker processes, a snap goes to one only while a render
    (`rendering`) or another snap runs in this process: the GIL they would share is what workers are for. A lone
    image snaps on the calling thread, where it waits for no hand-off (batch-1 p50 0.228 s snapping in workers,
    0.2075 s on threads, on an H200: bench/results/2026-12-02-NVIDIA-H200.json)."""

    def __init__(self, grid: int, max_colors: int | None, process_count: int = 0):
        self.grid = grid
        self.max_colors = max_colors
        self.process_count = process_count
        self.processes = start(process_count) if process_count else None
        self._running = _Running()  # renders and in-process snaps now

    @contextmanager
    def rendering(self) -> Iterator[None]:
        """Count a render as running, for the time of the `with`: snaps meanwhile go to the workers."""
        self._running.join()
        try:
            yield
        finally:
            self._running.leave()

    def snap(
        self,
        raw: Image.Image,
        size: int,
        integer_scale: bool,
        palette: tuple[str, ...] | None = None,
        background: str = KEEP,
    ) -> PixelArt:
        snap = partial(
            to_pixel_art,
            grid=self.grid,
            size=size,
            max_colors=self.max_colors,
            integer_scale=integer_scale,
            palette=palette,
            background=background,
        )
        processes = self.processes
        if processes is None:
            return snap(raw)
        if self._running.join(only_if_idle=True):
            try:
                return snap(raw)
            finally:
                self._running.leave()
        try:
            return processes.submit(snap, raw).result()  # this thread waits without holding the GIL
        except BrokenProcessPool:  # a worker died (killed, out of memory): the pool takes no more work
            if self.processes is processes:
                log.error("a snap process died; snapping on this process's threads from now on", exc_info=True)
                self.processes = None
                processes.shutdown(wait=False, cancel_futures=True)
            return snap(raw)

    def warm_up(self, image_size: int) -> None:
        """Start every worker process now (each one imports numpy and Pillow), not on a user's request; and snap
        once with the pixel-art controls here and in each worker, whose first use imports scipy."""
        blank = Image.new("RGB", (image_size, image_size))
        controlled = partial(to_pixel_art, palette=("#000000", "#ffffff"), background="transparent")
        controlled(blank)
        if self.processes is not None:
            list(self.processes.map(controlled, [blank] * self.process_count))

    def close(self) -> None:
        """Stop the worker processes, if any; the engine snaps no more afterwards."""
        if self.processes is not None:
            self.processes.shutdown(cancel_futures=True)


class _Running:
    """How many renders and in-process snaps of one engine run right now, across its threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    def join(self, only_if_idle: bool = False) -> bool:
        """Count one more, unless `only_if_idle` and something runs; True when counted (then call leave)."""
        with self._lock:
            if only_if_idle and self._count:
                return False
            self._count += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._count -= 1


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
    moving a 512 px image and its result costs (bench/results/2026-12-02-NVIDIA-H200.json, finish_snap_ms).
    With it, 30.4 ms in a later run on a host whose threads were not measured: its effect there is not isolated. A
    no-op where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, KEPT_HEAP_BYTES)
    mallopt(M_TRIM_THRESHOLD, 2 * KEPT_HEAP_BYTES)
