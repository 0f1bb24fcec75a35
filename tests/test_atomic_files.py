"""Results, caches and downloads appear whole or not at all."""
import os
import stat

import pytest

from fgpair_jax.atomic_files import write_atomically


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("previous")

    def fails_halfway(temporary):
        with open(temporary, "w") as f:
            f.write("half")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomically(str(path), fails_halfway)
    assert path.read_text() == "previous" and os.listdir(tmp_path) == ["metrics.json"]

    def succeeds(temporary):
        assert os.path.dirname(temporary) == str(tmp_path)  # same file system: the rename is atomic
        with open(temporary, "w") as f:
            f.write("new")

    previous_mask = os.umask(0o022)
    try:
        write_atomically(str(path), succeeds)
    finally:
        os.umask(previous_mask)
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["metrics.json"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644  # readable by others, like any file the user writes
