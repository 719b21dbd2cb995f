"""Process settings for XLA on CPU: glibc malloc tunables, applied by re-executing the process.

XLA's CPU runtime allocates every step's temporaries afresh (gigabytes for a train step of a 135M
model at 8 x 256 tokens). With glibc's defaults, allocations above the mmap threshold (at most
32 MB) are fresh mappings and per-thread arenas give memory back, so each step faults in and
zeroes its working set again: measured on a 2-core EPYC, a SmolLM2-135M PM gradient in bf16
spent 9.5 of its 16.1 s per step in the kernel on 2.5 M page faults. With the settings below the
same step takes 10.3 s, 0.3 s of it in the kernel (`benchmarks/perf_malloc.py`;
`benchmarks/bench_train.py` shows the effect on whole steps).

The tunables (CAI_JAX_MALLOC selects a set):
- "fast" (default): one malloc arena (arena_max=1, every thread allocates from the brk heap), no
  mmap'd chunks (mmap_max=0), no trimming of the heap top (trim_threshold), and transparent huge
  pages for what the heap maps (hugetlb=1, effective where THP is in "madvise" or "always" mode).
  Freed memory stays in the process and the next step reuses it. The price is memory: resident
  size stays at the high-water mark, and a heap shared by phases of different shapes fragments.
  Measured on the 2-core machine: the demo pipeline peaked at 17.4 GB either way, but one PPO
  iteration of `benchmarks/bench_ppo.py` (four 135M models) peaked at 22 GB against 10.5 GB under
  glibc's defaults, while running 1.23x faster (87 s against 108 s).
- "bounded": one arena, the largest mmap threshold glibc allows (32 MB), no trimming, huge pages.
  Chunks above 32 MB are still mapped and given back on free, so memory follows the defaults
  (9.4 GB on that PPO iteration, which takes 106 s); in a gradient-only loop huge pages cut the
  faults, not the zeroing: 13.3 s per step, 3.9 s in the kernel, where the defaults took 19.3 s.
- "0": glibc's defaults.
Unknown tunables are ignored by older glibc versions; other C libraries and systems are left alone.
Tunables already set in GLIBC_TUNABLES take precedence over these.

GLIBC_TUNABLES is read once at process start, so `reexec_with_malloc_tunables` replaces the running
process (`os.execve`, same pid and arguments) with one that has it set. Every entry point calls it
first (the launcher, the sweep runner, the plan and the benchmarks, through
`experiments/entry.py` or directly); `run.py` sets it for the commands it starts (the demo and the
tests). The tunables are for XLA's CPU runtime only: where JAX will run on an accelerator
(`accelerator_expected`: JAX_PLATFORMS names one, or a CUDA / TPU plugin is installed) nothing is
changed.

XLA's CPU flags (XLA_CPU_FLAGS, merged into XLA_FLAGS by the same entry points; CAI_JAX_XLA_CPU=0
leaves XLA_FLAGS as it is, and a flag already in XLA_FLAGS wins): XLA's CPU scheduler orders a
program's ops for concurrency by default, which keeps more of its temporaries alive at once; the
memory-minimising order (`--xla_cpu_enable_concurrency_optimized_scheduler=false`, what
`experiments/plan.py` compiles with) computes the same values in another order. Measured on the
2-core machine (BENCHMARKS.md, "Peak memory"): the demo's SFT stage run alone peaked at 11.3 GB
instead of 13.0 GB, its PPO stage at 10.9 and 14.9 GB instead of 14.8 and 15.5 GB (two alternating
pairs), with the same losses and PPO metrics bit for bit and run times within the spread.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from collections.abc import MutableMapping

_HUGE = str(1 << 40)
MODES = {
    "fast": (
        ("glibc.malloc.arena_max", "1"),
        ("glibc.malloc.mmap_max", "0"),
        ("glibc.malloc.trim_threshold", _HUGE),
        ("glibc.malloc.hugetlb", "1"),
    ),
    "bounded": (
        ("glibc.malloc.arena_max", "1"),
        ("glibc.malloc.mmap_threshold", str(32 << 20)),
        ("glibc.malloc.trim_threshold", _HUGE),
        ("glibc.malloc.hugetlb", "1"),
    ),
}
MALLOC_TUNABLES = MODES["fast"]
XLA_CPU_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)
XLA_OPT_OUT = "CAI_JAX_XLA_CPU"  # "0": leave XLA_FLAGS alone
_OFF = ("0", "off", "none")  # what turns CAI_JAX_MALLOC or CAI_JAX_XLA_CPU off
OPT_OUT = "CAI_JAX_MALLOC"  # "fast" (default), "bounded", or "0": glibc's defaults
_APPLIED = "CAI_JAX_MALLOC_APPLIED"  # set in the re-executed process, so it never loops


def malloc_mode(environ=None) -> str | None:
    """The tunable set CAI_JAX_MALLOC selects: "fast", "bounded", or None (off)."""
    env = os.environ if environ is None else environ
    mode = env.get(OPT_OUT, "fast").strip().lower() or "fast"
    if mode in _OFF:
        return None
    if mode not in MODES:
        raise ValueError(f"{OPT_OUT}={env.get(OPT_OUT)!r}: expected one of fast, bounded, 0")
    return mode


def merged_tunables(current: str, mode: str = "fast") -> str:
    """GLIBC_TUNABLES value: `current` (kept as is, it wins) plus those of `mode` it does not set."""
    parts = [p for p in current.split(":") if p]
    have = {p.split("=", 1)[0] for p in parts}
    parts += [f"{k}={v}" for k, v in MODES[mode] if k not in have]
    return ":".join(parts)


def merged_xla_flags(current: str) -> str:
    """XLA_FLAGS value: `current` (kept as is, its flags win) plus those of XLA_CPU_FLAGS it does not set."""
    parts = current.split()
    have = {p.split("=", 1)[0] for p in parts}
    return " ".join(parts + [f for f in XLA_CPU_FLAGS if f.split("=", 1)[0] not in have])


def _add_xla_cpu_flags(env: MutableMapping[str, str]) -> None:
    """Merges XLA_CPU_FLAGS into `env`'s XLA_FLAGS, unless turned off or JAX runs on an accelerator."""
    if env.get(XLA_OPT_OUT, "1").strip().lower() not in _OFF and not accelerator_expected(env):
        env["XLA_FLAGS"] = merged_xla_flags(env.get("XLA_FLAGS", ""))


