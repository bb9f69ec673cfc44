"""The CPU kernel that adds a decode step's LoRA terms, one call per layer (``lora_cpu.cpp``).

With torch ops, a CPU decode step of 8 rows on 8 r=16 adapters (SmolLM2, 2 threads) spent about 10.5 ms of its
46 in LoRA terms: an A and a B matmul per part of each fused layer, each added into the bf16 output on its
own (five to eight ops a layer), from copies of the rows' weights gathered for the batch; a batch on one
adapter, two matmuls and an add a layer. The kernel reads each row's weights where they are and adds the term
in one pass (``bench/projections.py --compare kernel``: 1.11-1.24x per step, the same logits).

It is compiled on first use with torch's extension builder (a C++ compiler and ninja; about 11 s on 2 cores)
for this CPU (``-march=native``), and cached under ``TORCH_EXTENSIONS_DIR`` (by default
``~/.cache/torch_extensions``), one build per CPU, torch and Python. Where it cannot be built, the engine
says why once and keeps the torch ops.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_suffix(".cpp")

STALE_LOCK_S = 600
"""A build lock older than this was left by a process killed while building (torch would wait on it forever)."""

LoraAdd = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[int]], None]
"""(out [rows, out] updated in place, x [rows, in], slots [rows] int64, A [slots, parts*r, in],
B transposed [slots, parts*r, out], the parts' output widths)."""


_building = threading.Lock()


def load() -> LoraAdd | None:
    """The compiled kernel, built on the first call on this machine; None where it cannot be built."""
    with _building:  # engines loading on two threads at once: one build, and its answer for both
        return build()


@cache
def build() -> LoraAdd | None:
    """``load`` without the lock: compile (or find the cached build) and load it, once per process."""
    from torch.utils.cpp_extension import load as build_extension

    name = f"personabot_lora_{_build_id()}"
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    if shutil.which("ninja") is None:  # pip's ninja, where this interpreter's scripts are not on PATH
        try:
            import ninja
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
    log.info("loading the CPU LoRA kernel (compiled once per machine, about 11 s)")
    try:
        (root / name).mkdir(parents=True, exist_ok=True)
        clear_stale_lock(root / name)
        build_extension(name, [str(SOURCE)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                        extra_ldflags=["-fopenmp"], build_directory=str(root / name), is_python_module=False)
    except Exception as e:  # no compiler, no ninja, a compiler that rejects the source, no room
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        log.warning("%s: the CPU LoRA kernel could not be built (%s); LoRA terms run as torch ops, a decode step "
                    "about 10%% slower (install a C++ compiler, e.g. apt-get install g++)", SOURCE.name, reason)
        return None
    return torch.ops.personabot.lora_add


def clear_stale_lock(build_dir: Path) -> None:
    """Remove a build lock that no live build can hold any more."""
    lock = build_dir / "lock"
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink()
            log.warning("%s: removed a build lock left by an interrupted build", lock)
    except FileNotFoundError:
        pass


def _build_id() -> str:
    """This CPU's instruction sets, torch's and Python's versions: a build made for one never loads on another."""
    try:
        cpu = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    key = f"{cpu}|{torch.__version__}|{sys.version_info[:2]}"
    return hashlib.sha1(key.encode()).hexdigest()[:12]
