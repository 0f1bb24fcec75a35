"""`config.data.manual_dir` as a folder, an official archive, a folder of archives, or (opt-in) a download.

`resolve_manual_dir` turns what the user pointed `config.data.manual_dir` at into the folder a data set's
reader (`records.DataSet.read_index`) reads:

- a folder that holds the data set's `marker` (the extracted official layout): itself, at the cost of one
  `stat` (no listing, no hashing);
- an archive file (tar, optionally gzip/bz2/xz compressed, or zip; recognised by its content, not its name):
  extracted once into `<data_dir>/extracted/<archive stem>_<key>/`, then the data set's root is found inside
  it (the shallowest folder, at most `MAX_ROOT_DEPTH` levels down, that holds the marker: CUB_200_2011.tgz
  unpacks to `CUB_200_2011/` beside a loose `attributes.txt`);
- a folder without the marker that holds archives (Stanford Cars ships `cars_train.tgz`, `cars_test.tgz`,
  `car_devkit.tgz` and a loose `cars_test_annos_withlabels.mat`): every archive extracted into one folder, the
  folder's other plain files symlinked (copied where the file system refuses symlinks) beside them, then the
  root found as above;
- with `download=True`, a missing or empty `manual_dir`: the data set's official archive (`DataSet.download`)
  fetched into `<data_dir>/downloads/` with pooch, checked against the pinned MD5, then extracted as above;
- otherwise (missing, no download asked for; or a folder without marker nor archives): `manual_dir` unchanged,
  and the reader reports its own layout error.

The extraction's key is a short hash of each archive's (real path, size, mtime_ns), so a replaced archive is
extracted afresh and an unchanged one is reused without reading it again. Earlier extractions of a replaced
archive are left in `<data_dir>/extracted/` (another run may still read them); delete them by hand.

Extraction is made in a temporary sibling folder (`<target>.incomplete-<random>`) and renamed to the target
only when complete, so a killed extraction never looks complete. It runs under an exclusive `fcntl.flock` on
`<target>.lock` (`locks.exclusive`, as a build): of two processes resolving the same archive at once, one
extracts and the other waits and reuses the result; the holder of the lock removes temporary folders an
earlier, killed extraction left. Downloads hold one lock on `<data_dir>/downloads/.lock` the same way.

Safety: tar members are extracted with the stdlib's `filter="data"` (PEP 706): a member that would land
outside the folder (`..`), a link pointing outside it, a device file or FIFO makes the whole archive refused
(one-line `DataError`, nothing kept); a leading `/` is stripped (the member lands inside the folder), and
setuid/setgid bits and group/other write permissions are dropped. Zip archives are checked before extraction:
a member with a `..` component refuses the archive likewise; zipfile itself strips a leading `/` or drive
letter, and creates no links or devices.

Downloads use pooch (`pooch.retrieve`), not hand-written HTTP: pooch streams into a temporary file beside the
destination and moves it into place only when its hash matches, so `<data_dir>/downloads/` never holds a
partial or wrong file; a file already there with the right hash is reused without a network access. pooch
does not resume: an interrupted download restarts from zero on the next run (a temporary file a killed
download left is removed then). pooch's HTTP requests time out after 30 s without data.

Errors, each one line naming the problem and the fix (`errors.UserError`):
- `DataError`: an archive without the marker (names the archive, the marker and `expected_layout`), a damaged
  or truncated archive, an unsafe member, a `manual_dir` file that is not an archive;
- `DataWriteError`: `data_dir` refuses the extraction or download (no space, quota, read-only, permissions);
- `MissingFileError`: a download asked for a data set without an official address (gives `manual_download`);
- `DownloadError`: the download failed (connection, HTTP status, checksum mismatch); names the URL, the reason
  and the fix (rerun to retry, or download by hand and point `config.data.manual_dir` at the archive).

This module imports neither TFDS nor pooch at import time (pooch is imported only to download).

Sources:
- pooch.retrieve: https://www.fatiando.org/pooch/latest/api/generated/pooch.retrieve.html (hash check,
  reuse of a matching file, temporary file moved into place).
- tarfile extraction filters, PEP 706: https://peps.python.org/pep-0706/ and
  https://docs.python.org/3/library/tarfile.html#extraction-filters (Python >= 3.11.4).
- zipfile.ZipFile.extractall: https://docs.python.org/3/library/zipfile.html#zipfile.ZipFile.extractall.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Sequence

from fgpair_jax.data import locks, records
from fgpair_jax.errors import DataError, DataWriteError, DownloadError, MissingFileError, UserError

_LOG = logging.getLogger(__name__)

EXTRACTED = "extracted"  # <data_dir>/extracted/<stem>_<key>/
DOWNLOADS = "downloads"  # <data_dir>/downloads/<Download.file_name>
MAX_ROOT_DEPTH = 3  # the data set's root is at most this many folders below the extraction's top
INCOMPLETE = ".incomplete-"  # <target>.incomplete-<random>: an extraction in progress (or killed)
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tbz", ".tar.xz", ".txz", ".tar", ".zip")
_POOCH_TEMPORARY = re.compile(r"tmp[a-z0-9_]{8}")  # tempfile.NamedTemporaryFile's names, pooch's partial files
_NO_ROOM_OR_READ_ONLY = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST)


def resolve_manual_dir(data_set: records.DataSet, manual_dir: str, data_dir: str, *, download: bool = False) -> str:
    """The folder the data set's reader should read: `manual_dir` itself when it holds `data_set.marker`, else
    the data set's root inside the extraction of the archive(s) `manual_dir` is or holds, or (with `download`,
    for a missing or empty `manual_dir`) inside the extraction of the downloaded official archive. See the
    module docstring for the cases, the extraction folder, the locking and the one-line errors raised
    (`DataError`, `DataWriteError`, `MissingFileError`, `DownloadError`)."""
    if os.path.isdir(manual_dir):
        if os.path.exists(os.path.join(manual_dir, data_set.marker)):
            return manual_dir  # the common case: one stat
        names = sorted(name for name in os.listdir(manual_dir) if not name.startswith("."))
        if data_set.official_files:  # only the data set's own downloads, not whatever else the folder holds
            names = [name for name in names if name in data_set.official_files]
        files = [os.path.join(manual_dir, name) for name in names if os.path.isfile(os.path.join(manual_dir, name))]
        stem = _stem(manual_dir, is_file=False)
        # Keyed over all its plain files (stats only), so a finished extraction is found without reading any.
        target = extraction_target(files, data_dir, stem) if files else None
        if target is None or not os.path.isdir(target):
            archives = [path for path in files if _archive_kind(path)]
            if not archives:
                if download and not os.listdir(manual_dir):
                    return _download_and_extract(data_set, manual_dir, data_dir)
                return manual_dir  # the reader reports its layout error
            loose = [path for path in files if path not in archives]
            target = _extract_once(archives, loose, data_dir, stem)
        return _root_or_error(data_set, target, f"The archives in folder {manual_dir!r}")
    if os.path.exists(manual_dir):
        stem = _stem(manual_dir, is_file=True)
        target = extraction_target([manual_dir], data_dir, stem)
        if not os.path.isdir(target):  # else reused without reading the archive
            if not _archive_kind(manual_dir):
                raise DataError(f"config.data.manual_dir {manual_dir!r} is a file but not a readable tar or zip "
                                f"archive (damaged or truncated?); {data_set.expected_layout}.")
            target = _extract_once([manual_dir], [], data_dir, stem)
        return _root_or_error(data_set, target, f"Archive {manual_dir!r}")
    if download:
        return _download_and_extract(data_set, manual_dir, data_dir)
    return manual_dir


def find_root(folder: str, marker: str, max_depth: int = MAX_ROOT_DEPTH) -> str | None:
    """The shallowest folder at most `max_depth` levels below `folder` (itself included) that holds `marker`,
    breadth first and in name order; None if there is none. Symlinked folders are not entered."""
    level = [folder]
    for depth in range(max_depth + 1):
        for candidate in level:
            if os.path.exists(os.path.join(candidate, marker)):
                return candidate
        if depth == max_depth:
            break
        below = []
        for candidate in level:
            with contextlib.suppress(OSError), os.scandir(candidate) as entries:
                below.extend(sorted(entry.path for entry in entries if entry.is_dir(follow_symlinks=False)))
        level = below
    return None


def extraction_target(paths: Sequence[str], data_dir: str, stem: str) -> str:
    """`<data_dir>/extracted/<stem>_<key>`, the key a short hash of each path's (real path, size, mtime_ns):
    stats only, the archives are not read."""
    digest = hashlib.sha256()
    for path in sorted(os.path.realpath(path) for path in paths):
        stat = os.stat(path)
        digest.update(os.fsencode(path) + f"\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return os.path.join(data_dir, EXTRACTED, f"{stem}_{digest.hexdigest()[:12]}")


def _root_or_error(data_set: records.DataSet, target: str, what: str) -> str:
    root = find_root(target, data_set.marker)
    if root is None:
        raise DataError(f"{what}: no folder within {MAX_ROOT_DEPTH} levels of its contents (extracted to "
                        f"{target!r}) holds {data_set.marker!r}; {data_set.expected_layout}.")
    return root


def _archive_kind(path: str) -> str | None:
    """"tar" or "zip" by the file's content (tar first: a tar whose last member is a zip can look like a zip);
    None for any other or unreadable file."""
    try:
        if tarfile.is_tarfile(path):
            return "tar"
        if zipfile.is_zipfile(path):
            return "zip"
    except (OSError, EOFError, zlib.error, tarfile.TarError):
        return None
    return None


def _stem(path: str, *, is_file: bool) -> str:
    """A file-name-safe stem: the archive's name less its archive suffix, or the folder's name."""
    name = os.path.basename(os.path.normpath(os.path.abspath(path)))
    if is_file:
        suffix = next((suffix for suffix in _ARCHIVE_SUFFIXES if name.lower().endswith(suffix)), None)
        name = name[: -len(suffix)] if suffix else os.path.splitext(name)[0]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:64] or "archive"


def _extract_once(archives: Sequence[str], loose: Sequence[str], data_dir: str, stem: str) -> str:
    """The complete extraction of `archives` (plus links to `loose` files), made now if it is not there yet."""
    target = extraction_target([*archives, *loose], data_dir, stem)
    if os.path.isdir(target):
        return target  # complete: only ever made by a rename
    parent = os.path.dirname(target)
    with _storage_errors(data_dir):
        os.makedirs(parent, exist_ok=True)
        with locks.exclusive(f"{target}.lock", f"extracting into {target}"):
            if os.path.isdir(target):
                return target  # another process extracted it while this one waited
            _remove_incomplete(target)
            temporary = tempfile.mkdtemp(prefix=os.path.basename(target) + INCOMPLETE, dir=parent)
            try:
                for archive in archives:
                    _LOG.info("Extracting %s into %s (once; later runs reuse it).", archive, target)
                    _extract_archive(archive, temporary, data_dir)
                for path in loose:
                    _link_or_copy(path, temporary)
                os.rename(temporary, target)
            except BaseException:
                shutil.rmtree(temporary, ignore_errors=True)
                raise
    return target


def _extract_archive(archive: str, destination: str, data_dir: str) -> None:
    """Safe extraction of one archive into `destination`; a damaged archive or an unsafe member is one line
    (`DataError`), a write `data_dir` refuses propagates as OSError (wrapped by `_storage_errors`)."""
    redownload = "download it again (or check the file) and rerun"
    try:
        if _archive_kind(archive) == "tar":
            if not hasattr(tarfile, "data_filter"):  # PEP 706 arrived in Python 3.11.4
                raise DataError(f"Archive {archive!r}: this Python lacks tarfile's safe extraction (PEP 706, Python "
                                f">= 3.11.4); upgrade Python, or extract it by hand and set config.data.manual_dir "
                                f"to the extracted folder.")
            with tarfile.open(archive, "r:*") as tar:
                tar.extractall(destination, filter="data")
        else:
            with zipfile.ZipFile(archive) as zipped:
                for info in zipped.infolist():
                    if not _zip_member_inside(info.filename):
                        raise DataError(f"Archive {archive!r}: refused, member {info.filename!r} would be extracted "
                                        f"outside its folder; use the official archive.")
                zipped.extractall(destination)
    except tarfile.FilterError as error:
        raise DataError(f"Archive {archive!r}: refused, unsafe member ({_one_line(error)}); use the official "
                        f"archive.") from None
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error) as error:
        raise DataError(f"Archive {archive!r} is damaged or truncated ({_one_line(error) or type(error).__name__}); "
                        f"{redownload}.") from None
    except OSError as error:
        if _is_write_error(error, data_dir):
            raise
        raise DataError(f"Cannot read archive {archive!r} ({_os_reason(error)}); {redownload}.") from None


def _zip_member_inside(name: str) -> bool:
    """Whether zip member `name` stays inside the folder: no `..` component (`/` and `\\` both count as
    separators). A leading `/` or drive letter is no escape: zipfile strips it, as tarfile's data filter does."""
    return ".." not in name.replace("\\", "/").split("/")


