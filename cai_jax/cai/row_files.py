"""Rows of a prompt or comparison source, for the loaders in prompts.py, pmp.py and train/pm_data.py.

    for row_no, row in read_rows("prompts.jsonl", split=None):   # row: a dict or a bare string
        ...

Local ".jsonl", ".json" and ".txt" files (each optionally gzipped) are read here, line-aware, so
an error names the file and row; parquet / arrow / csv files, folders and "org/name" hub datasets
go to the `datasets` library (offline unless the user has the hub). Every failure is a
`PromptSourceError` whose message names the source, row and field it could.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["PromptSourceError", "source_error", "read_rows", "read_jsonl"]

# Files read by our own line-aware readers (so errors carry line numbers); others go to `datasets`.
_OWN_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".txt", ".txt.gz")
_DATASETS_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
_HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")


class PromptSourceError(ValueError):
    """A prompt source that cannot be read; the message names the file, row and field."""


def source_error(source: Any, row: int | None, field: str | None, problem: str) -> PromptSourceError:
    """The error for `source`, row and field (each left out when unknown)."""
    where = [str(source)] + ([f"row {row}"] if row is not None else []) + ([f"field {field!r}"] if field else [])
    return PromptSourceError(f"{': '.join(where)}: {problem}")


# Readers yield (1-based row number, row), the row a dict or a bare string.


def _open_text(path: Path):
    """Opens a text file for reading, gunzipping a ".gz" one."""
    return gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else open(path, encoding="utf-8")


def read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """One row per non-blank line; row numbers are line numbers."""
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue  # a blank line (often the last) is not a row
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise source_error(path, lineno, None, f"invalid JSON line ({e.msg})") from None


def _read_json(path: Path) -> Iterator[tuple[int, Any]]:
    """The rows of a JSON list (or of an object's one list value); row numbers are list positions."""
    with _open_text(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise source_error(path, None, None, f"invalid JSON at line {e.lineno} ({e.msg})") from None
    if isinstance(data, dict):
        # {"prompts": [...]} or {"data": [...]}: the one list-valued key is the rows.
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise source_error(path, None, None, "expected a list of prompts (or an object with exactly one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise source_error(path, None, None, f"expected a list of prompts, got {type(data).__name__}")
    yield from enumerate(data, start=1)  # row = 1-based list index


def _read_txt(path: Path) -> Iterator[tuple[int, Any]]:
    """One prompt per non-blank line; row numbers are line numbers."""
    with _open_text(path) as f:
        yield from ((lineno, line) for lineno, line in enumerate(f, start=1) if line.strip())


@contextlib.contextmanager
def _hub_offline():
    """Forbids hub downloads unless HF_HUB_OFFLINE=0, as models/loading.py does for weights.

    Both libraries read their offline flag from a module constant at call time, so setting it for
    the duration of one load works; datasets then serves a hub name from its local cache only.
    """
    if os.environ.get("HF_HUB_OFFLINE", "1") == "0":
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def _read_datasets(source: str, split: str | None, local: Path | None) -> Iterator[tuple[int, Any]]:
    """Rows of a `datasets` source: a save_to_disk folder, a data-files folder/file, or a hub name."""
    import datasets

    saved = local is not None and ((local / "state.json").exists() or (local / "dataset_dict.json").exists())
    with _hub_offline():
        try:
            if saved:
                ds = datasets.load_from_disk(str(local))
            elif local is not None and local.is_file():
                ds = datasets.load_dataset(
                    _DATASETS_BUILDERS[local.suffix], data_files=str(local), split=split or "train"
                )
            else:
                ds = datasets.load_dataset(source, split=split)  # data-files folder or hub name
        except (FileNotFoundError, ConnectionError) as e:
            hint = "" if os.environ.get("HF_HUB_OFFLINE", "1") == "0" else " (set HF_HUB_OFFLINE=0 to allow a download)"
            raise source_error(source, None, None, f"cannot load with datasets ({e}){hint}") from e
    if isinstance(ds, datasets.DatasetDict):
        if split is None and len(ds) != 1:
            raise source_error(source, None, None, f"has splits {sorted(ds)}; pass split=")
        if split is not None and split not in ds:
            raise source_error(source, None, None, f"no split {split!r} (has {sorted(ds)})")
        ds = ds[split] if split is not None else next(iter(ds.values()))
    yield from enumerate(ds, start=1)  # row = 1-based dataset index


def read_rows(source: str, split: str | None) -> Iterator[tuple[int, Any]]:
    """Rows of a path or hub name, by file type."""
    path = Path(source)
    if path.is_file():
        if path.name.endswith((".jsonl", ".jsonl.gz")):
            return read_jsonl(path)
        if path.name.endswith((".json", ".json.gz")):
            return _read_json(path)
        if path.name.endswith((".txt", ".txt.gz")):
            return _read_txt(path)
        if path.suffix in _DATASETS_BUILDERS:
            return _read_datasets(source, split, path)
        kinds = ", ".join(_OWN_SUFFIXES + tuple(_DATASETS_BUILDERS))
        raise source_error(source, None, None, f"unsupported file type (expected one of {kinds})")
    if path.is_dir():
        return _read_datasets(source, split, path)
    if _HUB_NAME.match(source):
        return _read_datasets(source, split, None)
    raise source_error(source, None, None, "no such file or folder (and not an 'org/name' hub dataset)")
