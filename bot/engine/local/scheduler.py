"""The one worker thread that owns the model and decodes every request in a shared, changing batch.

Continuous batching, step by step:

1. run queued jobs (adapter load/delete) - the model is only ever touched from this thread;
2. drop cancelled requests;
3. admit waiting requests while fewer than ``max_batch`` are decoding: the oldest, and the later ones
   whose padded prompts still fit ``PREFILL_TOKENS`` (on a CPU, and whose padding stays within
   ``CPU_PADDING_TOKENS``; the others keep their place for the next step): their prompts run as one
   left-padded prefill (each row with its own adapter), the first token is sampled and sent, and the rows
   join the running batch (``DecodeBatch``). A prompt that continues a finished reply on the same adapter
   (the next turn of a conversation) prefills alone and only past that reply's cached KV (``prefix``);
4. one decode step: a single forward over all active rows, each with its own adapter (a LoRA slot,
   see ``lora``), position and sampling settings; finished rows leave the batch at once, their KV
   kept in the prefix cache;
5. delete retired adapters (unloaded or replaced) that no request uses any more.

A long reply therefore never holds back a short one: a request started later joins at the next step
and leaves as soon as it is done. The price is that a newcomer's prefill pauses everyone else's decoding
for that one forward. Text goes back to each consumer's event loop through
``loop.call_soon_threadsafe`` (one call per loop per step, and one after a prefill), so the event loop never
waits on the model.

Errors stay with the request that caused them: a failing prefill is retried row by row so only the bad
request fails; out of memory during a decode step evicts the newest request and the rest go on.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import defaultdict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from finetune.bundle import Sampling

from ..base import EngineError
from .kvbatch import DecodeBatch
from .prefix import KV
from .runtime import Runtime
from .detokenize import ReplyText
from .sampling import batch_params, next_tokens, seen_tokens

log = logging.getLogger(__name__)

DONE = object()
"""Queue item that ends a reply."""

PREFILL_TOKENS = 2048
"""Padded prompt tokens one prefill takes in (vLLM's ``max_num_batched_tokens``): the prompts beyond it wait
one decode step, so the first replies stream while the rest are read. 8 conversations of 1014 tokens on a
2-core CPU (SmolLM2) all waited 9.1 s on average for a first token when read as one prefill."""

CPU_PADDING_TOKENS = 64
"""On a CPU, the padding a prefill may carry: a CPU prefill costs about 30 ms plus 0.8-1 ms a token (SmolLM2,
2 cores: 1 token 30 ms, 64 tokens 83, 256 tokens 239), padding included, so a short prompt padded to a long
one's length costs the long one's time (1000 and 50 tokens together 2.48 s, apart 1.05 s), and lengths
80 tokens apart come out even (100 and 20: 191-217 ms together, 170-220 apart). Like lengths gain from
sharing (8 of 64 tokens: 426 ms together, 626 apart). A GPU keeps ``PREFILL_TOKENS`` alone (not measured
there)."""


class ReplyQueue:
    """Where one request's pieces go: an asyncio.Queue on the consumer's event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Any] = asyncio.Queue()


@dataclass(eq=False)
class Request:
    adapter: str
    """public adapter name, for error messages"""
    slot: int
    """the LoRA slot that serves it (a reload fills a new slot; this one stays until the request ends)"""
    prompt: list[int]
    sampling: Sampling
    out: ReplyQueue
    cancelled: bool = False
    """set from the consumer's side; the worker drops the request before its next step"""
    tokens: list[int] = field(default_factory=list)
    text: ReplyText | None = None
    generator: torch.Generator | None = field(init=False)
    """its own draws when its sampling has a seed (CPU: the uniforms are drawn on the host), else None"""

    def __post_init__(self) -> None:
        seed = self.sampling.seed
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)


