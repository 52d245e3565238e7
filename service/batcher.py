"""Group concurrent generation requests into one engine call on one worker thread.

The GPU does one thing at a time, so a single thread owns it and the event loop never blocks.
Requests that arrive while it is busy (or within `max_wait_s` of each other, where a wait is set) share the
next engine call (up to `max_images` images): one pipeline call of 8 images costs far less than 8 calls.
The engine's CPU half (snapping, `finish`) runs on other threads, so the GPU thread goes straight
on to the next batch instead of waiting for it; with PUNKS_SNAP_PROCESSES those threads only wait for the
engine's snap processes, so the snapping's Python work does not hold this process's GIL.

Cancelling the task awaiting `submit` takes a queued request out of the queue unrendered; cancel it with
the message CLIENT_GONE when its client hung up, so that metrics tell the two kinds of giving up apart.
"""

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from service.config import Settings
from service.engine import Engine, GenerationRequest, GenerationResult, Rendered
from service.metrics import BatchMetrics

log = logging.getLogger(__name__)

CLIENT_GONE = "client_gone"  # the cancel message of a request whose client disconnected

Render = Callable[[Sequence[GenerationRequest]], list[Rendered]]
Finish = Callable[[Rendered], GenerationResult]


class QueueFull(Exception):
    """The queue holds max_queue requests already: the client should retry later."""


class ShuttingDown(Exception):
    """The service is stopping and takes no new work."""


class GenerationFailed(Exception):
    """The engine raised on this request (alone, after its batch failed)."""


@dataclass(frozen=True)
class Done:
    result: GenerationResult
    queue_wait_s: float
    batch_images: int  # images in the engine call that rendered it (its own and its batch mates')


@dataclass(eq=False)  # identity, so a request can be removed from the queue by itself
class _Pending:
    request: GenerationRequest
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


