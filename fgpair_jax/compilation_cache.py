"""JAX's persistent compilation cache for runs: a program compiled once (the train step, the evaluation
pass) is loaded from disk by every later process that compiles the same program, so a resumed run, a
re-evaluation and the comparison table's other seeds and arms do not compile it again (the seed is not
compiled into any program). What a cached program computes is what a fresh compile computes: the cache
holds XLA's serialized executable, keyed by the program, the devices and the compile options.

`enable(config.compilation_cache_dir)` is called once at the start of a run (`train.train_and_evaluate`,
which `experiments.py` and `evaluate_checkpoint.py` go through, and `evaluate.evaluate_workdir`), never at
import. The knob (configs/common.py):
- `"auto"` (default): `$JAX_COMPILATION_CACHE_DIR` when set (JAX's own variable; the tests set it to keep
  their cache apart from the user's), else the user's cache folder, `default_directory()`:
  `~/.cache/fgpair_jax/jax` on Linux (`$XDG_CACHE_HOME` honoured; platformdirs' rule on other systems).
  JAX's cache turned off by JAX's own `JAX_ENABLE_COMPILATION_CACHE=false` stays off.
- a path: that folder (`~` expanded, created if missing).
- `""` or `"none"`: off; every process compiles its programs afresh.

Every process of the project opens the folder with the same size limit (`MAX_SIZE_BYTES`, least recently
used entries evicted beyond it), for which JAX needs `filelock` (an install requirement). A limited cache
dates each entry in a `<key>-atime` file beside its `<key>-cache`, and its eviction scan reads every
entry's date under the folder's lock; an entry without one (written by a process without a limit, JAX's
default, e.g. one with only `JAX_COMPILATION_CACHE_DIR` exported, or by a process killed between the two
writes) makes every later write of every limited process fail with a warning ("Error writing persistent
compilation cache entry ...: FileNotFoundError: ...-atime") and leaves the new program uncached.
`enable` dates such entries first (`date_undated_entries`), so processes sharing one folder stay quiet
and keep caching. Silencing the warning instead would hide a cache that stopped caching.

JAX's warning about the cache applies: it is trusted, anyone who can write to the folder can make a
process run code; the default folder is the user's own (created mode 0700).
"""
import logging
import os
from typing import Optional

import filelock
import jax
import platformdirs
from jax.experimental.compilation_cache import compilation_cache as jax_compilation_cache

from fgpair_jax.errors import ConfigError

AUTO = "auto"
OFF = ("", "none")
# The cache's bound on disk: the quick config's programs take ~10-50 MB, the paper config's on a GPU
# more; 2 GiB keeps dozens of configs' programs (the tests' cache uses the same bound).
MAX_SIZE_BYTES = 2 * 2**30
# Programs that compile faster than this are not written. Under the size limit every write re-reads every
# entry's date (JAX's eviction scan), so a cache of each of the ~60 small programs a run compiles (an
# array's creation, an initialiser) would make every later write slower than those compiles are; the
# programs worth keeping (the train step, the evaluation pass) take seconds (results/README.md, issue 27).
MIN_COMPILE_TIME_SECS = 0.5
# jax/_src/lru_cache.py's layout of a limited cache: "<key>-cache" (the executable), "<key>-atime" (last
# use, time.time_ns() as 8 little-endian bytes) and ".lockfile", a filelock.FileLock around every access.
CACHE_SUFFIX, ATIME_SUFFIX, LOCK_FILE = "-cache", "-atime", ".lockfile"
LOCK_TIMEOUT_SECS = 10.0  # JAX's own for that lock

logger = logging.getLogger(__name__)


def default_directory() -> str:
    """The user's cache folder for JAX's compiled programs: `<user cache dir>/fgpair_jax/jax`, i.e.
    `$XDG_CACHE_HOME/fgpair_jax/jax` or `~/.cache/fgpair_jax/jax` on Linux (platformdirs.user_cache_dir)."""
    return os.path.join(platformdirs.user_cache_dir("fgpair_jax"), "jax")


