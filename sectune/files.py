"""Writing a run's files: whole or not at all (a temporary name, then a rename), and with the modes the umask gives
(``tempfile``'s and safetensors 0.8's are owner-only). ``runner`` re-exports the writers."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write to a temporary name, then rename: a reader never sees half a file."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary name, then rename: a reader never sees half a file. UTF-8 whatever the locale (a user name
    in an analysis is any text)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """:func:`write_text_atomic` for bytes (a figure). The file gets the modes the umask gives any new file, as an
    ``open`` would: ``tempfile.mkstemp`` made the figures and flow splits owner-only (0600), unreadable to a group that
    shares the project. A failed write leaves no temporary file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: after a power loss the name holds the whole file, not none of it
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A new, uniquely named folder in ``parent`` with the modes the umask gives any new folder: ``tempfile.mkdtemp``'s
    are owner-only (0700), and a cache built in one and renamed into place stayed unreadable to the rest of a group
    sharing the project's ``.cache``."""
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    tmp.chmod(0o777 & ~_umask())
    return tmp


@contextlib.contextmanager
def held(folder: Path):
    """An exclusive lock on ``folder`` (the folder itself: no lock file left beside a cache) for the ``with`` block,
    waiting for another process that holds it: two processes finishing the same shared build (a sweep's jobs, torchrun's
    ranks on a cold cache) each renamed the other's finished folder aside, and a third one's rename failed (audit AA).
    Where the file system refuses locks, none."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)


def take_lock(lock_file: Path):
    """An exclusive lock on ``lock_file`` held until the returned open file is closed (or the process exits), with this
    process's pid written in it; when another process holds it, the file is closed and what it wrote is returned
    (``"pid N"``) instead. A run dir's and a sweep dir's lock."""
    import fcntl

    fh = open(lock_file, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        return holder
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()}")
    fh.flush()
    return fh


def readable_weights(folder: Path) -> None:
    """``*.safetensors`` under ``folder`` that safetensors 0.8 wrote owner-only (it saves through a temporary file created
    0600, whatever the umask: safetensors/safetensors#782) get the modes any other file of the run has, so the group
    that can read a run's config can load its adapter too (vLLM under another account could not). Only files of this
    user's still at exactly 0600 are changed; a failure to change one is not an error."""
    mode = 0o666 & ~_umask()
    if mode & 0o077 == 0:  # a umask of 077: owner-only is what this user asked for
        return
    uid = os.getuid() if hasattr(os, "getuid") else None
    try:
        found = list(Path(folder).rglob("*.safetensors"))
    except OSError:
        return
    for path in found:
        try:
            if path.is_symlink():  # the file it points to is not the run's
                continue
            st = path.stat()
            if st.st_mode & 0o777 == 0o600 and (uid is None or st.st_uid == uid):
                path.chmod(mode)
        except OSError:
            continue


def _umask() -> int:
    """The process's umask, read without setting it where Linux says it (setting and restoring it races the threads
    that create files meanwhile: W&B's, a data loader's)."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)