def _link_or_copy(path: str, destination: str) -> None:
    """A symlink to the loose file `path` in `destination` (a copy where symlinks fail); an extracted entry of
    the same name wins."""
    link = os.path.join(destination, os.path.basename(path))
    if os.path.lexists(link):
        _LOG.warning("Not linking %s into the extraction: an archive already holds %s.", path, link)
        return
    try:
        os.symlink(os.path.realpath(path), link)
    except OSError:
        shutil.copy2(path, link)


def _remove_incomplete(target: str) -> None:
    """Removes `<target>.incomplete-*` folders; call only under the target's lock (then they are stale)."""
    parent, prefix = os.path.dirname(target), os.path.basename(target) + INCOMPLETE
    stale = sorted(name for name in os.listdir(parent)
                   if name.startswith(prefix) and os.path.isdir(os.path.join(parent, name)))
    for name in stale:
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    if stale:
        _LOG.warning("Removed %d unfinished extraction folder(s) left by an interrupted extraction in %s: %s",
                     len(stale), parent, ", ".join(stale))


def _download_and_extract(data_set: records.DataSet, manual_dir: str, data_dir: str) -> str:
    """Fetches `data_set.download` into `<data_dir>/downloads/` (reusing a file with the right MD5), then
    extracts it and finds the root."""
    spec = data_set.download
    state = "an empty folder" if os.path.isdir(manual_dir) else "missing"
    if spec is None:
        raise MissingFileError(f"config.data.manual_dir {manual_dir!r} is {state} and {data_set.name} has no "
                               f"official download address; {data_set.manual_download}")
    folder = os.path.join(data_dir, DOWNLOADS)
    with _storage_errors(data_dir):
        os.makedirs(folder, exist_ok=True)
        with locks.exclusive(os.path.join(folder, ".lock"), f"downloading into {folder}"):
            _remove_partial_downloads(folder)
            archive = _retrieve(spec, folder, data_set.name)
    target = _extract_once([archive], [], data_dir, _stem(archive, is_file=True))
    return _root_or_error(data_set, target, f"Downloaded archive {archive!r} (from {spec.url})")


