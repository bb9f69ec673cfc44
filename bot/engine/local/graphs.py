"""Decode steps replayed as CUDA graphs.

At batch 1 an 8B model's eager decode step is bound by launching its ~1,000 kernels from Python, not by
the GPU: plain ``generate`` reaches 35 of the ~190 tokens/s the H100's memory bandwidth allows. A CUDA
graph records the step's kernels once and replays them with one launch.

A graph replays fixed kernels on fixed memory, so everything a step reads lives in tensors that stay put:
the token, position and mask go into static inputs before each replay, and the KV cache writes its new
column in place at a position held in a tensor (``GrowingLayer.write_at``) and attends over its whole
buffer, the unused columns masked. A graph therefore serves one *epoch*: the same rows (and adapter
slots), the same KV buffers, until a row joins or leaves, the buffers fill, or an adapter load reshapes
the LoRA slots. Each epoch's first step runs eagerly in the same static form (it is the warm-up capture
needs, and does the step's work), then the rest replay the graph captured right after it.

The first graph of each kind (batch size; no adapter, one, or several) is checked against that eager step
(writing the same column twice is harmless); a mismatch, or any error while capturing other than running
out of memory, turns graphs off for good with a logged error, and decoding goes on eagerly.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Protocol

import torch

from .kvbatch import DecodeBatch

log = logging.getLogger(__name__)

StaticForward = Callable[..., torch.Tensor]
"""``Runtime.forward``: (ids, mask, positions, cache, slots=..., rows=...) -> logits [B, V]."""


class Graph(Protocol):
    def replay(self) -> torch.Tensor:
        """Run the recorded step again on the current contents of its inputs; returns its output."""


class Capturer(Protocol):
    def run(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run ``fn`` eagerly where captures happen (the warm-up capture needs)."""

    def capture(self, fn: Callable[[], torch.Tensor]) -> Graph:
        """Record ``fn`` without running it."""


