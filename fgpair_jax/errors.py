"""The one base class of errors a user causes and can fix (a config value, a path, a data folder, a
workdir of another run). The command lines print such an error as one line, without a traceback
(`cli.run`); every other exception is a bug and keeps its traceback.

Each subclass also derives from the built-in type callers already catch (ValueError, OSError, ...),
so `except ValueError` keeps working.
"""


class UserError(Exception):
    """An error whose one-line message names the problem and the fix."""


class ConfigError(UserError, ValueError):
    """A config value that is unknown, out of range, or incompatible with the workdir it resumes."""


class DataError(UserError, ValueError):
    """A data folder that is missing or not in the expected layout."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the run needs does not exist (data, weights, a workdir's checkpoint)."""


class DataWriteError(UserError, OSError):
    """A data build its storage refuses (no space, quota, read-only, not a folder); nothing of it was kept,
    and a later build starts afresh."""


class DownloadError(UserError, OSError):
    """A data set's official archive that could not be fetched (no connection, an HTTP error, a checksum
    mismatch); nothing partial was kept, and a rerun retries."""
