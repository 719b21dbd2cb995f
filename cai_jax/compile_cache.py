"""JAX's persistent compilation cache: compiled XLA programs kept on disk, reused across processes.

    folder = compile_cache.enable()        # $CAI_JAX_COMPILATION_CACHE, else <user cache>/cai_jax/xla
    ...
    compile_cache.counts()                 # {"hits": 41, "misses": 3} in this process so far

A pipeline compiles the same programs again in every process that runs it: each relaunch, each
stage that resumes, each run of a sweep, each test that launches the tiny config. With the cache
on, a program compiled once (same HLO, same backend, same flags) is read back instead of compiled,
which on 2 CPU cores is most of the time of a small run. The cache key covers everything that
changes the executable, so a stale entry cannot be used: a changed model, shape or XLA flag is a
new key. Entries are written however short the compile was (a tiny model's programs are fast
to compile but there are hundreds of them).

`CAI_JAX_COMPILATION_CACHE` is a folder, or "0" to turn the cache off; the launcher's
`--no-compilation-cache` turns it off too. The default folder is `$XDG_CACHE_HOME/cai_jax/xla`
(`~/.cache/cai_jax/xla`), beside the converted embedded model.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ENV", "default_folder", "enable", "counts"]

ENV = "CAI_JAX_COMPILATION_CACHE"
_OFF = ("0", "off", "false", "no")
_COUNTS = {"hits": 0, "misses": 0}
_EVENTS = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "misses"}
_listening = False


def default_folder() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cai_jax" / "xla"


def _count(event: str, **kwargs) -> None:
    name = _EVENTS.get(event)
    if name is not None:
        _COUNTS[name] += 1


def enable(folder: str | os.PathLike | None = None) -> Path | None:
    """Turns the persistent cache on (folder: argument, else $CAI_JAX_COMPILATION_CACHE, else the default).

    Returns the folder, or None when the environment turns the cache off. Call it before the first
    compilation; calling it again with the same folder is harmless.

    Raises:
      ValueError: the folder cannot be created (names it and the variable).
    """
    import jax

    global _listening
    setting = os.environ.get(ENV, "") if folder is None else os.fspath(folder)
    if setting.strip().lower() in _OFF:
        return None
    path = Path(setting).expanduser() if setting.strip() else default_folder()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{ENV}={setting or path}: cannot create the compilation cache folder ({e})") from None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if not _listening:
        jax.monitoring.register_event_listener(_count)
        _listening = True
    return path


def counts() -> dict[str, int]:
    """Persistent-cache hits and misses of this process since `enable` (JAX's monitoring events)."""
    return dict(_COUNTS)
