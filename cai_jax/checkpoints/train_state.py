"""Resumable training checkpoints: the train state pytree plus the data position, via orbax.

API choice: orbax-checkpoint's ``CheckpointManager`` with ``args=`` objects
(``ocp.args.Composite`` of ``StandardSave``/``StandardRestore`` and ``JsonSave``/``JsonRestore``).
It is the stable, documented API of orbax 0.12 (the ``items=``/``checkpointers=`` form is
deprecated; ``orbax.checkpoint.v1`` is still experimental). Each step folder holds two items:

* ``state``: any pytree of jax/numpy arrays (params, optax state, step, PRNG keys), written with
  each array's sharding so every host writes only its own shards.
* ``data``: a small JSON dict with the data position, e.g. ``{"epoch": 0, "position": 123,
  "seed": 0}``, so a resumed run reads exactly the batches the killed run would have read next.

Typed PRNG keys (``jax.random.key``) are stored as their raw ``uint32`` key data
(``jax.random.key_data``) and wrapped back (``jax.random.wrap_key_data``) with the implementation
of the matching leaf of the restore target. That keeps the files plain arrays, readable without
knowing the key implementation, and independent of orbax's own (version-dependent) key support;
the cost is that a key comes back as a key only when ``restore`` is given a target.

Saves are atomic (orbax writes ``<step>.orbax-checkpoint-tmp`` and renames it when complete), so a
run killed mid-save keeps its previous checkpoint: `latest_step` and `restore` ignore the partial
folder, and the next save of that step replaces it.
``Checkpointer(None)`` is the same object with checkpointing off (benchmarks, tests): nothing
is restored or saved. The loop that uses it is `train.fit.fit` (only it and ``experiments/``
touch checkpoints)::

    ckpt = Checkpointer(CheckpointConfig.from_config(cfg.checkpoint))
    if ckpt.latest_step() is not None:
        state, data_state = ckpt.restore(target=jax.eval_shape(init_fn, rng))
    while step < total:
        state, metrics = train_step(state, batch)
        # ... fetch metrics and check them finite (the loop's job) before saving this state
        ckpt.save(step, state, data_state, force=step == total)
    ckpt.close()
"""

from __future__ import annotations

import collections.abc
import dataclasses
import errno
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from cai_jax import profiling


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Where and how often to checkpoint (the ``checkpoint`` sub-dict of a stage config).

    No field has a default: `configs/base.py`'s `checkpoint` section is their one home.
    """

    directory: str  # folder holding one sub-folder per saved step
    save_every_steps: int  # optimizer steps between saves (the last step is saved with force=True)
    keep_last: int | None  # number of most recent checkpoints kept; None keeps all
    async_save: bool  # write in a background thread (the call still copies arrays to host first)

    def __post_init__(self):
        if not self.directory:
            raise ValueError("checkpoint.directory must be a non-empty path")
        if int(self.save_every_steps) < 1:
            raise ValueError(f"checkpoint.save_every_steps must be >= 1, got {self.save_every_steps}")
        if self.keep_last is not None and int(self.keep_last) < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1 or None, got {self.keep_last}")

    @classmethod
    def from_config(cls, cfg: Any) -> CheckpointConfig:
        """Builds from a ConfigDict or mapping; an unknown or missing field is a ValueError naming it."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        items = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
        unknown = sorted(set(items) - set(fields))
        if unknown:
            raise ValueError(f"unknown checkpoint config field(s) {unknown} (expected some of: {', '.join(fields)})")
        missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING and n not in items]
        if missing:
            raise ValueError(f"checkpoint config is missing required field(s) {missing}")
        return cls(**items)


def _is_key(x: Any) -> bool:
    return isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _key_impl(x: jax.Array | jax.ShapeDtypeStruct):
    """The PRNG implementation of a key array or an abstract key (`jax.random.key_impl` takes arrays only)."""
    if isinstance(x, jax.Array):
        return jax.random.key_impl(x)
    return x.dtype._impl  # KeyTy carries its implementation; there is no public accessor for abstract keys


def _keys_to_data(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _key_data_target(x: Any) -> Any:
    """The uint32 key-data leaf to restore in place of a key leaf of the target."""
    if isinstance(x, jax.Array):
        return jax.random.key_data(x)
    shape = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype)).shape
    # A key's sharding covers its leading dims; it applies unchanged to the trailing key-data dim.
    return jax.ShapeDtypeStruct(shape, np.uint32, sharding=getattr(x, "sharding", None))


