"""Per-channel work queues: each channel's jobs run one at a time in arrival order, channels in parallel."""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

Job = Callable[[], Awaitable[Any]]


class ChannelQueues:
    """A worker task per busy channel; it drains that channel's queue and exits when it is empty.

    Nothing is dropped: every submitted job runs (or its future gets its exception), and a failing job
    never stops the jobs queued behind it.
    """

    def __init__(self) -> None:
        self._pending: dict[int, deque[tuple[Job, asyncio.Future]]] = {}
        self._workers: dict[int, asyncio.Task] = {}

    def submit(self, channel_id: int, job: Job) -> asyncio.Future:
        """Queue ``job`` behind the channel's earlier jobs; the future resolves to its result."""
        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)
        self._pending.setdefault(channel_id, deque()).append((job, future))
        if channel_id not in self._workers:
            self._workers[channel_id] = asyncio.create_task(self._work(channel_id), name=f"channel-{channel_id}")
        return future

    def depth(self, channel_id: int) -> int:
        """Jobs waiting in the channel (not counting the one running)."""
        return len(self._pending.get(channel_id, ()))

    @property
    def idle(self) -> bool:
        return not self._workers

    async def _work(self, channel_id: int) -> None:
        queue = self._pending[channel_id]
        try:
            while queue:
                job, future = queue.popleft()
                if future.done():
                    continue
                try:
                    result = await job()
                except Exception as exc:
                    log.exception("job failed in channel %s", channel_id)
                    if not future.done():
                        future.set_exception(exc)
                else:
                    if not future.done():
                        future.set_result(result)
        finally:
            del self._workers[channel_id]
            if not queue:
                del self._pending[channel_id]

    async def close(self) -> None:
        for queue in self._pending.values():
            for _, future in queue:
                future.cancel()
        workers = list(self._workers.values())
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)


def _retrieve(future: asyncio.Future) -> None:
    """Failures are logged by the worker; mark them seen so fire-and-forget jobs do not warn again."""
    if not future.cancelled():
        future.exception()
