"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half of one.

Every write goes to a temporary file beside the target, named `<name>.<pid>-<random>.tmp` (unique,
so processes writing the same file at once cannot clobber each other's halves; ending in ".tmp",
which run-folder listings skip), is flushed and fsynced, then renamed over the target with
`os.replace`, and the folder is fsynced so the rename itself survives a crash. A write that fails
removes its temporary file; one killed mid-write leaves it behind, where it is never mistaken for
the target (`cai_jax.jobs` removes its own on the next run). `fsync=False` skips both fsyncs for
files that are cheap to remake (a report page); the rename stays atomic.

    from cai_jax import atomic
    atomic.write_json(path, obj, indent=2)       # exactly json.dumps(obj, indent=2), nothing added
    atomic.write_jsonl(path, rows)               # one json.dumps(row, ensure_ascii=False) a line
    atomic.write_text(path, text)
    with atomic.replacing(path) as tmp:          # for writers that take a file name
        safetensors.numpy.save_file(tensors, str(tmp))

Text is UTF-8. A folder swapped into place whole (`checkpoints.pm.save_pm`, the GGUF converter) is
atomic by its own rename and does not go through here.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["replacing", "write_json", "write_jsonl", "write_text"]


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory handles (Windows): the rename is what we have
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yields a temporary path to write `path`'s new content to; renames it over `path` on success.

    On an exception the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    if fsync:
        _fsync_folder(path.parent)


def write_text(path: str | os.PathLike, text: str, *, fsync: bool = True) -> Path:
    """Writes `text` (UTF-8) to `path` atomically; returns `path`."""
    with replacing(path, fsync=fsync) as tmp:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, *, fsync: bool = True, **dumps: Any) -> Path:
    """Writes `json.dumps(obj, **dumps)` to `path` atomically (no newline added); returns `path`."""
    return write_text(path, json.dumps(obj, **dumps), fsync=fsync)


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any], *, fsync: bool = True) -> Path:
    """Writes one `json.dumps(row, ensure_ascii=False)` line per row to `path` atomically."""
    return write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), fsync=fsync)
