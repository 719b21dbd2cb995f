"""Loop plumbing shared by the SFT and PM loops: the one jit of a train step, state shardings, metrics.

    shardings = state_shardings(state, param_shardings(model, tokens, mesh), mesh)
    step = jit_train_step(partial(sft_step, model=m, optimizer=o), shardings, batch_shardings, mesh)
    logger = MetricsLogger(workdir / "metrics.jsonl")
    for i in ...:
        state, metrics = step(state, batch)       # dispatched; the device runs ahead
        logger.push(i + 1, metrics)               # fetches step i's metrics, not step i + 1's
    logger.flush()

Fetching the previous step's metrics after dispatching the next step keeps the device busy while
the host converts, checks and writes them (nanodo's pattern).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cai_jax.sharding import DEFAULT_RULES, Rules, with_rules
from cai_jax.train.state import TrainState
from cai_jax.train.steps import check_finite

__all__ = ["jit_train_step", "state_shardings", "MetricsLogger"]


def _path(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def state_shardings(state: TrainState, param_shardings: Any, mesh: jax.sharding.Mesh) -> TrainState:
    """NamedShardings for every leaf of `state` (a TrainState of arrays or ShapeDtypeStructs).

    Params take `param_shardings`. An optimizer-state leaf (Adam's mu / nu) takes the sharding of
    the parameter whose path is a suffix of its own path and whose shape it has, so moments are
    split exactly like their params (FSDP divides them too); every other leaf (step counts, the
    empty placeholders of frozen leaves, scalars) is replicated, as are `step` and `rng`.
    """
    replicated = NamedSharding(mesh, P())
    by_path = {}
    for (path, x), s in zip(
        jax.tree_util.tree_flatten_with_path(state.params)[0], jax.tree.leaves(param_shardings), strict=True
    ):
        by_path[_path(path)] = (tuple(x.shape), s)

    def opt_leaf(path, x):
        p = _path(path)
        shape = tuple(np.shape(x))
        # Longest matching suffix first, so "a/kernel" never shadows "b/a/kernel".
        for name in sorted(by_path, key=len, reverse=True):
            want_shape, sharding = by_path[name]
            if (p == name or p.endswith("/" + name)) and shape == want_shape:
                return sharding
        return replicated

    return TrainState(
        step=replicated,
        params=param_shardings,
        opt_state=jax.tree_util.tree_map_with_path(opt_leaf, state.opt_state),
        rng=replicated,
    )


def jit_train_step(
    step_fn: Callable,
    state_shardings: Any,
    batch_shardings: Any,
    mesh: jax.sharding.Mesh,
    rules: Rules = DEFAULT_RULES,
) -> Callable:
    """`step_fn(state, batch) -> (state, metrics)` jitted once: sharded in and out, state donated.

    The returned callable enters `with_rules(mesh, rules)` around each call, so the logical
    constraints inside the model resolve to `mesh` when (and whenever) jax traces. Metrics come
    out replicated. The caller must not use the `state` it passed in after the call (donated).
    """
    replicated = NamedSharding(mesh, P())
    jitted = jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )

    def step(state, batch):
        with with_rules(mesh, rules):
            return jitted(state, batch)

    step.jitted = jitted  # for .lower() / cost analysis
    return step


class MetricsLogger:
    """Appends one JSON object per step to `path`, fetching each step's metrics one step late.

    `push(step, metrics)` stores the new (device) metrics and fetches, checks and writes the ones
    pushed before, so the host waits on step k only after step k + 1 has been dispatched.
    `flush()` fetches whatever is pending (call it before a checkpoint and at the end). Every
    fetched row goes through `check_finite` before it is written, so a non-finite step raises
    FloatingPointError naming its step; rows before it are on disk.

    `tokens_per_s` is `extra["tokens_in_batch"]` over the wall time between consecutive fetches
    (the first row's includes compilation). Only process 0 writes the file.
    """

    def __init__(self, path: str | os.PathLike, *, check: bool = True):
        self.path = os.fspath(path)
        self.check = check
        self._pending: tuple[int, Any, dict] | None = None
        self._last_fetch = time.perf_counter()
        self._file = None
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._file = open(self.path, "a")  # noqa: SIM115  (kept open across steps; closed in close())
        self.rows: list[dict] = []  # every row written by this logger, for callers and tests

    def push(self, step: int, metrics: dict, extra: dict | None = None) -> dict | None:
        """Queues step `step`'s device metrics; returns the previous step's row (or None)."""
        row = self.flush()
        self._pending = (int(step), metrics, dict(extra or {}))
        return row

    def flush(self) -> dict | None:
        """Fetches, checks and writes the pending step's metrics; returns its row (or None)."""
        if self._pending is None:
            return None
        step, metrics, extra = self._pending
        self._pending = None
        host = jax.device_get(metrics)
        now = time.perf_counter()
        dt, self._last_fetch = now - self._last_fetch, now
        row = {"step": step, **{k: float(np.asarray(v)) for k, v in host.items()}}
        for k, v in extra.items():
            row[k] = v
        if "tokens_in_batch" in extra and dt > 0:
            row["tokens_per_s"] = float(extra["tokens_in_batch"]) / dt
        if self.check:
            check_finite(row, step, extra.get("batch_id"))
        self._write(row)
        return row

    def _write(self, row: dict) -> None:
        self.rows.append(row)
        if self._file is not None:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()

    def close(self) -> None:
        """Drops (does not fetch) anything pending and closes the file."""
        self._pending = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
