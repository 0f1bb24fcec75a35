"""The one exclusive file lock of the data layer: a build (`builder.build_lock`), an extraction and a download
(`archives.py`) each run under it, so concurrent processes do the work once.

`fcntl.flock` is released by the kernel when its holder exits: a killed process leaves no stale lock. Hosts
sharing the folder over NFS need a working lock service (Linux clients map flock onto NFS byte-range locks).
"""
import contextlib
import fcntl
import logging

_LOG = logging.getLogger(__name__)


@contextlib.contextmanager
def exclusive(path: str, what: str):
    """Holds an exclusive `fcntl.flock` on the file `path` (created if absent; its folder must exist); a process
    that has to wait says so once: 'Waiting for another process to finish <what> (lock <path>).'"""
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _LOG.warning("Waiting for another process to finish %s (lock %s).", what, path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