class Batcher:
    """Create inside the running event loop; `close()` finishes the queued work (within a bound), then stops."""

    def __init__(
        self,
        render: Render,
        finish: Finish,
        metrics: BatchMetrics,
        executor: ThreadPoolExecutor,
        *,
        max_images: int,
        max_wait_s: float,
        max_queue: int,
        batch_sizes: tuple[int, ...] | None = None,
    ):
        """`executor` is the one GPU thread that runs `render`: CUDA graphs recorded at load time replay only on
        the thread that recorded them, so the engine must be loaded and run on the same single thread.
        `finish` runs on the event loop's default thread pool, one request per task.
        `batch_sizes`: the sizes the engine runs without padding (compiled buckets); None: any size."""
        self._render = render
        self._finish = finish
        self._finishing: set[asyncio.Task] = set()
        self._metrics = metrics
        self.max_images = max_images
        self.max_wait_s = max_wait_s
        self.batch_sizes = batch_sizes
        self.max_queue = max_queue
        self._pending: deque[_Pending] = deque()
        self._wake = asyncio.Event()
        self._closing = False
        self._running: list[_Pending] = []  # the batch on the GPU thread now
        self._executor = executor
        metrics.watch_queue(lambda: len(self._pending))
        self._task = asyncio.get_running_loop().create_task(self._serve(), name="punks-batcher")
        self._task.add_done_callback(self._stopped)

    @classmethod
    def for_engine(
        cls, engine: Engine, metrics: BatchMetrics, executor: ThreadPoolExecutor, settings: Settings | None = None
    ) -> "Batcher":
        """The batcher every surface (HTTP, Cog) puts in front of a loaded engine, sized by `settings` (default: the
        engine's; the HTTP app passes its own, which may set other limits than the engine it was given)."""
        s = settings or engine.settings
        return cls(
            engine.render,
            engine.finish,
            metrics,
            executor,
            max_images=s.max_batch_size,
            max_wait_s=s.max_batch_wait_ms / 1000,
            max_queue=s.max_queue,
            batch_sizes=s.batch_buckets if s.compile else None,  # compiled: other sizes are padded up
        )

    @property
    def alive(self) -> bool:
        """False once the scheduling task has ended: closed, or died of a bug (readiness must say so)."""
        return not self._task.done()

    async def submit(self, request: GenerationRequest) -> Done:
        """Wait for the request's result. Cancelling (a timeout) while queued drops it from the queue."""
        if self._closing:
            raise ShuttingDown
        if not self.alive:
            raise GenerationFailed("the batcher stopped")
        if len(self._pending) >= self.max_queue:
            raise QueueFull
        item = _Pending(request, asyncio.get_running_loop().create_future())
        self._pending.append(item)
        self._wake.set()
        try:
            return await item.future
        except asyncio.CancelledError as cancel:
            if item in self._pending:  # never rendered: say why it was given up
                reason = CLIENT_GONE if cancel.args == (CLIENT_GONE,) else "other"
                self._metrics.never_rendered(reason)
            raise
        finally:
            if item in self._pending:
                self._pending.remove(item)

    async def close(self, timeout_s: float | None = None) -> None:
        """Take no new work; answer the queued work, for at most timeout_s (None: however long it takes).

        At the deadline every request still waiting, queued or on the GPU, gets ShuttingDown. The batch on the
        GPU thread cannot be interrupted: the thread finishes it after this returns and its results are dropped."""
        self._closing = True
        self._wake.set()
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.wait([self._task])  # neither raises its error (logged by _stopped) nor cancels it
                while self._finishing:
                    await asyncio.wait(self._finishing)
        except TimeoutError:
            log.warning(
                "shutdown: %d queued and %d started requests not answered within %gs get 503",
                len(self._pending),
                len(self._running) + len(self._finishing),
                timeout_s,
            )
            self._abandon(ShuttingDown())
            self._task.cancel()
            for task in self._finishing:
                task.cancel()
            await asyncio.gather(self._task, *self._finishing, return_exceptions=True)

    def _stopped(self, task: asyncio.Task) -> None:
        """The scheduling task ended: if by a bug, fail what waits now instead of letting it time out."""
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "the batcher stopped; generation requests get 503 until the service restarts", exc_info=task.exception()
            )
            self._abandon(GenerationFailed("the batcher stopped"))

    def _abandon(self, error: Exception) -> None:
        for item in [*self._pending, *self._running]:
            _settle(item.future, exception=error)
        self._pending.clear()

    async def _serve(self) -> None:
        while self._pending or not self._closing:
            if self._pending:
                await self._wait_for_finishing()
                await self._gather()
                if batch := self._take():  # empty when every waiting request timed out meanwhile
                    await self._execute(batch)
            else:
                self._wake.clear()
                await self._wake.wait()

    async def _wait_for_finishing(self) -> None:
        """Back-pressure: when the CPU half falls behind, the GPU waits instead of piling up rendered images
        (the queue then fills up and new requests get 429, as they should on an overloaded server)."""
        while len(self._finishing) >= 2 * self.max_images:
            await asyncio.wait(self._finishing, return_when=asyncio.FIRST_COMPLETED)

    async def _gather(self) -> None:
        """Give other requests up to max_wait_s to join, unless the batch is already full."""
        deadline = time.perf_counter() + self.max_wait_s
        while self._queued_images() < self.max_images and not self._closing:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                return

    def _queued_images(self) -> int:
        return sum(item.request.num_outputs for item in self._pending)

    def _take(self) -> list[_Pending]:
        """The oldest requests that fit in max_images images (at least one, whatever its size).

        With batch_sizes, no more than the largest size the queue fills: the engine pads a batch of 3 to 4
        images, so taking 3 of 5 queued images wastes a quarter of the GPU's work, while the 2 left over
        go first in the next batch. (Requests stay in order, so 2 + 1 of a 2, 1, 2 queue still pads.)"""
        limit = self.max_images
        if self.batch_sizes:
            queued = min(self._queued_images(), self.max_images)
            limit = max((size for size in self.batch_sizes if size <= queued), default=queued)
        batch: list[_Pending] = []
        images = 0
        while self._pending and (not batch or images + self._pending[0].request.num_outputs <= limit):
            item = self._pending.popleft()
            batch.append(item)
            images += item.request.num_outputs
        return batch

    async def _execute(self, batch: list[_Pending]) -> None:
        """Render the batch on the GPU thread, then hand each request to a finishing task and return."""
        started = time.perf_counter()
        requests = [item.request for item in batch]
        batch_images = sum(request.num_outputs for request in requests)
        self._metrics.batch_started(batch_images)
        self._running = batch
        try:
            rendered = await asyncio.get_running_loop().run_in_executor(self._executor, self._render, requests)
        except Exception as error:
            self._running = []
            self._metrics.generation_failed()
            if len(batch) > 1:
                # One bad request (or a batch too big for memory) must not fail its neighbours: retry each alone,
                # but not one whose caller gave up meanwhile (hung up, timed out): nobody would read it.
                log.warning("batch of %d requests failed (%r); retrying each alone", len(batch), error)
                for item in batch:
                    if not item.future.done():
                        await self._execute([item])
                return
            self._fail(batch[0], error)
            return
        self._running = []
        for item, one in zip(batch, rendered, strict=True):
            task = asyncio.create_task(self._finish_one(item, one, started - item.queued_at, batch_images))
            self._finishing.add(task)
            task.add_done_callback(self._finishing.discard)

    async def _finish_one(self, item: _Pending, rendered: Rendered, queue_wait_s: float, batch_images: int) -> None:
        if item.future.done():  # timed out while rendering: nobody waits for its snapping
            return
        try:
            result = await asyncio.to_thread(self._finish, rendered)
        except Exception as error:
            self._metrics.generation_failed()
            self._fail(item, error)
        else:
            _settle(item.future, result=Done(result, queue_wait_s, batch_images))
        finally:  # interrupted (cancelled): answer anyway; a no-op when settled above
            _settle(item.future, exception=ShuttingDown() if self._closing else GenerationFailed("interrupted"))

    @staticmethod
    def _fail(item: _Pending, error: Exception) -> None:
        log.error("generation failed", exc_info=error)
        _settle(item.future, exception=GenerationFailed(type(error).__name__))


def _settle(future: asyncio.Future, *, result: Done | None = None, exception: Exception | None = None) -> None:
    if future.done():  # its request timed out meanwhile
        return
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(result)
