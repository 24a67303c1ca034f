"""One way to write a file so that a crash at any instant leaves the old file or the new one, never half of one.

    atomic_write(path, "text")                       # str or bytes
    atomic_write(path, lambda tmp: df.to_csv(tmp))    # or a writer that fills the temporary path

The content goes to a temporary file in the same folder, is flushed to disk, and is renamed over `path`
(os.replace is atomic on POSIX within one file system). The file's mode follows the process umask, as any
newly created file's would (mkstemp alone would make it 0600).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path, content: str | bytes | Callable[[str], None]) -> Path:
    """Write `content` (text, bytes, or a function writing the temporary path it is given) to `path` atomically."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if callable(content):
            content(tmp)
        else:
            Path(tmp).write_bytes(content.encode() if isinstance(content, str) else content)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path