class Checkpointer:
    """Saves and restores (train state, data state) pairs under one folder with orbax.

    A step is saved when ``step % save_every_steps == 0``, when ``force=True`` (the loop's last
    step), or when orbax sees a preemption signal; the ``keep_last`` most recent are kept. Unlike
    orbax's default policy, the very first step is *not* saved implicitly, so the saved steps are
    predictable from the config.

    ``Checkpointer(None)`` saves and restores nothing: `latest_step` is None, `save` and
    `should_save` are False (a run that must not write checkpoints, e.g. a benchmark).
    """

    def __init__(self, cfg: CheckpointConfig | None):
        self.cfg = cfg
        self._manager = None
        if cfg is None:
            self.directory = None
            return
        self.directory = os.path.abspath(os.fspath(cfg.directory))
        policy = ocp.checkpoint_managers.AnySavePolicy(
            [
                ocp.checkpoint_managers.FixedIntervalPolicy(int(cfg.save_every_steps)),
                ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep_last,
            save_interval_steps=int(cfg.save_every_steps),
            save_decision_policy=policy,
            enable_async_checkpointing=bool(cfg.async_save),
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @profiling.phase("checkpoint")
    def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
        """Saves `state` (a pytree of arrays) and `data_state` (a JSON dict) as `step` if due.

        Returns whether a save was started (with ``async_save`` it completes in the background;
        `wait` blocks until it is on disk). Arrays are copied off the device before this returns,
        so the caller may donate `state` to the next step. A step that is already saved is left as
        it is (False), so "save at the end" after a resume of a finished run is harmless.
        """
        if not isinstance(data_state, collections.abc.Mapping):
            raise TypeError(f"data_state must be a dict, got {type(data_state).__name__}")
        try:
            json.dumps(dict(data_state))
        except TypeError as e:
            raise TypeError(f"data_state must hold JSON values only (cast numpy scalars to int/float): {e}") from None
        if self._manager is None or int(step) in self._manager.all_steps():
            return False
        if force or self._manager.should_save(int(step)):
            self._check_space(int(step), state)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_keys_to_data(state)), data=ocp.args.JsonSave(dict(data_state))
        )
        return bool(self._manager.save(int(step), args=args, force=force))

    def _check_space(self, step: int, state: Any) -> None:
        """Refuses a save the disk cannot hold, before orbax starts writing it.

        A write that runs out of space inside orbax's writer threads fails with hundreds of lines
        from its threads and leaves a temporary folder; checking first fails cleanly and leaves the
        earlier checkpoints as they were. The estimate is the state's size in bytes (this process's
        share on several hosts); the floats of a train state barely compress, so it is close.

        Raises:
          OSError: ENOSPC, naming the step, the bytes needed and the free bytes of the folder.
        """
        need = sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(state)) // jax.process_count()
        os.makedirs(self.directory, exist_ok=True)
        free = shutil.disk_usage(self.directory).free
        if free < need:
            raise OSError(
                errno.ENOSPC,
                f"No space left on device: the checkpoint of step {step} needs {need / 1e6:.1f} MB, "
                f"{free / 1e6:.1f} MB are free",
                self.directory,
            )

    @profiling.phase("checkpoint")
    def restore(self, step: int | None = None, target: Any = None) -> tuple[Any, dict]:
        """Returns ``(state, data_state)`` saved at `step` (default: the latest).

        Args:
          step: the step to restore; None means `latest_step()`.
          target: a pytree like the saved state, of arrays or ``jax.ShapeDtypeStruct`` (e.g. from
            ``jax.eval_shape(init_fn, rng)``, with ``sharding`` set for sharded restores). The
            restored state takes its structure, dtypes and shardings, and key leaves come back as
            typed PRNG keys. Without a target, orbax's stored metadata decides (containers come
            back as dicts/lists, keys as their uint32 key data).

        Raises:
          FileNotFoundError: when there is no checkpoint (or no checkpoint at `step`).
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
        elif int(step) not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory} (have {self.all_steps()})")
        raw_target = (
            None if target is None else jax.tree.map(lambda x: _key_data_target(x) if _is_key(x) else x, target)
        )
        out = self._manager.restore(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardRestore(raw_target), data=ocp.args.JsonRestore()),
        )
        state = out["state"]
        if target is not None:
            state = jax.tree.map(
                lambda t, x: jax.random.wrap_key_data(x, impl=_key_impl(t)) if _is_key(t) else x, target, state
            )
        return state, dict(out["data"])

    def latest_step(self) -> int | None:
        """The most recent completed checkpoint's step, or None."""
        return None if self._manager is None else self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of the kept checkpoints, ascending."""
        return [] if self._manager is None else sorted(self._manager.all_steps())

    def describe_latest(self, unit: str = "step") -> str:
        """The latest checkpoint for an error message: "step 3 in DIR", "none yet in DIR" or "none (off)"."""
        if self._manager is None:
            return "none (checkpointing is off)"
        last = self.latest_step()
        return f"{unit} {last} in {self.directory}" if last is not None else f"none yet in {self.directory}"

    def should_save(self, step: int) -> bool:
        """Whether `save(step, ...)` without force would write (lets a loop skip host-side work)."""
        return self._manager is not None and bool(self._manager.should_save(int(step)))

    @profiling.phase("checkpoint")
    def wait(self) -> None:
        """Blocks until any background save is on disk."""
        if self._manager is not None:
            self._manager.wait_until_finished()

    @profiling.phase("checkpoint")
    def close(self) -> None:
        """Finishes pending saves and releases orbax's threads."""
        if self._manager is not None:
            self._manager.close()
