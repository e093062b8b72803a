"""Files other users must read: a model directory or an adapter is mounted into the server image, which runs
as an unprivileged user (Dockerfile), while safetensors writes its files with mode 0600."""

from __future__ import annotations

import os
from pathlib import Path


def umask_mode(directory: bool = False) -> int:
    """The mode open()/mkdir() would give a new file (0o666) or directory (0o777) under this process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def share_like_open(path: Path) -> Path:
    """Give a file written by safetensors (0600) the mode a plain open() would have given it."""
    os.chmod(path, umask_mode())
    return path


def readable_by_all(directory: Path) -> Path:
    """Give `directory` 0755 and its files 0644 (nothing deeper). Directories written before a fix are
    repaired on their next use; one owned by someone else, or on a read-only file system, is left alone
    (its owner can still read it)."""
    try:
        for path in (directory, *directory.iterdir()):
            want = 0o755 if path.is_dir() else 0o644
            if path.stat().st_mode & 0o777 != want and path.stat().st_uid == os.getuid():
                path.chmod(want)
    except OSError:
        pass
    return directory
