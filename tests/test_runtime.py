"""cai_jax.runtime: glibc malloc tunables, and the re-exec that applies them."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from cai_jax import runtime

ROOT = Path(__file__).resolve().parents[1]
glibc_linux = pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc tunables need glibc on Linux"
)

# Allocates, touches and frees a 256 MB buffer twice; prints the page faults of the second round
# and the resident memory (MB) left after it. Under glibc's defaults the buffer is a fresh mapping
# each time (~65k faults of 4 KB pages) and is given back on free; with the "fast" tunables the
# second round reuses the heap memory of the first, which stays resident.
_FAULTS = """
import ctypes, os, resource
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
n = 256 << 20
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
def round_():
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)
round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, rss_mb())
"""


def _clean_env(**extra):
    drop = ("GLIBC_TUNABLES", runtime.OPT_OUT, runtime._APPLIED, "XLA_FLAGS", runtime.XLA_OPT_OUT, "JAX_PLATFORMS")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, **extra}


def test_merged_tunables_keep_users_settings():
    assert runtime.merged_tunables("") == ":".join(f"{k}={v}" for k, v in runtime.MALLOC_TUNABLES)
    merged = runtime.merged_tunables("glibc.malloc.arena_max=4:glibc.cpu.x86_foo=1")
    parts = merged.split(":")
    assert parts[:2] == ["glibc.malloc.arena_max=4", "glibc.cpu.x86_foo=1"]  # the user's, first and unchanged
    assert sum(p.startswith("glibc.malloc.arena_max=") for p in parts) == 1
    assert {p.split("=")[0] for p in parts} >= {k for k, _ in runtime.MALLOC_TUNABLES}
    assert runtime.merged_tunables(merged) == merged  # idempotent


@glibc_linux
def test_wants_reexec_and_opt_out():
    assert runtime.wants_reexec(_clean_env())
    assert not runtime.wants_reexec(_clean_env(CAI_JAX_MALLOC="0"))
    assert not runtime.wants_reexec(_clean_env(GLIBC_TUNABLES=runtime.merged_tunables("")))
    assert not runtime.wants_reexec(_clean_env(**{runtime._APPLIED: "1"}))
    assert runtime.malloc_env(_clean_env(CAI_JAX_MALLOC="0")).get("GLIBC_TUNABLES") is None
    bounded = runtime.malloc_env(_clean_env(CAI_JAX_MALLOC="bounded"))["GLIBC_TUNABLES"]
    assert "glibc.malloc.mmap_threshold=33554432" in bounded and "mmap_max" not in bounded
    assert runtime.wants_reexec(_clean_env(CAI_JAX_MALLOC="bounded"))
    with pytest.raises(ValueError, match="CAI_JAX_MALLOC='quick': expected one of fast, bounded, 0"):
        runtime.malloc_env(_clean_env(CAI_JAX_MALLOC="quick"))


@glibc_linux
def test_reexec_replaces_the_process_once_with_the_tunables():
    code = (
        f"import os, sys; sys.path.insert(0, {str(ROOT)!r}); from cai_jax import runtime;"
        "print('start', os.getpid(), flush=True); runtime.reexec_with_malloc_tunables();"
        "print('tunables', os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, "x", "--y=1"], env=_clean_env(), capture_output=True, text=True, check=True
    ).stdout.split("\n")
    starts = [line for line in out if line.startswith("start")]
    done = [line for line in out if line.startswith("tunables")]
    assert len(starts) == 2 and len(done) == 1, out  # ran twice from the top, finished once
    pid = starts[0].split()[1]
    assert starts[1].split()[1] == pid and done[0].split()[1] == pid  # same process (execve)
    assert runtime.merged_tunables("") in done[0] and "['x', '--y=1']" in done[0]


@glibc_linux
def test_tunables_stop_refaulting_freed_memory():
    def faults_and_rss(env):
        run = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, check=True)
        faults, rss = run.stdout.split()
        return int(faults), float(rss)

    default = faults_and_rss(_clean_env())
    fast = faults_and_rss(runtime.malloc_env(_clean_env()))
    bounded = faults_and_rss(runtime.malloc_env(_clean_env(CAI_JAX_MALLOC="bounded")))
    assert default[0] > 50_000, default  # 256 MB of 4 KB pages faulted in again
    assert fast[0] < 5_000, fast  # reused
    assert fast[1] > default[1] + 200, (fast, default)  # and kept resident after free
    assert bounded[1] < default[1] + 50, (bounded, default)  # "bounded" gives big chunks back


def test_xla_cpu_flags_are_merged_and_the_users_win():
    (flag,) = runtime.XLA_CPU_FLAGS
    assert runtime.merged_xla_flags("") == flag
    mine = "--xla_force_host_platform_device_count=8 --xla_cpu_enable_concurrency_optimized_scheduler=true"
    assert runtime.merged_xla_flags(mine) == mine  # already set: the user's value stays, no second copy
    merged = runtime.merged_xla_flags("--xla_force_host_platform_device_count=8")
    assert merged == f"--xla_force_host_platform_device_count=8 {flag}"
    assert runtime.merged_xla_flags(merged) == merged  # idempotent
    assert runtime.malloc_env(_clean_env(JAX_PLATFORMS="cpu"))["XLA_FLAGS"] == flag
    assert "XLA_FLAGS" not in runtime.malloc_env(_clean_env(CAI_JAX_XLA_CPU="0"))  # turned off
    assert "XLA_FLAGS" not in runtime.malloc_env(_clean_env(JAX_PLATFORMS="cuda"))  # not for accelerators
    # the in-process path (no re-exec needed: the tunables are off) still sets them for JAX
    code = (
        f"import os, sys; sys.path.insert(0, {str(ROOT)!r}); from cai_jax import runtime;"
        "runtime.reexec_with_malloc_tunables(); print(os.environ.get('XLA_FLAGS'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=_clean_env(CAI_JAX_MALLOC="0", JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == flag, out.stdout


# The temporaries (bytes) XLA's CPU backend plans for the gradient of a sum of 16 independent
# matmul branches: run in order for concurrency, their [256, 256] intermediates are live together.
_TEMPS = """
import jax, jax.numpy as jnp
def f(x, ws):
    return sum(jnp.tanh(x @ w).sum() for w in ws)
x, ws = jnp.ones((256, 256)), [jnp.full((256, 256), float(i)) for i in range(16)]
print(jax.jit(jax.grad(f, argnums=1)).lower(x, ws).compile().memory_analysis().temp_size_in_bytes)
"""


def test_the_xla_cpu_flags_keep_fewer_temporaries_alive():
    def temps(env):
        env = {**env, "JAX_PLATFORMS": "cpu"}
        return int(
            subprocess.run([sys.executable, "-c", _TEMPS], env=env, capture_output=True, text=True, check=True).stdout
        )

    default = temps(_clean_env(CAI_JAX_XLA_CPU="0"))
    ours = temps(runtime.malloc_env(_clean_env(CAI_JAX_MALLOC="0", JAX_PLATFORMS="cpu")))
    assert ours * 4 <= default, (ours, default)  # measured: 256 KiB vs 2 MiB
