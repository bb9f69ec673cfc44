"""The engine's CPU kernels, built from C++ on first use: a decode step's LoRA terms (``lora_cpu.cpp``), causal
attention for prefills and decode steps (``attention_cpu.cpp``, used by ``attention.KERNEL``) and RMSNorm
(``norm_cpu.cpp``, used by ``norm``).

LoRA terms: with torch ops, a CPU decode step of 8 rows on 8 r=16 adapters (SmolLM2, 2 threads) spent about
10.5 ms of its 46 in LoRA terms: an A and a B matmul per part of each fused layer, each added into the bf16
output on its own (five to eight ops a layer), from copies of the rows' weights gathered for the batch; a
batch on one adapter, two matmuls and an add a layer. The kernel reads each row's weights where they are and
adds the term in one pass (``bench/projections.py --compare kernel``: 1.11-1.24x per step, the same logits).

Attention: torch's CPU flash kernel took 14-15 ms a layer for one 1014-token prompt and 34 ms for two with a
padding mask (SmolLM2's 9 query heads on 3, bf16, 2 threads), over a third of the prefill, and 0.8-1.2 ms for
a decode step of 8 rows at 1000 tokens. The kernels, with AVX512-BF16 dot products, took 5.2, 9.4 and 0.2-0.4;
where the compiler does not target AVX512-BF16 they are left out (``Kernels.attention`` is False) and SDPA
runs.

They are compiled on first use with torch's extension builder (a C++ compiler and ninja; about 20 s on 2 cores)
for this CPU (``-march=native``), and cached under ``TORCH_EXTENSIONS_DIR`` (by default
``~/.cache/torch_extensions``), one build per CPU, torch and Python. Where they cannot be built, the engine
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
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name) for name in ("lora_cpu.cpp", "attention_cpu.cpp", "norm_cpu.cpp")]

STALE_LOCK_S = 600
"""A build lock older than this was left by a process killed while building (torch would wait on it forever)."""

LoraAdd = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[int]], None]
"""(out [rows, out] updated in place, x [rows, in], slots [rows] int64, A [slots, parts*r, in],
B transposed [slots, parts*r, out], the parts' output widths)."""


@dataclass(frozen=True)
class Kernels:
    lora_add: LoraAdd
    attention: bool
    """whether ``torch.ops.personabot.prefill_attention`` and ``decode_attention`` were built (AVX512-BF16)"""


_building = threading.Lock()


def load() -> Kernels | None:
    """The compiled kernels, built on the first call on this machine; None where they cannot be built."""
    with _building:  # engines loading on two threads at once: one build, and its answer for both
        return build()


@cache
def build() -> Kernels | None:
    """``load`` without the lock: compile (or find the cached build) and load it, once per process."""
    from torch.utils.cpp_extension import load as build_extension

    name = f"personabot_cpu_{_build_id()}"
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    if shutil.which("ninja") is None:  # pip's ninja, where this interpreter's scripts are not on PATH
        try:
            import ninja
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
    log.info("loading the CPU kernels (compiled once per machine, about 20 s)")
    try:
        (root / name).mkdir(parents=True, exist_ok=True)
        clear_stale_lock(root / name)
        build_extension(name, [str(source) for source in SOURCES], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                        extra_ldflags=["-fopenmp"], build_directory=str(root / name), is_python_module=False)
    except Exception as e:  # no compiler, no ninja, a compiler that rejects the source, no room
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        log.warning("%s: the CPU kernels could not be built (%s); LoRA terms, attention and norms run as torch ops, a "
                    "decode step 1.1-1.4x slower and a long prompt's prefill up to 1.3x (install a C++ compiler, "
                    "e.g. apt-get install g++)", ", ".join(s.name for s in SOURCES), reason)
        return None
    attention = hasattr(torch.ops.personabot, "decode_attention")
    if not attention:
        log.info("%s: this CPU has no AVX512-BF16; attention runs through SDPA", SOURCES[1].name)
    return Kernels(torch.ops.personabot.lora_add, attention)


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