def _retrieve(spec: records.Download, folder: str, name: str) -> str:
    """`pooch.retrieve` with the pinned MD5; its failures as one-line `DownloadError`s."""
    try:
        import pooch  # noqa: PLC0415  (only here: importing pooch costs ~0.1 s)
        import requests  # noqa: PLC0415  (pooch's HTTP client)
    except ImportError as error:
        raise MissingFileError(f"Downloading {name} needs pooch ({_one_line(error)}); `pip install pooch`, or "
                               f"download {spec.url} by hand and set config.data.manual_dir to the archive.") from None

    path = os.path.join(folder, spec.file_name)
    if os.path.exists(path):
        _LOG.info("Checking %s against its MD5 %s (reused if it matches).", path, spec.md5)
    else:
        _LOG.info("Downloading %s from %s into %s; this can take minutes.", name, spec.url, folder)

    def failed(reason: str) -> DownloadError:
        return DownloadError(
            f"Could not download {name} from {spec.url}: {reason}. Rerun to retry (an interrupted download restarts "
            f"from zero), or download {spec.file_name} by hand (MD5 {spec.md5}, {spec.checksum_source}) and set "
            f"config.data.manual_dir to the archive.")

    try:
        return pooch.retrieve(spec.url, known_hash=f"md5:{spec.md5}", fname=spec.file_name, path=folder,
                              progressbar=False)
    except requests.exceptions.HTTPError as error:
        response = error.response
        status = f"HTTP {response.status_code} {response.reason}".strip() if response is not None else None
        raise failed(status or _one_line(error)) from None
    except requests.exceptions.Timeout:
        raise failed("the server did not answer in time") from None
    except requests.exceptions.RequestException as error:
        raise failed(_connection_reason(error)) from None
    except ValueError as error:
        got = re.search(r"but got ([0-9a-fA-F]+)", str(error))
        if got:
            raise failed(f"the file's MD5 is {got.group(1)}, not the pinned {spec.md5}; it was deleted") from None
        raise failed(_one_line(error)) from None
    except OSError as error:
        if _is_write_error(error, os.path.dirname(folder)):
            raise  # `_storage_errors` names data_dir
        raise failed(_os_reason(error)) from None


