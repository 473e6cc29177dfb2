"""Dynamic batching: sequences of concurrent requests share one padded forward pass.

Each request's sequences go to a FIFO queue. One worker task takes sequences from its front
while the batch's padded size, (#sequences) × (longest length), stays within
--max-batch-tokens (a single longer sequence runs alone), waiting at most --batch-wait-ms
after the first one arrives for the batch to fill. The forward runs in a worker thread, so
the event loop keeps accepting requests meanwhile; results go back through futures.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field


@dataclass
class Stats:
    """Counters served at GET /opd/stats."""

    requests: int = 0  # /v1/completions requests answered with 200
    rejected: int = 0  # answered with an error (4xx/5xx)
    sequences: int = 0
    batches: int = 0
    max_batch_sequences: int = 0
    tokens: int = 0  # real prompt tokens scored
    padded_tokens: int = 0  # batch rows × longest row, summed over batches
    forward_seconds: float = 0.0
    failed_batches: int = 0
    started: float = field(default_factory=time.time)

    def as_dict(self, queued: int) -> dict:
        out = asdict(self)
        out["queued_sequences"] = queued
        out["uptime_s"] = round(time.time() - out.pop("started"), 3)
        out["forward_seconds"] = round(self.forward_seconds, 6)
        return out


@dataclass
class _Item:
    ids: list[int]
    temperature: float
    k: int
    future: asyncio.Future


class DynamicBatcher:
    """Queue + worker around `engine.score(seqs, temperatures, k)`."""

    def __init__(self, engine, max_batch_tokens: int, batch_wait_ms: float):
        self.engine = engine
        self.max_batch_tokens = max_batch_tokens
        self.wait_s = batch_wait_ms / 1000.0
        self.stats = Stats()
        self._queue: deque[_Item] = deque()
        self._wake = asyncio.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opd-forward")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(RuntimeError("the server is shutting down"))
        self._pool.shutdown(wait=True)

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def submit(self, seqs: list[list[int]], temperature: float, k: int) -> list:
        """Queue the sequences of one request; return their `SequenceScores` in order."""
        loop = asyncio.get_running_loop()
        items = [_Item(s, temperature, k, loop.create_future()) for s in seqs]
        self._queue.extend(items)
        self._wake.set()
        return list(await asyncio.gather(*(it.future for it in items)))

    def _fits(self, count: int) -> int:
        """How many queued items (≤ count) fit one batch: padded tokens within the budget."""
        longest, n = 0, 0
        for item in itertools.islice(self._queue, count):
            longest = max(longest, len(item.ids))
            if n > 0 and (n + 1) * longest > self.max_batch_tokens:
                break
            n += 1
        return n

    def _full(self) -> bool:
        return self._fits(len(self._queue)) < len(self._queue)

    async def _gather_batch(self) -> list[_Item]:
        while not self._queue:
            self._wake.clear()
            await self._wake.wait()
        deadline = time.monotonic() + self.wait_s
        while not self._full() and (remaining := deadline - time.monotonic()) > 0:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:
                break
        n = self._fits(len(self._queue))
        return [self._queue.popleft() for _ in range(n)]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [it for it in await self._gather_batch() if not it.future.cancelled()]
            if not batch:
                continue
            seqs = [it.ids for it in batch]
            temps = [it.temperature for it in batch]
            k = max(it.k for it in batch)
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._pool, self.engine.score, seqs, temps, k)
            except Exception as err:  # noqa: BLE001 - each request gets the error as a 500
                self.stats.failed_batches += 1
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(err)
                continue
            s = self.stats
            s.forward_seconds += time.perf_counter() - t0
            s.batches += 1
            s.sequences += len(batch)
            s.max_batch_sequences = max(s.max_batch_sequences, len(batch))
            s.tokens += sum(len(x) for x in seqs)
            s.padded_tokens += len(seqs) * max(len(x) for x in seqs)
            for it, res in zip(batch, results):
                if not it.future.done():
                    it.future.set_result(res)
