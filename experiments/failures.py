"""Every failure of a launch as one line: `error: <what>, <where>`, exit code 2.

    try:
        run_pipeline(...)
    except BaseException as e:
        print(failure_line(e, cfg), file=sys.stderr)   # the traceback only at --log-level DEBUG

`<what>` is the message of the error the stage (or the launcher) raised, which names the file,
row or field where our code found the problem; `<where>` is the stage it happened in
(`StageFailed`, raised by the pipeline around each stage) and, for an `OSError`, the path and the
config field or flag that named it. A full disk is said as such wherever in the chain it appears
(orbax reports it from its writer threads inside other exceptions), with what is kept.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

__all__ = ["StageFailed", "failure_line", "is_disk_full"]


class StageFailed(RuntimeError):
    """A stage raised; the original error is `__cause__`."""

    def __init__(self, stage: str):
        super().__init__(f"stage {stage}")
        self.stage = stage


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)


def is_disk_full(e: BaseException) -> bool:
    """Whether `e` or an error it was raised from is ENOSPC (or says so in its message)."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(x) or "Disk quota exceeded" in str(x):
            return True
    return False


def _flat(cfg: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if cfg is None:
        return
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    for k, v in cfg.items() if isinstance(cfg, Mapping) else ():
        if isinstance(v, Mapping) or hasattr(v, "to_dict"):
            yield from _flat(v, f"{prefix}{k}.")
        elif isinstance(v, (list, tuple)):
            for item in v:
                yield f"{prefix}{k}", item
        else:
            yield f"{prefix}{k}", v


def _field_of(path: str, cfg: Any, flags: Iterable[tuple[str, str]]) -> str | None:
    """The flag or config field whose value is `path` or a folder above it."""

    def names(value: Any) -> bool:
        return (
            isinstance(value, str)
            and value not in ("", ".")
            and (path == value or path.startswith(value.rstrip("/") + "/"))
        )

    for flag, value in flags:
        if names(value):
            return flag
    for field, value in _flat(cfg):
        if names(value):
            return f"--config.{field}"
    return None


def _one_line(text: str, limit: int = 600) -> str:
    text = " ".join(part.strip() for part in text.strip().splitlines() if part.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _message(e: BaseException) -> str:
    """What went wrong: the outermost error below `StageFailed`, following explicit causes only
    (an error raised while another was being handled is not about that one)."""
    x = e
    while isinstance(x, StageFailed) and x.__cause__ is not None:
        x = x.__cause__
    text = str(x)
    if isinstance(x, (OSError, ValueError, LookupError, RuntimeError)) and text:
        return _one_line(text)
    return _one_line(f"{type(x).__name__}: {text}" if text else type(x).__name__)


def failure_line(e: BaseException, cfg: Any = None, flags: Iterable[tuple[str, str]] = ()) -> str:
    """`error: <what>, <where>` for the exception `e` of a launch.

    Args:
      e: what the launch raised.
      cfg: the run's ConfigDict, if it was loaded (to name the field a failing path came from).
      flags: (flag, value) pairs of the launcher's path flags (e.g. ("--workdir", "runs/x")).
    """
    flags = list(flags)
    stage = next((x.stage for x in _chain(e) if isinstance(x, StageFailed)), None)
    where = f"in stage {stage}" if stage else "before any stage ran"
    if isinstance(e, KeyboardInterrupt) or any(isinstance(x, KeyboardInterrupt) for x in _chain(e)):
        return f"error: interrupted, {where}; run the same command again to resume"
    oserror = next((x for x in _chain(e) if isinstance(x, OSError) and x.filename), None)
    path = str(oserror.filename) if oserror is not None else None
    field = _field_of(path, cfg, flags) if path else None
    at = f" (writing {path})" if path else ""
    if is_disk_full(e):
        detail = next((str(x.strerror) for x in _chain(e) if isinstance(x, OSError) and x.strerror), "")
        detail = detail.partition("No space left on device")[2].lstrip(": ")
        at = f" ({detail}; writing {path})" if detail and path else at
        kept = (
            "finished stages and the last complete checkpoint are kept; the one being written is left "
            "out; free space and run the same command again to resume"
        )
        return f"error: no space left on device{at}, {where}; {kept}"
    what = _message(e).rstrip(".")
    if path and path not in what:
        what += f": {path}"
    if field:
        what += f" (from {field})"
    return f"error: {what}, {where}"
