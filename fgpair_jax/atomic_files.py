"""Files that appear whole or not at all: results, caches, downloads.

Why one helper: a run killed (or a disk filled) mid-write must never leave a half-written
metrics.json, a truncated cache entry that later loads as garbage, or a cut download under its final
name. Everything is written to a unique temporary file in the destination's folder (so the rename
stays on one file system and concurrent writers, even on several hosts, never share a name), then
renamed over the destination, which POSIX makes atomic.
"""
import os
import tempfile
from typing import Callable


def write_atomically(path: str, write: Callable[[str], None]) -> None:
    """Call `write(temporary_path)`, then rename the result to `path`; on any error the temporary file
    is removed and `path` keeps whatever it held before."""
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".partial")
    os.close(handle)
    try:
        os.chmod(temporary, 0o666 & ~_current_umask())  # mkstemp makes 0600; results are shared files
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
