"""`archives.resolve_manual_dir`: folder passthrough, official archives extracted once (safely, under a lock),
a folder of archives (Stanford Cars), and the opt-in pooch download over a loopback HTTP server."""
import errno
import functools
import hashlib
import http.server
import io
import os
import socket
import tarfile
import threading
import time
import zipfile

import pytest

from fgpair_jax.data import archives, records
from fgpair_jax.errors import DataError, DataWriteError, DownloadError, MissingFileError

LAYOUT = "expected toy/ with marker.txt; set config.data.manual_dir to it"
TOY_ROOT = {"toy/marker.txt": b"1\n", "toy/images/a.jpg": b"jpeg", "attributes.txt": b"loose beside the root\n"}


def toy(download=None, marker="marker.txt"):
    return records.DataSet(name="toy", read_index=lambda *a: None, expected_layout=LAYOUT, marker=marker,
                           manual_download="get it from X", download=download)


def write_tar(path, members, mode="w:gz"):
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def write_zip(path, members):
    with zipfile.ZipFile(path, "w") as zipped:
        for name, data in members.items():
            zipped.writestr(name, data)
    return str(path)


def one_line(error_info):
    message = str(error_info.value)
    assert "\n" not in message
    return message


def test_folder_with_marker_is_returned_unchanged(tmp_path):
    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / "marker.txt").write_text("1\n")
    data_dir = tmp_path / "data"
    assert archives.resolve_manual_dir(toy(), str(folder), str(data_dir)) == str(folder)
    assert not data_dir.exists()  # nothing extracted, nothing written


@pytest.mark.parametrize("name,writer", [
    ("toy.tgz", functools.partial(write_tar, mode="w:gz")),
    ("toy.tar", functools.partial(write_tar, mode="w")),
    ("toy.zip", write_zip),
    ("toy_download", functools.partial(write_tar, mode="w:gz")),  # recognised by content, not by name
])
def test_archive_is_extracted_and_nested_root_found(tmp_path, name, writer):
    archive = writer(tmp_path / name, TOY_ROOT)
    data_dir = tmp_path / "data"
    root = archives.resolve_manual_dir(toy(), archive, str(data_dir))
    assert os.path.basename(root) == "toy"
    target = os.path.dirname(root)
    assert os.path.dirname(target) == str(data_dir / "extracted")
    assert os.path.basename(target).startswith("toy_")
    assert open(os.path.join(root, "images", "a.jpg"), "rb").read() == b"jpeg"
    assert os.path.isfile(os.path.join(target, "attributes.txt"))
    assert not [n for n in os.listdir(data_dir / "extracted") if archives.INCOMPLETE in n]


def test_unchanged_archive_is_reused_without_reading_it(tmp_path, monkeypatch):
    archive = write_tar(tmp_path / "toy.tgz", TOY_ROOT)
    root = archives.resolve_manual_dir(toy(), archive, str(tmp_path / "data"))

    def no_open(*args, **kwargs):
        raise AssertionError("the archive was read again")

    monkeypatch.setattr(tarfile, "open", no_open)
    assert archives.resolve_manual_dir(toy(), archive, str(tmp_path / "data")) == root


def test_replaced_archive_is_extracted_again(tmp_path):
    archive = write_tar(tmp_path / "toy.tgz", TOY_ROOT)
    data_dir = str(tmp_path / "data")
    first = archives.resolve_manual_dir(toy(), archive, data_dir)
    write_tar(archive, {"new/toy/marker.txt": b"2\n", "new/toy/images/b.jpg": b"other"})
    stat = os.stat(archive)
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new mtime even on coarse clocks
    second = archives.resolve_manual_dir(toy(), archive, data_dir)
    assert second != first and second.endswith(os.path.join("new", "toy"))
    assert os.path.isfile(os.path.join(second, "images", "b.jpg"))