def resolve_directory(setting: str) -> Optional[str]:
    """The absolute folder `config.compilation_cache_dir = setting` caches into, None when off (see the
    module docstring: "auto", a path, "" or "none")."""
    if setting.strip().lower() in OFF:
        return None
    if setting == AUTO:
        if not jax.config.jax_enable_compilation_cache:
            return None
        setting = jax.config.jax_compilation_cache_dir or default_directory()
    return os.path.abspath(os.path.expanduser(setting))


def date_undated_entries(directory: str) -> int:
    """Give every `<key>-cache` entry of `directory` that has no `<key>-atime` one, dated by the entry's
    modification time, under the folder's lock (as JAX takes it); returns how many were dated. An entry
    without one stops a size-limited cache from writing (module docstring). If the lock is held past
    `LOCK_TIMEOUT_SECS`, nothing is dated (JAX itself will then wait for it too) and 0 is returned."""
    try:
        with filelock.FileLock(os.path.join(directory, LOCK_FILE), timeout=LOCK_TIMEOUT_SECS):
            names = set(os.listdir(directory))
            dated = 0
            for name in sorted(names):
                key = name[:-len(CACHE_SUFFIX)]
                if not name.endswith(CACHE_SUFFIX) or key + ATIME_SUFFIX in names:
                    continue
                timestamp = os.stat(os.path.join(directory, name)).st_mtime_ns
                with open(os.path.join(directory, key + ATIME_SUFFIX), "wb") as f:
                    f.write(timestamp.to_bytes(8, "little"))
                dated += 1
            return dated
    except filelock.Timeout:
        logger.info("The compilation cache %s stayed locked for %.0f s; undated entries left as they are.",
                    directory, LOCK_TIMEOUT_SECS)
        return 0


def _make_directory(directory: str) -> None:
    """`directory` created (0700 where this creates it) and writable, or `ConfigError` naming the knob."""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        writable = os.access(directory, os.W_OK | os.X_OK)
    except OSError as error:
        raise ConfigError(f"config.compilation_cache_dir: cannot create {directory} for JAX's compiled programs "
                          f"({error.strerror or error}); give a writable folder, or 'none' to compile afresh "
                          "in every process.") from error
    if not writable:
        raise ConfigError(f"config.compilation_cache_dir: {directory} is not writable; give a writable folder, "
                          "or 'none' to compile afresh in every process.")


def enable(setting: str) -> Optional[str]:
    """Point JAX's persistent compilation cache at the folder `setting` names (`resolve_directory`), with
    the project's limits (`MAX_SIZE_BYTES`, `MIN_COMPILE_TIME_SECS`), or turn it off ("" or "none");
    returns the folder, or None when off. Idempotent; takes effect even after earlier compiles in this
    process (JAX's cache is reset when a setting changes). Raises `ConfigError` (one line) when the
    folder cannot be created or written."""
    directory = resolve_directory(setting)
    if directory is None:
        wanted = {"jax_enable_compilation_cache": False}
    else:
        _make_directory(directory)
        date_undated_entries(directory)
        wanted = {
            "jax_enable_compilation_cache": True,
            "jax_compilation_cache_dir": directory,
            "jax_compilation_cache_max_size": MAX_SIZE_BYTES,
            "jax_persistent_cache_min_compile_time_secs": MIN_COMPILE_TIME_SECS,
            "jax_persistent_cache_min_entry_size_bytes": -1,  # no size threshold: compile time decides
        }
    changed = {name: value for name, value in wanted.items() if getattr(jax.config, name) != value}
    for name, value in changed.items():
        jax.config.update(name, value)
    if changed:
        jax_compilation_cache.reset_cache()  # JAX opens the cache once per process, at the first compile
    return directory
