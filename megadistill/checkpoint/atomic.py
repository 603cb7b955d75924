"""Writing a folder atomically: build it under a temp name next to the destination, rename at the end."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path


def _remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def check_destination(dst, overwrite: bool):
    """Raises FileExistsError if ``dst`` exists and may not be replaced."""
    dst = Path(dst)
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise FileExistsError(f"destination {dst} already exists; pass overwrite=True (--overwrite) to replace it")


@contextlib.contextmanager
def atomic_folder(dst, overwrite: bool = False):
    """Yields an empty temp folder in ``dst``'s parent; on success it becomes ``dst``.

    On error the temp folder is deleted and ``dst`` is untouched. With ``overwrite`` an existing
    ``dst`` is renamed away, the new folder renamed in, then the old one deleted, so at every
    instant ``dst`` is either the complete old or the complete new checkpoint (both renames are
    within one directory, hence atomic on POSIX file systems).
    """
    dst = Path(dst).absolute()
    check_destination(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        _fsync_dir(tmp)
        if dst.exists() or dst.is_symlink():
            check_destination(dst, overwrite)  # appeared while writing
            old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(dst, old)
            os.rename(tmp, dst)
            _remove(old)
        else:
            os.rename(tmp, dst)
        _fsync_dir(dst.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path, text: str):
    """Writes a small text file through a temp name in the same folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