@pytest.mark.parametrize("writer", [write_tar, write_zip])
@pytest.mark.parametrize("evil", ["../evil.txt", "toy/../../evil.txt"])
def test_member_escaping_the_folder_is_refused(tmp_path, writer, evil):
    archive = writer(tmp_path / "bad.archive", {**TOY_ROOT, evil: b"pwned"})
    data_dir = tmp_path / "data"
    with pytest.raises(DataError) as error:
        archives.resolve_manual_dir(toy(), archive, str(data_dir))
    message = one_line(error)
    assert archive in message and "refused" in message
    assert [n for n in os.listdir(data_dir / "extracted") if not n.endswith(".lock")] == []  # nothing kept
    assert not (data_dir / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()


@pytest.mark.parametrize("writer", [write_tar, write_zip])
def test_absolute_member_is_contained(tmp_path, writer):
    archive = writer(tmp_path / "abs.archive", {**TOY_ROOT, "/fgpair_evil_test/evil.txt": b"pwned"})
    root = archives.resolve_manual_dir(toy(), archive, str(tmp_path / "data"))
    assert os.path.isfile(os.path.join(os.path.dirname(root), "fgpair_evil_test", "evil.txt"))
    assert not os.path.exists("/fgpair_evil_test")


def test_folder_of_archives_and_loose_file(tmp_path, monkeypatch):
    folder = tmp_path / "stanford_cars"
    folder.mkdir()
    write_tar(folder / "cars_train.tgz", {"cars_train/00001.jpg": b"train"})
    write_tar(folder / "cars_test.tgz", {"cars_test/00001.jpg": b"test"})
    write_tar(folder / "car_devkit.tgz", {"devkit/cars_meta.mat": b"meta"})
    (folder / "cars_test_annos_withlabels.mat").write_bytes(b"labels")
    data_set = toy(marker="devkit/cars_meta.mat")
    data_dir = str(tmp_path / "data")
    root = archives.resolve_manual_dir(data_set, str(folder), data_dir)
    assert os.path.dirname(root) == os.path.join(data_dir, "extracted")
    assert os.path.basename(root).startswith("stanford_cars_")
    for name, data in [("cars_train/00001.jpg", b"train"), ("cars_test/00001.jpg", b"test"),
                       ("cars_test_annos_withlabels.mat", b"labels")]:
        assert open(os.path.join(root, name), "rb").read() == data

    monkeypatch.setattr(tarfile, "open", lambda *a, **k: pytest.fail("re-read"))
    assert archives.resolve_manual_dir(data_set, str(folder), data_dir) == root


def test_archive_without_marker_is_one_line(tmp_path):
    archive = write_tar(tmp_path / "other.tgz", {"other/readme.txt": b"no marker"})
    with pytest.raises(DataError) as error:
        archives.resolve_manual_dir(toy(), archive, str(tmp_path / "data"))
    message = one_line(error)
    assert archive in message and "'marker.txt'" in message and LAYOUT in message


def test_file_that_is_no_archive_is_one_line(tmp_path):
    path = tmp_path / "toy.tgz"
    path.write_bytes(b"not an archive at all")
    with pytest.raises(DataError) as error:
        archives.resolve_manual_dir(toy(), str(path), str(tmp_path / "data"))
    assert str(path) in one_line(error) and LAYOUT in str(error.value)


def test_truncated_archive_is_one_line(tmp_path):
    archive = write_tar(tmp_path / "toy.tgz", {**TOY_ROOT, "toy/images/big.jpg": os.urandom(200_000)})
    data = open(archive, "rb").read()
    open(archive, "wb").write(data[: len(data) // 2])
    with pytest.raises(DataError) as error:
        archives.resolve_manual_dir(toy(), archive, str(tmp_path / "data"))
    assert "damaged or truncated" in one_line(error) or "Cannot read" in str(error.value)


def test_missing_manual_dir_without_download_is_returned_unchanged(tmp_path):
    missing = str(tmp_path / "missing")
    assert archives.resolve_manual_dir(toy(), missing, str(tmp_path / "data")) == missing
    empty = tmp_path / "empty"
    empty.mkdir()
    assert archives.resolve_manual_dir(toy(), str(empty), str(tmp_path / "data")) == str(empty)


def test_two_resolvers_at_once_extract_once_and_remove_stale_folders(tmp_path, monkeypatch):
    archive = write_tar(tmp_path / "toy.tgz", TOY_ROOT)
    data_dir = str(tmp_path / "data")
    target = archives.extraction_target([archive], data_dir, "toy")
    stale = target + archives.INCOMPLETE + "killed"
    os.makedirs(os.path.join(stale, "toy"))
    open(os.path.join(stale, "toy", "marker.txt"), "w").close()

    calls = []
    extract = archives._extract_archive

    def slow_extract(*args):
        calls.append(args[0])
        time.sleep(0.3)  # the other thread reaches the lock meanwhile
        extract(*args)

    monkeypatch.setattr(archives, "_extract_archive", slow_extract)
    results = []
    threads = [threading.Thread(target=lambda: results.append(archives.resolve_manual_dir(toy(), archive, data_dir)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [os.path.join(target, "toy")] * 2
    assert calls == [archive]
    assert not os.path.exists(stale)


# --- the opt-in download, over a loopback HTTP server -------------------------------------------------------------


@pytest.fixture
def server(tmp_path, monkeypatch):
    """(base URL, served folder, request paths) of an HTTP server on 127.0.0.1 serving tmp_path/www."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    www = tmp_path / "www"
    www.mkdir()
    requests_seen = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(www), **kwargs)

        def do_GET(self):
            requests_seen.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", www, requests_seen
    httpd.shutdown()
    httpd.server_close()


def served_toy(www, url, md5=None):
    archive = write_tar(www / "toy.tgz", TOY_ROOT)
    md5 = md5 or hashlib.md5(open(archive, "rb").read()).hexdigest()
    return records.Download(url=f"{url}/toy.tgz", file_name="toy.tgz", md5=md5, checksum_source="the test")


def test_download_extracts_and_is_reused_without_a_request(tmp_path, server):
    url, www, seen = server
    data_set = toy(download=served_toy(www, url))
    data_dir = tmp_path / "data"
    (data_dir / "downloads").mkdir(parents=True)
    (data_dir / "downloads" / "tmpabcd1234").write_bytes(b"partial")  # left by a killed download
    root = archives.resolve_manual_dir(data_set, str(tmp_path / "missing"), str(data_dir), download=True)
    assert os.path.basename(root) == "toy" and os.path.isfile(os.path.join(root, "marker.txt"))
    assert seen == ["/toy.tgz"]
    assert sorted(os.listdir(data_dir / "downloads")) == [".lock", "toy.tgz"]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert archives.resolve_manual_dir(data_set, str(empty), str(data_dir), download=True) == root
    assert seen == ["/toy.tgz"]  # the file in downloads/ matched its MD5: no second request


def test_download_with_wrong_md5_keeps_nothing(tmp_path, server):
    url, www, seen = server
    data_set = toy(download=served_toy(www, url, md5="0" * 32))
    data_dir = tmp_path / "data"
    with pytest.raises(DownloadError) as error:
        archives.resolve_manual_dir(data_set, str(tmp_path / "missing"), str(data_dir), download=True)
    message = one_line(error)
    assert f"{url}/toy.tgz" in message and "MD5" in message and "config.data.manual_dir" in message
    assert os.listdir(data_dir / "downloads") == [".lock"]
    assert not (data_dir / "extracted").exists()


def test_download_http_error_is_one_line(tmp_path, server):
    url, _, _ = server
    spec = records.Download(url=f"{url}/gone.tgz", file_name="gone.tgz", md5="0" * 32, checksum_source="the test")
    with pytest.raises(DownloadError) as error:
        archives.resolve_manual_dir(toy(download=spec), str(tmp_path / "missing"), str(tmp_path / "data"),
                                    download=True)
    assert "HTTP 404" in one_line(error) and spec.url in str(error.value)


def test_download_from_a_closed_port_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    spec = records.Download(url=f"http://127.0.0.1:{port}/toy.tgz", file_name="toy.tgz", md5="0" * 32,
                            checksum_source="the test")
    with pytest.raises(DownloadError) as error:
        archives.resolve_manual_dir(toy(download=spec), str(tmp_path / "missing"), str(tmp_path / "data"),
                                    download=True)
    message = one_line(error)
    assert spec.url in message and "refused" in message.lower() and "Rerun to retry" in message
    assert isinstance(error.value, OSError)


def test_download_without_an_address_is_one_line(tmp_path):
    with pytest.raises(MissingFileError) as error:
        archives.resolve_manual_dir(toy(), str(tmp_path / "missing"), str(tmp_path / "data"), download=True)
    assert "get it from X" in one_line(error)


def test_storage_refusing_the_extraction_is_one_line(tmp_path, monkeypatch):
    archive = write_tar(tmp_path / "toy.tgz", TOY_ROOT)
    data_dir = tmp_path / "data"

    def full_disk(archive, destination, data_dir):
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(destination, "toy", "marker.txt"))

    monkeypatch.setattr(archives, "_extract_archive", full_disk)
    with pytest.raises(DataWriteError) as error:
        archives.resolve_manual_dir(toy(), archive, str(data_dir))
    assert "No space left on device" in one_line(error) and "config.data.data_dir" in str(error.value)
    assert [n for n in os.listdir(data_dir / "extracted") if not n.endswith(".lock")] == []
