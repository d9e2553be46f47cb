"""How much a process may still write into a folder: free space and the per-file size limit.

Writers check it before each write so that a full disk or ``RLIMIT_FSIZE`` (POSIX ``setrlimit``) stops them
with an error naming the file while there is still room to close it; HDF5 writes that fail half-way can leave
a file unreadable and have crashed the process in the library's clean-up.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path


def space_left(folder: str | Path, file: str | Path | None = None) -> int:
    """Bytes this process may still write under ``folder``.

    Parameters
    ----------
    folder : path
        An existing folder.
    file : path, optional
        The file being appended to: the soft ``RLIMIT_FSIZE`` counts against its current size.

    Returns
    -------
    int
        The file system's free space for unprivileged users (``statvfs`` ``f_bavail * f_frsize``), at most
        the soft ``RLIMIT_FSIZE`` less ``file``'s size.

    Raises
    ------
    OSError
        ``folder`` cannot be queried (missing, permission).
    """
    st = os.statvfs(folder)
    left = st.f_bavail * st.f_frsize
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY:
        used = Path(file).stat().st_size if file is not None and Path(file).exists() else 0
        left = min(left, int(soft) - used)
    return int(left)


def check_writable(folder: str | Path) -> None:
    """Create ``folder`` if needed and check that a file can be created in it.

    Raises
    ------
    OSError
        The folder cannot be created or written (read-only file system, permissions), with its name.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".beamloop-write-check-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OSError(exc.errno, f"{folder}: cannot write there ({exc.strerror or exc})") from None