def _remove_partial_downloads(folder: str) -> None:
    """Removes pooch's temporary files (`tmpXXXXXXXX`) a killed download left; call only under the lock."""
    stale = sorted(name for name in os.listdir(folder)
                   if _POOCH_TEMPORARY.fullmatch(name) and os.path.isfile(os.path.join(folder, name)))
    for name in stale:
        with contextlib.suppress(OSError):
            os.remove(os.path.join(folder, name))
    if stale:
        _LOG.warning("Removed %d partial download(s) left by an interrupted download in %s: %s", len(stale),
                     folder, ", ".join(stale))


@contextlib.contextmanager
def _storage_errors(data_dir: str):
    """A write that `data_dir` refuses (no space, quota, read-only, permissions) as one `DataWriteError`."""
    try:
        yield
    except UserError:
        raise
    except OSError as error:
        if not _is_write_error(error, data_dir):
            raise
        where = f": {error.filename}" if error.filename else ""
        raise DataWriteError(
            f"Cannot write into data_dir {data_dir!r} ({_os_reason(error)}{where}); free space there or set "
            f"config.data.data_dir to a writable folder with room, then rerun (nothing half-written was kept)."
        ) from None


def _is_write_error(error: OSError, data_dir: str) -> bool:
    if error.errno in _NO_ROOM_OR_READ_ONLY:
        return True
    if error.errno in _NOT_WRITABLE and error.filename is not None:  # a path in data_dir: not the archive's
        base, path = os.path.abspath(data_dir), os.path.abspath(os.fsdecode(error.filename))
        return path == base or path.startswith(base + os.sep)
    return False


def _os_reason(error: OSError) -> str:
    return error.strerror or _one_line(error) or type(error).__name__


def _connection_reason(error: Exception) -> str:
    """The innermost OS reason of a requests connection error ("[Errno 111] Connection refused"), else the
    error's text on one line."""
    found = re.findall(r"\[Errno -?\d+\] [^'\")\]]+", str(error))
    return found[-1].strip() if found else (_one_line(error) or type(error).__name__)


def _one_line(error: object, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