def _deliver(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for q, item in items:
        q.put_nowait(item)


class _Outbox:
    """What one step produced, handed to each event loop in a single thread-safe call."""

    def __init__(self) -> None:
        self._items: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = defaultdict(list)

    def put(self, request: Request, item: Any) -> None:
        self._items[request.out.loop].append((request.out.queue, item))

    def flush(self) -> None:
        for loop, items in self._items.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that event loop is closed: nobody is listening any more
                pass
        self._items.clear()


_CLOSE = object()


class Scheduler:
    def __init__(self, load: Callable[[], Runtime], max_batch: int) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.ready: Future[Runtime] = Future()
        self._max_batch = max_batch
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._waiting: deque[Request] = deque()
        self._rows: list[Request] = []
        self._batch: DecodeBatch | None = None
        self._retired: set[int] = set()
        self._outbox = _Outbox()
        self._runtime: Runtime | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, args=(load,), name="personabot-engine", daemon=True)
        self._thread.start()

    @property
    def active(self) -> int:
        """Requests decoding or waiting for a slot."""
        return len(self._rows) + len(self._waiting)

    def call(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run ``fn(*args)`` on the worker between two steps."""
        future: Future = Future()
        self._put("job", (future, fn, args))
        return future

    def submit(self, request: Request) -> None:
        self._put("request", request)

    def retire(self, slot: int) -> None:
        """Delete this adapter from the model once no request uses it any more."""
        self._put("retire", slot)

    def close(self) -> None:
        """Fail what is pending, free the model and end the thread (returns once it has ended)."""
        self._closed = True
        self._inbox.put((_CLOSE, None))
        self._thread.join()

    def _put(self, kind: str, payload: Any) -> None:
        if self._closed:
            raise EngineError("engine closed")
        self._inbox.put((kind, payload))

    # --- worker thread -------------------------------------------------------------------------------

    def _run(self, load: Callable[[], Runtime]) -> None:
        try:
            self._runtime = load()
        except BaseException as exc:
            self.ready.set_exception(exc)
            return
        self.ready.set_result(self._runtime)
        while self._drain():
            try:
                self._drop_cancelled()
                with torch.inference_mode():
                    self._admit()
                    self._outbox.flush()  # first tokens go out now, not a decode step later
                    if self._rows:
                        self._decode()
                self._release_retired()
            except Exception as exc:  # a bug or a broken device: fail this batch, keep serving
                log.exception("engine step failed")
                self._fail_all(EngineError(f"generation failed: {exc!r}"))
            self._outbox.flush()
        self._shutdown()

    def _drain(self) -> bool:
        """Take everything from the inbox, blocking while idle. False once closing."""
        block = not self._rows and not self._waiting
        while True:
            try:
                kind, payload = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if kind is _CLOSE:
                return False
            if kind == "request":
                self._waiting.append(payload)
            elif kind == "retire":
                self._retired.add(payload)
            else:
                future, fn, args = payload
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args))
                    except BaseException as exc:
                        future.set_exception(exc)

    def _drop_cancelled(self) -> None:
        if any(r.cancelled for r in self._waiting):
            self._waiting = deque(r for r in self._waiting if not r.cancelled)
        self._remove([i for i, r in enumerate(self._rows) if r.cancelled])

    def _release_retired(self) -> None:
        if not self._retired:
            return
        in_use = {r.slot for r in self._rows} | {r.slot for r in self._waiting}
        for slot in self._retired - in_use:
            self._runtime.delete_adapter(slot)
            self._retired.discard(slot)

    def _admit(self) -> None:
        free = self._max_batch - len(self._rows)
        padding = CPU_PADDING_TOKENS if self._runtime.device.type == "cpu" else PREFILL_TOKENS
        group: list[Request] = []
        passed: list[Request] = []
        longest = tokens = 0
        while self._waiting and len(group) < free:  # the oldest always goes; later ones that fit join it
            request = self._waiting.popleft()
            length = len(request.prompt)
            padded = max(longest, length) * (len(group) + 1)
            if group and (padded > PREFILL_TOKENS or padded - tokens - length > padding):
                passed.append(request)
                continue
            longest, tokens = max(longest, length), tokens + length
            group.append(request)
        self._waiting.extendleft(reversed(passed))  # the ones passed over keep their order, first in line
        misses = []
        for request in group:  # a prompt continuing a finished reply prefills alone, from that reply's KV
            hit = self._runtime.prefixes.lookup(request.slot, request.prompt)
            if hit is None:
                misses.append(request)
            else:
                self._try_prefill([request], hit)
        if misses:
            self._try_prefill(misses)

    def _try_prefill(self, group: list[Request], hit: tuple[int, KV] | None = None) -> None:
        error = self._attempt(group, hit)
        if isinstance(error, torch.OutOfMemoryError) and self._free_cached_memory():
            error = hit = None  # let the failed attempt's tensors go before trying again
            error = self._attempt(group)
        if error is None:
            return
        if len(group) == 1:
            self._fail(group[0], error)
            return
        for request in group:  # find the one at fault; the others still get their reply
            if (single_error := self._attempt([request])) is not None:
                self._fail(request, single_error)

    def _attempt(self, group: list[Request], hit: tuple[int, KV] | None = None) -> Exception | None:
        try:
            self._prefill(group, hit)
        except Exception as exc:
            return exc
        return None

    def _prefill(self, group: list[Request], hit: tuple[int, KV] | None = None) -> None:
        rt = self._runtime
        rows = batch_params([r.sampling for r in group], rt.device)
        forward = partial(rt.forward, slots=[r.slot for r in group])
        if hit is None:
            batch, logits = DecodeBatch.prefill(forward, [r.prompt for r in group], rows, rt.pad_id, rt.device)
        else:
            batch, logits = DecodeBatch.resume(forward, group[0].prompt, *hit, rows, rt.device)
        vocab = logits.shape[-1]
        batch.rows["seen"] = torch.cat([seen_tokens(r.prompt, vocab, rt.device) for r in group])
        tokens = self._sample(batch, logits, group)
        if self._batch is None:
            self._batch, self._rows = batch, []
        else:
            self._batch.extend(batch)
        start = len(self._rows)
        self._rows.extend(group)
        for r in group:
            r.text = ReplyText(rt.tokenizer, r.prompt, r.sampling.stop)
        done = self._accept(group, tokens)
        self._remove([start + i for i in done], finished=True)

    def _decode(self) -> None:
        try:
            logits = self._runtime.decode(self._batch, [r.slot for r in self._rows], self._batch.rows["last"])
        except torch.OutOfMemoryError:
            if self._free_cached_memory():
                return  # the step runs again next time round, with the memory the prefix cache held
            newest = len(self._rows) - 1
            self._fail(self._rows[newest], EngineError("out of memory while decoding; request dropped"))
            self._remove([newest])
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return
        done = self._accept(self._rows, self._sample(self._batch, logits, self._rows))
        self._remove(done, finished=True)

    def _free_cached_memory(self) -> bool:
        """Out of memory: the prefix cache goes before any request does. True if it held anything."""
        if not self._runtime.prefixes.clear():
            return False
        log.warning("out of memory: prefix cache cleared")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return True

    def _sample(self, batch: DecodeBatch, logits: torch.Tensor, requests: list[Request]) -> list[int]:
        tokens = next_tokens(logits, batch.rows, [r.sampling for r in requests], [r.generator for r in requests])
        batch.rows["last"] = tokens
        batch.rows["seen"].scatter_(1, tokens[:, None], True)
        return tokens.tolist()

    def _accept(self, requests: list[Request], tokens: list[int]) -> list[int]:
        """Record each request's new token and stream its text; returns the indices that finished."""
        done = []
        for i, (r, token) in enumerate(zip(requests, tokens)):
            if token in self._runtime.stop_ids:
                self._finish(r)
                done.append(i)
                continue
            r.tokens.append(token)
            piece = r.text.push(token)
            if piece:
                self._outbox.put(r, piece)
            if r.text.stopped or len(r.tokens) >= r.sampling.max_new_tokens:
                self._finish(r)
                done.append(i)
        return done

    def _remove(self, indices: list[int], finished: bool = False) -> None:
        """Take these rows out of the batch; a finished row's KV goes to the prefix cache first."""
        if not indices:
            return
        prefixes = self._runtime.prefixes
        if finished and prefixes.budget > 0:
            for i in indices:
                r = self._rows[i]
                fed, kv = self._batch.row_kv(i)
                prefixes.store(r.slot, (r.prompt + r.tokens)[:fed], kv, len(r.prompt))
        gone = set(indices)
        keep = [i for i in range(len(self._rows)) if i not in gone]
        if keep:
            self._batch.keep(keep)
        else:
            self._batch = None
            self._runtime.lora.drop_gathered()
        self._rows = [self._rows[i] for i in keep]

    def _finish(self, request: Request) -> None:
        piece = request.text.flush()
        if piece:
            self._outbox.put(request, piece)
        self._outbox.put(request, DONE)

    def _fail(self, request: Request, exc: BaseException) -> None:
        if isinstance(exc, torch.OutOfMemoryError):
            exc = EngineError("out of memory while reading the prompt; request dropped")
        elif not isinstance(exc, EngineError):
            log.error("request on adapter '%s' failed", request.adapter, exc_info=exc)
            exc = EngineError(f"adapter '{request.adapter}': generation failed: {exc!r}")
        self._outbox.put(request, exc)

    def _fail_all(self, exc: EngineError) -> None:
        """Fail every decoding request (after an error no single request can be blamed for)."""
        for request in self._rows:
            self._outbox.put(request, EngineError(str(exc)))
        self._rows, self._batch = [], None

    def _shutdown(self) -> None:
        self._fail_all(EngineError("engine closed"))
        for request in self._waiting:
            self._outbox.put(request, EngineError("engine closed"))
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "request":
                self._outbox.put(payload, EngineError("engine closed"))
            elif kind == "job":
                payload[0].set_exception(EngineError("engine closed"))
        self._outbox.flush()
        self._runtime = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
