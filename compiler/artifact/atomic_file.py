"""Atomic file replacement: a reader sees the old file or the whole new one, never a part.

    write_atomic("model.fxopt", lambda tmp: write_my_format(tmp))
"""
from __future__ import annotations

import contextlib
import os
import tempfile

TEMP_MARK = ".fxopt-partial."   # in the name of every temporary file a save writes


def write_atomic(path: str, write) -> None:
    """Call write(temp_path) for a temp file next to `path`, fsync it, then rename it over `path`.

    The temp file is named `.<name>.fxopt-partial.<pid>.<random>`: a save killed before
    its rename leaves one behind, and the next save to the folder removes those whose
    process is gone. A failure is reported with `path`, never the temp file's name.
    """
    directory = os.path.dirname(os.path.abspath(path))
    _remove_orphans(directory)
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}{TEMP_MARK}{os.getpid()}.")
    except OSError as e:
        raise OSError(e.errno, f"cannot save {path}: {e.strerror} (while creating a file in {directory})") from e
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode(path))
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise OSError(e.errno, f"cannot save {path}: {e.strerror or e}; the file at that path, "
                                   "if any, is unchanged") from e
        raise
    # Why: the rename is durable only once the directory entry is on disk.
    with contextlib.suppress(OSError):
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _remove_orphans(directory: str) -> None:
    """Delete temp files of earlier saves into `directory` whose process no longer runs."""
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            owner = name.partition(TEMP_MARK)[2].split(".")[0]
            if name.startswith(".") and owner.isdigit() and not _running(int(owner)):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, name))


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True       # another thread of this process may be saving into the folder
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True       # alive, owned by another user
    return True


def _file_mode(path: str) -> int:
    # mkstemp creates 0600 files; keep the old file's mode, or the umask default.
    if os.path.exists(path):
        return os.stat(path).st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
