"""One launch per workdir: an advisory lock held for the whole launch, naming its holder.

    with workdir_lock(workdir):        # WorkdirError if another launch holds it
        ...run the stages...

The lock is `<workdir>/launch.lock`, locked with `flock(LOCK_EX | LOCK_NB)` and holding the
holder's pid, host, start time and command line as JSON. A second launch on the same workdir
exits with an error naming them. The kernel drops a flock when its process dies (kill -9 too),
so a lock file that still names a holder but can be locked is stale: its process died before it
could clear the file. It is taken over with a warning naming the dead holder. On a normal exit
the file is emptied (not removed: removing it would let a launch waiting on the old inode and one
creating a new file both believe they hold the lock).

Multi-host runs share the workdir; only process 0 takes the lock. flock over NFS depends on the
server (Linux NFSv4 maps it to byte-range locks); on a filesystem that refuses locks the launch
fails with an error saying so rather than running unprotected.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LOCK_NAME", "WorkdirError", "workdir_lock", "holder_of"]

log = logging.getLogger(__name__)

LOCK_NAME = "launch.lock"


class WorkdirError(RuntimeError):
    """A workdir that cannot be used: another config's run, another launch's lock, not a folder."""


def holder_of(lock_file: Path) -> dict | None:
    """The holder a lock file names (pid, host, since, argv), or None if it names none."""
    try:
        text = lock_file.read_text()
    except OSError:
        return None
    try:
        holder = json.loads(text) if text.strip() else None
    except json.JSONDecodeError:
        return None
    return holder if isinstance(holder, dict) else None


def _describe(holder: dict | None) -> str:
    if not holder:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    cmd = " ".join(holder.get("argv") or [])
    return f"pid {holder.get('pid')} on host {holder.get('host')} (since {since}{'; ' + cmd if cmd else ''})"


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike, *, enabled: bool = True) -> Iterator[Path | None]:
    """Holds `<workdir>/launch.lock` for the block (the workdir is created); yields the lock file.

    Args:
      workdir: the run folder.
      enabled: False yields None and locks nothing (the processes of a multi-host run other than 0).

    Raises:
      WorkdirError: another live launch holds the lock (naming its pid, host and command), or the
        filesystem does not support locks.
    """
    if not enabled:
        yield None
        return
    import fcntl

    path = Path(workdir) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkdirError(
                    f"--workdir {workdir} is in use by another launch: {_describe(holder_of(path))}. Wait for "
                    "it to finish or stop it; a killed launch's lock is released by the kernel"
                ) from None
            raise WorkdirError(f"--workdir {workdir}: cannot lock {path} ({e.strerror})") from None
        stale = holder_of(path)
        if stale:
            log.warning("%s: taking over the stale lock of %s, which is no longer running", path, _describe(stale))
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        try:
            yield path
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
