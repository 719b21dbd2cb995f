"""Resumable work in a folder: sharded jobs over a list of items (the revision and feedback
engines), and cached JSON results (the eval stage's parts).

A sharded job turns a list of items (prompts) into rows, batch by batch, so that a killed run
loses at most the batch in flight and a rerun continues where it stopped with the same output:

* the folder belongs to one set of inputs: `meta.json` holds the fingerprint of the `inputs`
  dict (sha256 of its sorted-key JSON, 16 hex digits) beside the `meta` fields the caller
  records; a rerun with other inputs is refused, naming the folder and the recorded fields that
  changed (or, when they agree, the unrecorded inputs that must have);
* process `p` of `n` takes every n-th item (`cai_jax.cai.prompts.shard_for_process`) and splits
  its share into consecutive batches of `batch_size`; batch `b` becomes the shard
  `rows-p<ppp>-b<bbbbbb>.jsonl`, written atomically and fsynced (`cai_jax.atomic`). A shard on
  disk is a finished batch; a half-written one is a `*.tmp` file, never read and removed when
  the process next opens the job;
* a batch's random key depends only on (seed, process index, batch index), and the rows may
  depend on an item's global index (`Batch.indices`), never on what ran before, so a resumed
  folder's shards equal an uninterrupted run's byte for byte;
* when every batch of a process is on disk, `DONE-p<ppp>` holds the fingerprint;
* the progress bar counts steps of work (`steps_per_item` per item: e.g. the generate calls a
  prompt goes through), and the batch function ticks it after each step over the batch, so it
  moves, with tqdm's rate and ETA, within a batch and not only between batches.

    job = ShardedJob(out, kind="revision", inputs={...}, meta={...}, num_items=len(prompts),
                     batch_size=16, seed=0, process_index=0, process_count=1, steps_per_item=3)
    job.run(lambda batch: make_rows([prompts[i] for i in batch.indices], batch.key, batch.tick))
    rows = read_shards(out, "revision")            # every process's rows, (process, batch) order

A cached result (`cached_json`) is computed once and kept as one JSON file, written the same
atomic way; a rerun reads it back instead of computing it again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from cai_jax import atomic
from cai_jax.cai.prompts import shard_for_process

__all__ = [
    "SHARD_GLOB",
    "Batch",
    "Progress",
    "ShardedJob",
    "cached_json",
    "fingerprint",
    "read_shards",
    "shard_files",
    "shard_name",
]

SHARD_GLOB = "rows-p*-b*.jsonl"
META = "meta.json"


def fingerprint(inputs: Mapping[str, Any]) -> str:
    """16 hex digits of sha256 over `inputs` as sorted-key JSON."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def shard_name(process_index: int, batch: int) -> str:
    """The file name of process `process_index`'s batch `batch`; sorted names are (process, batch) order."""
    return f"rows-p{process_index:03d}-b{batch:06d}.jsonl"


def done_name(process_index: int) -> str:
    return f"DONE-p{process_index:03d}"


class Progress:
    """A progress bar counted in steps of work, with tqdm's rate and ETA (silent when disabled).

    Args:
      total: steps in all. initial: steps already done (a resumed run).
      desc: the bar's label. unit: what one step is. enabled: draw the bar.
    """

    def __init__(self, total: int, *, initial: int = 0, desc: str = "", unit: str = "step", enabled: bool = True):
        from tqdm.auto import tqdm

        self.total, self.done = int(total), int(initial)
        self._bar = tqdm(total=self.total, initial=self.done, unit=unit, desc=desc, disable=not enabled)

    def tick(self, n: int = 1) -> None:
        """`n` more steps done."""
        n = max(0, min(int(n), self.total - self.done))
        self.done += n
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


class Batch:
    """One batch of a process's share, as the batch function sees it.

    Attributes:
      index: the batch's number within this process's share (its shard: `shard_name(p, index)`).
      indices: the global positions of its items in the job's list.
      key: its jax PRNG key, `fold_in(fold_in(key(seed), process_index), index)`.
    """

    def __init__(self, index: int, indices: list[int], key: jax.Array, progress: Progress, steps: int):
        self.index, self.indices, self.key = index, indices, key
        self._progress, self._left = progress, steps * len(indices)

    def tick(self, steps: int = 1) -> None:
        """`steps` steps of work done for every item of the batch (e.g. one generate call over it).

        The bar never moves past the batch's own share: ticks beyond `steps_per_item` are dropped,
        and the job ticks whatever the batch left when its shard is written.
        """
        n = min(int(steps) * len(self.indices), self._left)
        self._left -= n
        self._progress.tick(n)

    def _settle(self) -> None:
        self._progress.tick(self._left)
        self._left = 0


