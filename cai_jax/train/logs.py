"""The fit loop's per-step logs: JSONL files written as the run goes and cut back on resume.

    logger = MetricsLogger(f"{workdir}/metrics.jsonl",
                           attachments={"samples": JsonlLog(f"{workdir}/samples.jsonl", key="iteration")})
    logger.resume(restored_step)                   # drops the rows of steps after the checkpoint
    logger.push(step, device_metrics, {"batch_id": batch_id}, {"samples": rows})
    logger.flush()                                 # before a checkpoint and at the end
    logger.close()

Resume invariant: a run resumed from checkpoint k leaves exactly the files an uninterrupted run
would have (up to timing fields). A kill -9 may have left rows of steps after k, and half a last
line; `resume(k)` cuts every file back to its rows of steps <= k (at a fresh start, k = 0: to
nothing), and the resumed steps write k + 1, ... again. Rows of one file are appended in step
order, so the rows kept are a prefix of the file and the cut is one `truncate`.

Why cut back on resume rather than hold rows back and write them when the checkpoint commits:
rows would then appear only once per checkpoint interval (a user tailing metrics.jsonl, or
reading it into TensorBoard, would wait a whole interval), and two writes (the checkpoint, the
rows) still leave a window between them that only a cut on resume closes. The loop writes a
step's rows before it saves that step (it flushes first), so the cut never drops a row that
the restored checkpoint has seen.

Only process 0 writes (and cuts) the files; every process fetches and checks the metrics.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from cai_jax.train.steps import check_finite

__all__ = ["METRICS_SINKS", "JsonlLog", "MetricsLogger"]

# Callables sink(metrics file path, row) that also get every row a MetricsLogger writes (on the
# process that writes the file): the entry points register optional loggers here, e.g. Weights &
# Biases (experiments/wandb_log.py), so the loops stay free of them.
METRICS_SINKS: list[Callable[[str, dict], None]] = []


class JsonlLog:
    """One JSON object per line, appended; `resume(step)` keeps the rows whose `key` is <= step.

    Args:
      path: the file (its folder is created).
      key: the row field that holds the step the row belongs to ("step"; PPO's samples: "iteration").
      ensure_ascii: `json.dumps`'s (False keeps non-ASCII text readable, as in samples).
    """

    def __init__(self, path: str | os.PathLike, *, key: str = "step", ensure_ascii: bool = True):
        self.path, self.key, self.ensure_ascii = os.fspath(path), key, ensure_ascii
        self.writes = jax.process_index() == 0
        self._file = None
        if self.writes:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)

    def resume(self, step: int) -> int:
        """Cuts the file back to its rows of steps <= `step` (creating it if absent); returns rows dropped.

        A last line without its newline (a write cut by a kill) is dropped too.

        Raises:
          ValueError: a complete line that is not a JSON object with an integer `key`, naming the line.
        """
        if not self.writes:
            return 0
        self.close()
        keep, dropped = 0, 0
        with open(self.path, "ab+") as f:
            f.seek(0)
            for number, line in enumerate(f, start=1):
                if not line.endswith(b"\n"):
                    dropped += 1  # half a row: the kill came mid-write
                    break
                try:
                    at = int(json.loads(line)[self.key])
                except (ValueError, TypeError, KeyError) as e:
                    raise ValueError(f"{self.path}:{number}: not a JSON row with an integer {self.key!r} ({e})") from e
                if at > step:
                    dropped += 1 + sum(1 for _ in f)
                    break
                keep += len(line)
            f.truncate(keep)
        return dropped

    def write(self, row: Mapping[str, Any]) -> None:
        """Appends `row` as one line (process 0 only) and flushes it to the OS."""
        if not self.writes:
            return
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115  (kept open; closed in close())
        self._file.write(json.dumps(dict(row), ensure_ascii=self.ensure_ascii) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class MetricsLogger:
    """Writes one row per step to `path`, fetching each step's metrics one step late.

    `push(step, metrics, extra, attached)` stores the new (device) metrics and fetches, checks and
    writes the ones pushed before, so the host waits on step k only after step k + 1 has been
    dispatched. `flush()` fetches whatever is pending (call it before a checkpoint and at the
    end). A fetched row goes through `check_finite` (with `check`) before anything of its step is
    written, so a non-finite step raises FloatingPointError naming its step (`unit`) and batch id;
    the rows before it are on disk. Then the row is written, and `attached` rows (e.g. PPO's
    samples) go to the `attachments` log of the same name: a step's side rows exist only when its
    metrics row does.

    `tokens_per_s` is `extra["tokens_in_batch"]` (real tokens) over the wall time between
    consecutive fetches (the first row's includes compilation). With `flops_per_token` (see
    `train.flops.model_flops_per_token`) and `peak_flops` (the whole mesh's peak FLOP/s) each row
    also gets `mfu` = tokens_per_s * flops_per_token / peak_flops. Only process 0 writes files.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        check: bool = True,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
        unit: str = "step",
        attachments: Mapping[str, JsonlLog] | None = None,
    ):
        self.log = JsonlLog(path, key="step")
        self.path = self.log.path
        self.check, self.unit = check, unit
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.attachments = dict(attachments or {})
        self._pending: tuple[int, Any, dict, Mapping] | None = None
        self._last_fetch = time.perf_counter()
        self.rows: list[dict] = []  # every row written by this logger, for callers and tests

    def resume(self, step: int) -> None:
        """Cuts the metrics file and every attachment back to the rows of steps <= `step`."""
        for log in (self.log, *self.attachments.values()):
            log.resume(step)

    def push(
        self, step: int, metrics: dict, extra: dict | None = None, attached: Mapping[str, list] | None = None
    ) -> dict | None:
        """Queues step `step`'s device metrics (and side rows); returns the previous step's row (or None)."""
        row = self.flush()
        self._pending = (int(step), metrics, dict(extra or {}), dict(attached or {}))
        return row

    def flush(self) -> dict | None:
        """Fetches, checks and writes the pending step's metrics; returns its row (or None)."""
        if self._pending is None:
            return None
        step, metrics, extra, attached = self._pending
        self._pending = None
        host = jax.device_get(metrics)
        now = time.perf_counter()
        dt, self._last_fetch = now - self._last_fetch, now
        row = {"step": step, **{k: float(np.asarray(v)) for k, v in host.items()}}
        for k, v in extra.items():
            row[k] = v
        if "tokens_in_batch" in extra and dt > 0:
            row["tokens_per_s"] = float(extra["tokens_in_batch"]) / dt
            if self.flops_per_token and self.peak_flops:
                row["mfu"] = row["tokens_per_s"] * self.flops_per_token / self.peak_flops
        if self.check:
            check_finite(row, step, extra.get("batch_id"), unit=self.unit)
        self.rows.append(row)
        self.log.write(row)
        if self.log.writes:
            for sink in METRICS_SINKS:
                sink(self.path, row)
        for name, rows in attached.items():
            for r in rows:
                self.attachments[name].write(r)
        return row

    def close(self) -> None:
        """Drops (does not fetch) anything pending and closes the files."""
        self._pending = None
        for log in (self.log, *self.attachments.values()):
            log.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