class CudaGraphs:
    """Captures on one side stream, where the warm-up steps run too (so cuBLAS sets up its workspace for that
    stream outside any capture), into one memory pool that every graph shares; replays on the current stream."""

    def __init__(self) -> None:
        self._stream = torch.cuda.Stream()
        self._pool = torch.cuda.graph_pool_handle()
        self._latest: torch.cuda.CUDAGraph | None = None
        """The last graph captured, kept alive until the next capture succeeds: once every graph of a pool is
        freed, PyTorch refuses to capture into it again until ``empty_cache()`` (an internal assert)."""

    @contextmanager
    def _on_side_stream(self) -> Iterator[None]:
        self._stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(self._stream):
                yield
        finally:  # even after an error: what the side stream queued must come before what follows
            torch.cuda.current_stream().wait_stream(self._stream)

    def run(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        with self._on_side_stream():
            return fn()

    def capture(self, fn: Callable[[], torch.Tensor]) -> Graph:
        if self._latest is None:  # no graph holds the pool (none captured yet, or only failed captures)
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with self._on_side_stream():
            # thread_local: the engine's other threads (bundle reads) may use CUDA meanwhile
            graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
            try:
                out = fn()
            finally:
                graph.capture_end()
        self._latest = graph
        return _Replay(graph, out)


class _Replay:
    def __init__(self, graph: torch.cuda.CUDAGraph, out: torch.Tensor) -> None:
        self._graph, self._out = graph, out

    def replay(self) -> torch.Tensor:
        self._graph.replay()
        return self._out


class Reruns:
    """A graph's semantics without CUDA, for checking the logic on a CPU: a replay runs the recorded step
    again, on the same static tensors."""

    def run(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        return fn()

    def capture(self, fn: Callable[[], torch.Tensor]) -> Graph:
        return _Rerun(fn)


class _Rerun:
    def __init__(self, fn: Callable[[], torch.Tensor]) -> None:
        self._fn = fn

    def replay(self) -> torch.Tensor:
        return self._fn()


class _Epoch:
    """The static inputs of one batch's steps and, once captured, the graph that reads them."""

    def __init__(self, batch: DecodeBatch, forward: Callable[..., torch.Tensor], key: Hashable) -> None:
        device, size, capacity = batch.mask.device, batch.size, batch.cache.layers[0].capacity
        self.key = key
        self.capacity = capacity
        self.ids = torch.zeros(size, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(size, 1, dtype=torch.long, device=device)
        self.mask = torch.zeros(size, 1, 1, capacity, dtype=torch.bool, device=device)  # SDPA: True attends
        self.write_at = torch.zeros(1, dtype=torch.long, device=device)
        self.forward = forward
        self.graph: Graph | None = None

    def load(self, batch: DecodeBatch, tokens: torch.Tensor) -> None:
        """Fill the static inputs for the step that feeds ``tokens`` [B] at column ``batch.length``."""
        length = batch.length
        self.ids.copy_(tokens[:, None])
        self.positions.copy_(batch.mask.sum(-1, keepdim=True))
        mask = self.mask[:, 0, 0]
        mask[:, :length].copy_(batch.mask)
        mask[:, length:].fill_(False)
        mask[:, length].fill_(True)
        self.write_at.fill_(length)

    def run(self, batch: DecodeBatch) -> torch.Tensor:
        """The step itself, in the static form a graph can record."""
        layers = batch.cache.layers
        for layer in layers:
            layer.write_at = self.write_at
        try:
            return self.forward(self.ids, self.mask, self.positions, batch.cache)
        finally:
            for layer in layers:
                layer.write_at = None


class DecodeGraphs:
    """Decode steps for the scheduler: graph replays within an epoch, an eager static step to start one."""

    def __init__(
        self, forward: StaticForward, version: Callable[[], Hashable], capturer: Capturer, check: bool = True
    ) -> None:
        """``version``: changes whenever the forward's own tensors move (the LoRA slots grow). ``check``:
        compare the first graph of each kind with its eager step (reads values on the host)."""
        self.enabled = True
        self.checked: set[tuple[int, str]] = set()
        """Kinds of graph, (batch size, 'none' | 'one' | 'mixed' adapters), that passed the check."""
        self._forward = forward
        self._version = version
        self._capturer = capturer
        self._check_new_kinds = check
        self._epoch: _Epoch | None = None

    def step(self, batch: DecodeBatch, slots: list[int], tokens: torch.Tensor) -> torch.Tensor:
        """Feed each row its latest token [B]; returns logits [B, V] for the token after it."""
        epoch = self._epoch
        if epoch is None or epoch.key != self._key(batch, slots) or batch.length >= epoch.capacity:
            return self._begin(batch, slots, tokens)
        epoch.load(batch, tokens)
        if epoch.graph is None:  # no memory was left to capture it: this epoch runs eagerly
            logits = self._capturer.run(partial(epoch.run, batch))
        else:
            logits = epoch.graph.replay()
        batch.advance()
        return logits

    def _begin(self, batch: DecodeBatch, slots: list[int], tokens: torch.Tensor) -> torch.Tensor:
        self._epoch = None  # the old graph goes once nothing else holds it (the capturer keeps it until the next)
        batch.make_room()
        rows = torch.tensor(slots, device=batch.mask.device)  # the LoRA gather reads it at every replay
        epoch = _Epoch(batch, partial(self._forward, slots=slots, rows=rows), self._key(batch, slots))
        epoch.load(batch, tokens)
        logits = self._capturer.run(partial(epoch.run, batch))
        try:
            epoch.graph = self._capturer.capture(partial(epoch.run, batch))
            distinct = set(slots)  # the LoRA hooks take a different path for each
            kind = (batch.size, "none" if distinct == {0} else "one" if len(distinct) == 1 else "mixed")
            if self._check_new_kinds and kind not in self.checked:
                self._check(epoch, batch, logits)
                self.checked.add(kind)
        except torch.OutOfMemoryError:
            log.warning("out of memory capturing a decode graph; steps run eagerly until the batch changes")
            epoch.graph = None
        except Exception:
            log.exception("capturing the decode step as a CUDA graph failed; decoding eagerly from now on")
            self.enabled = False
            epoch = None
        batch.advance()
        self._epoch = epoch
        return logits

    def _key(self, batch: DecodeBatch, slots: list[int]) -> Hashable:
        """Everything a graph bakes in: the rows' slots, the LoRA layout, the KV buffers."""
        return tuple(slots), self._version(), batch.buffers()

    def _check(self, epoch: _Epoch, batch: DecodeBatch, eager: torch.Tensor) -> None:
        """Replay the step just run eagerly (rewriting the same KV column) and compare the logits."""
        replayed = epoch.graph.replay()
        error = float((replayed - eager).abs().max())
        scale = float(eager.abs().max())
        if not error <= 0.02 * scale + 1e-3:
            self._capturer.run(partial(epoch.run, batch))  # put back the column the graph may have written wrong
            raise RuntimeError(f"graph replay differs from the eager step: max error {error:.3g} (scale {scale:.3g})")