_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu")


def accelerator_expected(environ=None) -> bool:
    """Whether JAX will run on an accelerator here: JAX_PLATFORMS names a non-CPU platform, or (unset)
    a GPU / TPU plugin is installed. Decided without importing jax (before the process re-executes)."""
    env = os.environ if environ is None else environ
    platforms = [p.strip().lower() for p in env.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return any(p != "cpu" for p in platforms)
    return any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS)


def wants_reexec(environ=None) -> bool:
    """Whether this process should be re-executed with the tunables (glibc Linux, XLA on CPU, not
    turned off, not already done). On an accelerator host they would only cost host memory."""
    env = os.environ if environ is None else environ
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or accelerator_expected(env):
        return False
    mode = malloc_mode(env)
    if mode is None or env.get(_APPLIED) == "1":
        return False
    return merged_tunables(env.get("GLIBC_TUNABLES", ""), mode) != env.get("GLIBC_TUNABLES", "")


def malloc_env(environ=None) -> dict[str, str]:
    """A copy of the environment with the tunables and XLA's CPU flags merged in (for launching a
    child process)."""
    env = dict(os.environ if environ is None else environ)
    _add_xla_cpu_flags(env)
    mode = malloc_mode(env)
    if mode is not None and not accelerator_expected(env):
        env["GLIBC_TUNABLES"] = merged_tunables(env.get("GLIBC_TUNABLES", ""), mode)
        env[_APPLIED] = "1"
    return env


def reexec_with_malloc_tunables() -> None:
    """Replaces this process with the same command under `malloc_env()`, when `wants_reexec()`.

    Call it first thing in a main program, before threads start or work is done: whatever the
    process did before is lost. Returns only when no re-exec is needed (or exec is impossible);
    either way XLA's CPU flags are in XLA_FLAGS afterwards (read when JAX starts its backend).
    """
    _add_xla_cpu_flags(os.environ)
    if not wants_reexec():
        return
    argv = [sys.executable, *getattr(sys, "orig_argv", [sys.executable, *sys.argv])[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, malloc_env())
    except OSError:  # e.g. an embedded interpreter without a usable sys.executable: run as is
        return