class ShardedJob:
    """A resumable job over `num_items` items in `folder` (module docstring).

    Args:
      folder: the output folder (created on `claim`).
      kind: what a row is, for messages ("revision" -> "holds revisions made with ...").
      inputs: everything the rows depend on (settings, models, principles, the items ...),
        JSON-serialisable; its fingerprint guards the folder.
      meta: fields recorded in `meta.json` after the fingerprint (key order kept), and compared
        to name what changed when the fingerprint differs.
      num_items: length of the item list (the same on every process).
      batch_size: items per batch and per shard.
      seed: seeds the batch keys.
      process_index / process_count: this process's strided share.
      steps_per_item: steps of work per item on the progress bar.
      progress: draw the bar.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        kind: str,
        inputs: Mapping[str, Any],
        meta: Mapping[str, Any],
        num_items: int,
        batch_size: int,
        seed: int,
        process_index: int,
        process_count: int,
        steps_per_item: int = 1,
        progress: bool = True,
    ):
        if batch_size < 1 or steps_per_item < 1:
            raise ValueError(f"{kind} job: batch_size={batch_size} and steps_per_item={steps_per_item} must be >= 1")
        self.folder, self.kind = Path(folder), kind
        self.inputs, self.meta = dict(inputs), dict(meta)
        self.fingerprint = fingerprint(self.inputs)
        self.seed, self.process_index, self.steps = seed, process_index, steps_per_item
        self.progress = progress
        indices = shard_for_process(list(range(num_items)), process_index, process_count)
        self.batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
        self._claimed = False

    def shard_path(self, batch: int) -> Path:
        return self.folder / shard_name(self.process_index, batch)

    def claim(self) -> None:
        """Creates the folder, refuses one made with other inputs, records `meta.json` and removes
        this process's half-written shards. Runs once; `run` calls it.

        Raises:
          ValueError: the folder's fingerprint differs; nothing in it is touched.
        """
        if self._claimed:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / META
        if path.exists():
            old = json.loads(path.read_text())
            if old.get("fingerprint") != self.fingerprint:
                raise ValueError(
                    f"{self.folder}: holds {self.kind}s made with other inputs (fingerprint "
                    f"{old.get('fingerprint')} != {self.fingerprint}): {self._changes(old)}; use another "
                    "folder or delete it"
                )
        else:
            atomic.write_json(path, {"fingerprint": self.fingerprint, **self.meta}, indent=2)
        for tmp in self.folder.glob(f"rows-p{self.process_index:03d}-b*.tmp"):
            tmp.unlink(missing_ok=True)
        self._claimed = True

    def _changes(self, old: Mapping[str, Any]) -> str:
        """The recorded fields that differ from `old`'s, or the inputs not recorded."""
        new = json.loads(json.dumps(self.meta))
        changed = []
        for key, value in new.items():
            before = old.get(key)
            if isinstance(value, dict) and isinstance(before, dict):
                changed += [
                    f"{key}.{k}: {_short(before.get(k))} -> {_short(v)}" for k, v in value.items() if before.get(k) != v
                ]
            elif before != value:
                changed.append(f"{key}: {_short(before)} -> {_short(value)}")
        if changed:
            return "changed " + ", ".join(changed)
        unrecorded = [k for k in self.inputs if k not in self.meta]
        return f"the recorded {', '.join(self.meta)} agree, so one of {', '.join(unrecorded)} differs"

    def run(self, fn: Callable[[Batch], Sequence[Mapping[str, Any]]]) -> Path:
        """Runs `fn(batch) -> rows` for every batch without a shard, writing each batch's shard,
        then this process's DONE marker. Returns the folder."""
        self.claim()
        done = [b for b in range(len(self.batches)) if self.shard_path(b).exists()]
        bar = Progress(
            sum(len(idx) for idx in self.batches) * self.steps,
            initial=sum(len(self.batches[b]) for b in done) * self.steps,
            desc=f"{self.kind}s p{self.process_index}",
            enabled=self.progress,
        )
        base = jax.random.fold_in(jax.random.key(self.seed), self.process_index)
        try:
            for b, idx in enumerate(self.batches):
                path = self.shard_path(b)
                if path.exists():
                    continue
                batch = Batch(b, idx, jax.random.fold_in(base, b), bar, self.steps)
                atomic.write_jsonl(path, fn(batch))
                batch._settle()
        finally:
            bar.close()
        atomic.write_text(self.folder / done_name(self.process_index), self.fingerprint)
        return self.folder


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def shard_files(folder: str | os.PathLike, kind: str) -> list[str]:
    """Every process's shards in `folder`, in (process, batch) order.

    Raises:
      FileNotFoundError: there are none.
    """
    files = sorted(str(p) for p in Path(folder).glob(SHARD_GLOB))
    if not files:
        raise FileNotFoundError(f"{folder}: no {kind} shards ({SHARD_GLOB})")
    return files


def read_shards(folder: str | os.PathLike, kind: str) -> list[dict]:
    """Every process's rows in `folder`, in (process, batch, row) order."""
    rows = []
    for path in shard_files(folder, kind):
        with open(path, encoding="utf-8") as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows


def cached_json(path: str | os.PathLike, fn: Callable[[], Any], **dumps: Any) -> Any:
    """`fn()`'s result, computed once: read back from `path` if it exists, else computed and written
    there atomically as `json.dumps(result, **dumps)`.

    The value returned is the JSON read back in both cases (tuples become lists, keys strings, and
    a `default=` conversion applies), so a resumed run continues from exactly what a fresh one had.
    """
    path = Path(path)
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    text = json.dumps(fn(), **dumps)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, text)
    return json.loads(text)
