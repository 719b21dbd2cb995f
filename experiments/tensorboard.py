"""TensorBoard event files from a stage's metrics.jsonl, when a TensorBoard writer is installed.

metrics.jsonl stays the source of truth (the loops write it one step late, on process 0); after a
training stage the launcher copies its numeric fields into `<workdir>/tensorboard/<stage>/` with
the first writer it finds: `tensorboardX`, then `torch.utils.tensorboard`. With neither, nothing
is written (`log.tensorboard` has no effect) and the launcher says so once.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)


def _writer_class():
    try:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    except ImportError:
        pass
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter
    except ImportError:
        return None


def export_metrics(metrics_file: Path, out_dir: Path) -> int:
    """Writes every finite numeric field of every row as a scalar at its step; returns the count.

    Rows a resumed run repeated are written once (the last one of each step wins).
    """
    writer_cls = _writer_class()
    if writer_cls is None:
        log.info("log.tensorboard: neither tensorboardX nor torch.utils.tensorboard is installed; skipped")
        return 0
    rows: dict[int, dict] = {}
    for line in Path(metrics_file).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[int(row["step"])] = row
    written = 0
    writer = writer_cls(str(out_dir))
    try:
        for step in sorted(rows):
            for key, value in rows[step].items():
                if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                if math.isfinite(value):
                    writer.add_scalar(key, value, step)
                    written += 1
    finally:
        writer.close()
    return written
