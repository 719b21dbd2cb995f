"""Process settings for XLA on CPU: glibc malloc tunables, applied by re-executing the process.

XLA's CPU runtime allocates every step's temporaries afresh (gigabytes for a train step of a 135M
model at 8 x 256 tokens). With glibc's defaults, allocations above the mmap threshold (at most
32 MB) are fresh mappings and per-thread arenas give memory back, so each step faults in and
zeroes its working set again: measured on a 2-core EPYC, a SmolLM2-135M PM gradient in bf16
spent 12 of its 19 s per step in the kernel on 2.6 M page faults. With the settings below the same
step takes 11 s, 0.5 s of it in the kernel (`benchmarks/bench_train.py` shows the effect on whole
steps, for PyTorch as well).

The tunables: one malloc arena (arena_max=1, every thread allocates from the brk heap), no mmap'd
chunks (mmap_max=0), no trimming of the heap top (trim_threshold), and transparent huge pages for
what the heap does map (hugetlb=1, effective where THP is in "madvise" or "always" mode). Freed
memory then stays in the process and is reused by the next step: resident memory stays at the
high-water mark instead of following each step's allocations. Unknown tunables are ignored by
older glibc versions; other C libraries and other systems are left alone.

GLIBC_TUNABLES is read once at process start, so `reexec_with_malloc_tunables` replaces the running
process (`os.execve`, same pid and arguments) with one that has it set. The launcher, the
benchmarks and the test suite call it first. Opt out with CAI_JAX_MALLOC=0; tunables already set
in GLIBC_TUNABLES take precedence over these.
"""

from __future__ import annotations

import os
import platform
import sys

MALLOC_TUNABLES = (
    ("glibc.malloc.arena_max", "1"),
    ("glibc.malloc.mmap_max", "0"),
    ("glibc.malloc.trim_threshold", str(1 << 40)),
    ("glibc.malloc.hugetlb", "1"),
)
OPT_OUT = "CAI_JAX_MALLOC"  # "0": keep the C library's defaults
_APPLIED = "CAI_JAX_MALLOC_APPLIED"  # set in the re-executed process, so it never loops


def merged_tunables(current: str) -> str:
    """GLIBC_TUNABLES value: `current` (kept as is, it wins) plus those of ours it does not set."""
    parts = [p for p in current.split(":") if p]
    have = {p.split("=", 1)[0] for p in parts}
    parts += [f"{k}={v}" for k, v in MALLOC_TUNABLES if k not in have]
    return ":".join(parts)


def wants_reexec(environ=None) -> bool:
    """Whether this process should be re-executed with the tunables (glibc Linux, not opted out,
    not already done)."""
    env = os.environ if environ is None else environ
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    if env.get(OPT_OUT, "1") == "0" or env.get(_APPLIED) == "1":
        return False
    return merged_tunables(env.get("GLIBC_TUNABLES", "")) != env.get("GLIBC_TUNABLES", "")


def malloc_env(environ=None) -> dict[str, str]:
    """A copy of the environment with the tunables merged in (for launching a child process)."""
    env = dict(os.environ if environ is None else environ)
    if env.get(OPT_OUT, "1") != "0":
        env["GLIBC_TUNABLES"] = merged_tunables(env.get("GLIBC_TUNABLES", ""))
        env[_APPLIED] = "1"
    return env


def reexec_with_malloc_tunables() -> None:
    """Replaces this process with the same command under `malloc_env()`, when `wants_reexec()`.

    Call it first thing in a main program, before threads start or work is done: whatever the
    process did before is lost. Returns only when no re-exec is needed (or exec is impossible).
    """
    if not wants_reexec():
        return
    argv = [sys.executable, *getattr(sys, "orig_argv", [sys.executable, *sys.argv])[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, malloc_env())
    except OSError:  # e.g. an embedded interpreter without a usable sys.executable: run as is
        return
