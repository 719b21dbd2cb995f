"""Where a stage's seconds go: XLA compilation, checkpoints, model exports and loads, the rest.

    before = profiling.snapshot()
    ...                                               # run a stage
    profiling.since(before, seconds)                  # {"compile_s": 4.1, "checkpoint_s": 0.8,
                                                      #  "export_s": 1.2, "load_s": 0.3, "run_s": 20.6,
                                                      #  "cache": {"hits": 41, "misses": 3},
                                                      #  "peak_rss_gb": 9.7}

    with profiling.phase("export"):                   # or @profiling.phase("export") on a function
        ...

One process-wide accumulator. Time is counted exclusively: a second inside nested phases counts
for the innermost one only, and a second JAX spends compiling inside a phase counts as compile,
not as that phase. So compile and the phases are disjoint, and on one thread their sum never
exceeds the wall time; what a stage spent outside all of them is `run_s` (device steps,
sampling, host work).

Compile time is read from JAX's monitoring events (the names below, from jax._src.dispatch):
tracing to a jaxpr, lowering to MLIR and the backend (XLA) compile of every jitted program,
eager ops' programs included. Each event announces its start (a scalar event) and reports its
duration at its end; only the outermost of nested events on a thread is counted, so nothing is
counted twice. A persistent-cache hit is compile time too (reading the executable back), and is
counted in `cache` (cai_jax/compile_cache.py). `cache` stays zero when that cache is off.

Phases are opened by the few functions that write or read files in bulk: `Checkpointer` save,
restore, wait and close ("checkpoint", cai_jax/checkpoints/train_state.py), `save_hf_checkpoint`
and `save_pm` ("export"), reading safetensors files ("load", cai_jax/checkpoints/hf.py).

Memory: `snapshot` resets the process's peak resident size (Linux: "5" into /proc/self/clear_refs
sets VmHWM to the current resident size) and `since` reads it back, so `peak_rss_gb` is the
highest resident size since the snapshot, in 1e9 bytes: what the stage itself needed, plus what
earlier stages left resident (under the malloc tunables of cai_jax/runtime.py freed memory stays
resident). The reset is process-wide: the kernel's own peak (getrusage's ru_maxrss, what
`/usr/bin/time` reports) restarts with it. None where the system does not say.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time

from cai_jax import compile_cache

__all__ = ["COLUMNS", "PHASES", "install", "peak_memory_gb", "phase", "since", "snapshot"]

PHASES = ("checkpoint", "export", "load")  # the names `phase` accepts
# timings.json's keys beside "seconds", "resumed" and "cache", in the report's column order.
COLUMNS = ("compile_s", "checkpoint_s", "export_s", "load_s", "run_s")
COMPILE_EVENTS = frozenset(
    (
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    )
)

_lock = threading.Lock()
_totals = dict.fromkeys(("compile", *PHASES), 0.0)  # seconds so far in this process (compile: since `install`)
_local = threading.local()  # .frames: open phases of this thread; .depth: open compile events
_installed = False
_clock = time.perf_counter  # a test may substitute its own


class _Frame:
    __slots__ = ("name", "start", "excluded")

    def __init__(self, name: str):
        self.name, self.start, self.excluded = name, _clock(), 0.0


def _frames() -> list[_Frame]:
    if not hasattr(_local, "frames"):
        _local.frames = []
    return _local.frames


def _add(name: str, seconds: float) -> None:
    with _lock:
        _totals[name] += seconds


def _compile_started(event: str, value, **kwargs) -> None:
    if event in COMPILE_EVENTS:
        _local.depth = getattr(_local, "depth", 0) + 1


def _compile_ended(event: str, duration: float, **kwargs) -> None:
    depth = getattr(_local, "depth", 0)
    if event not in COMPILE_EVENTS or depth == 0:  # depth 0: started before `install`
        return
    _local.depth = depth - 1
    if depth == 1:
        _add("compile", duration)
        frames = _frames()
        if frames:
            frames[-1].excluded += duration


def install() -> None:
    """Starts counting compile time (JAX's monitoring listeners); calling it again does nothing."""
    import jax

    global _installed
    with _lock:
        if _installed:
            return
        jax.monitoring.register_scalar_listener(_compile_started)
        jax.monitoring.register_event_duration_secs_listener(_compile_ended)
        _installed = True


class phase(contextlib.ContextDecorator):
    """Counts the time inside as `name` (one of PHASES), less nested phases' and compile time.

    A context manager, or a decorator (`@phase("export")`); one object may be entered by several
    threads or recursively (what is open lives on each thread's own stack).

    Raises:
      ValueError: `name` is not one of PHASES.
    """

    def __init__(self, name: str):
        if name not in PHASES:
            raise ValueError(f"profiling.phase({name!r}): expected one of {PHASES}")
        self.name = name

    def __enter__(self) -> phase:
        _frames().append(_Frame(self.name))
        return self

    def __exit__(self, *exc) -> None:
        frames = _frames()
        frame = frames.pop()
        elapsed = _clock() - frame.start
        _add(frame.name, elapsed - frame.excluded)
        if frames:
            frames[-1].excluded += elapsed


def _reset_peak_memory() -> None:
    if sys.platform == "linux":
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:  # not permitted here: the peak is then the process's since its start
            pass


def peak_memory_gb() -> float | None:
    """The process's peak resident size (VmHWM; since its start or the last `snapshot`), in 1e9
    bytes; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    return kb * 1024 / 1e9


def snapshot() -> dict:
    """Seconds per phase and compile seconds of this process so far, and the cache's counts;
    resets the process's peak resident size, so that `since` reports the peak from here.

    Installs the compile listener first, so the difference to a later snapshot is complete.
    """
    out = _counters()
    _reset_peak_memory()
    return out


def _counters() -> dict:
    install()
    with _lock:
        out = dict(_totals)
    out["cache"] = compile_cache.counts()
    return out


def since(before: dict, seconds: float) -> dict:
    """The profile of the `seconds` of wall time since `snapshot()` returned `before`.

    Returns {"compile_s", "checkpoint_s", "export_s", "load_s", "run_s", "cache": {"hits",
    "misses"}, "peak_rss_gb"}, seconds rounded to 0.01, the peak to 0.01 GB (None where unknown).
    `run_s` is `seconds` less the others, at least 0 (compile or phases in several threads at once
    can sum to more than the wall time).
    """
    peak = peak_memory_gb()
    now = _counters()
    spent = {name: now[name] - before[name] for name in ("compile", *PHASES)}
    out = {f"{name}_s": round(s, 2) for name, s in spent.items()}
    out["run_s"] = round(max(0.0, seconds - sum(spent.values())), 2)
    out["cache"] = {k: now["cache"][k] - before["cache"][k] for k in now["cache"]}
    return {
        **{k: out[k] for k in COLUMNS},
        "cache": out["cache"],
        "peak_rss_gb": None if peak is None else round(peak, 2),
    }
