"""The persistent compilation cache of runs (`fgpair_jax/compilation_cache.py`): where it lives, the knob
that moves or turns it off, the folder shared by processes, and the knob's place among resumable keys.
No test here compiles anything."""
import os
import sys

import jax
import pytest
from jax._src import lru_cache
from jax.experimental.compilation_cache import compilation_cache as jax_compilation_cache

from conftest import tiny_config
from fgpair_jax import compilation_cache, run_config
from fgpair_jax.errors import ConfigError

JAX_SETTINGS = ("jax_enable_compilation_cache", "jax_compilation_cache_dir", "jax_compilation_cache_max_size",
                "jax_persistent_cache_min_compile_time_secs", "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture
def jax_settings_restored():
    """The suite's cache settings (conftest.py) back after a test that changes them."""
    before = {name: getattr(jax.config, name) for name in JAX_SETTINGS}
    yield
    for name, value in before.items():
        jax.config.update(name, value)
    jax_compilation_cache.reset_cache()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the XDG rule is Linux's")
def test_default_folder_is_the_users_cache_dir_and_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compilation_cache.default_directory() == str(tmp_path / "home" / ".cache" / "fgpair_jax" / "jax")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compilation_cache.default_directory() == str(tmp_path / "xdg" / "fgpair_jax" / "jax")


def test_auto_takes_jaxs_own_folder_first_then_the_users_and_none_is_off(monkeypatch, tmp_path,
                                                                         jax_settings_restored):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax_own"))
    assert compilation_cache.resolve_directory("auto") == str(tmp_path / "jax_own")
    jax.config.update("jax_compilation_cache_dir", None)
    assert compilation_cache.resolve_directory("auto") == str(tmp_path / "xdg" / "fgpair_jax" / "jax")
    jax.config.update("jax_enable_compilation_cache", False)  # JAX_ENABLE_COMPILATION_CACHE=false
    assert compilation_cache.resolve_directory("auto") is None
    for off in ("", "none", " None "):
        assert compilation_cache.resolve_directory(off) is None
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compilation_cache.resolve_directory("~/jit") == str(tmp_path / "home" / "jit")


def test_enable_points_jax_at_the_folder_with_the_limits_and_none_turns_it_off(tmp_path, jax_settings_restored):
    folder = str(tmp_path / "cache" / "jax")
    assert compilation_cache.enable(folder) == folder
    assert os.path.isdir(folder) and os.stat(folder).st_mode & 0o777 == 0o700  # trusted: the user's own
    assert jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir == folder
    assert jax.config.jax_compilation_cache_max_size == compilation_cache.MAX_SIZE_BYTES
    assert jax.config.jax_persistent_cache_min_compile_time_secs == compilation_cache.MIN_COMPILE_TIME_SECS
    assert compilation_cache.enable("none") is None
    assert not jax.config.jax_enable_compilation_cache


def test_a_folder_that_cannot_be_made_is_one_line_naming_the_knob(tmp_path, jax_settings_restored):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"config\.compilation_cache_dir: cannot create .*'none'") as error:
        compilation_cache.enable(str(blocker / "jax"))
    assert "\n" not in str(error.value)


def test_an_undated_entry_no_longer_stops_a_size_limited_cache_from_writing(tmp_path):
    """JAX's own cache class, as two processes use one folder: one without a size limit (JAX's default)
    writes an entry without its `-atime` date; then every write of a limited one failed (JAX warned
    "Error writing persistent compilation cache entry ...-atime" and cached nothing). Dated, it writes."""
    folder = str(tmp_path / "shared")
    lru_cache.LRUCache(folder, max_size=-1).put("written_without_a_limit", b"x" * 100)
    limited = lru_cache.LRUCache(folder, max_size=10_000)
    with pytest.raises(FileNotFoundError, match="written_without_a_limit-atime"):
        limited.put("new_program", b"y" * 100)
    assert limited.get("new_program") is None

    assert compilation_cache.date_undated_entries(folder) == 1
    assert compilation_cache.date_undated_entries(folder) == 0  # nothing left to date
    limited.put("new_program", b"y" * 100)
    assert limited.get("new_program") == b"y" * 100
    dated = int.from_bytes((tmp_path / "shared" / "written_without_a_limit-atime").read_bytes(), "little")
    assert dated == os.stat(tmp_path / "shared" / "written_without_a_limit-cache").st_mtime_ns


def test_the_knob_may_change_on_resume_and_older_configs_get_the_default():
    config = tiny_config()
    elsewhere = run_config.override(config, {"compilation_cache_dir": "none"})
    assert run_config.changed_training_keys(config, elsewhere) == []
    assert "compilation_cache_dir" not in run_config.training_fingerprint(config)
    older = tiny_config()
    with older.unlocked():
        del older["compilation_cache_dir"]
    assert run_config.migrate(older).compilation_cache_dir == "auto"
