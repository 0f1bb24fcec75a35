"""The command lines' one-line errors for mistyped arguments, and the default run directory."""
import os
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from conftest import REPO
from configs import cub, cub_ablations
from fgpair_jax import cli, experiments, run_config


def parse_error(*args):
    """The `flags.Error` absl raises for `args` against a fresh `--config` flag, and its flag values."""
    flag_values, argv = flags.FlagValues(), ["prog", *args]
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, sys_argv=argv)
    with pytest.raises(flags.Error) as excinfo:
        flag_values(argv)
    return excinfo.value, flag_values


def test_a_wrongly_typed_override_is_one_line_naming_the_type_and_the_configs_value():
    error, flag_values = parse_error(f"--config={REPO}/configs/cub.py:tiny", "--config.num_epochs=two")
    assert cli.flag_error_line(error, flag_values) == (
        "--config.num_epochs=two: config.num_epochs takes an int (the config has 1), not 'two'.")


@pytest.mark.parametrize("argument,names", [
    ("cub.py:quik", "configs/cub.py has no variant 'quik': use one of paper, quick, medium, scratch, tiny"),
    ("cub_ablations.py:varience,tiny", "ARM one of fgpair, fgpair_residual, variance, gradcam"),
    ("cub_ablations.py:variance,quik", "VARIANT one of paper, quick, medium, scratch, tiny"),
])
def test_a_config_variant_typo_is_one_line_listing_the_valid_ones(argument, names):
    error, flag_values = parse_error(f"--config={REPO}/configs/{argument}")
    line = cli.flag_error_line(error, flag_values)
    assert line.startswith(f"--config={REPO}/configs/{argument}: ") and names in line
    assert "\n" not in line and "Traceback" not in line


def test_the_ablation_configs_are_the_tables_arms_under_the_same_names(capsys):
    quick = cub.get_config("quick")
    for arm in cub_ablations.fgpair_arms():
        ablation = cub_ablations.get_config(f"{arm},quick")
        assert run_config.changed_training_keys(experiments.arm_config(quick, arm, 0), ablation) == [], arm
    assert capsys.readouterr().err == ""
    assert cub_ablations.get_config("both,quick") == cub_ablations.get_config("fgpair,quick")  # the former name
    assert capsys.readouterr().err.count("is now called fgpair") == 1


@pytest.mark.parametrize("argument,label", [
    ("configs/cub.py:quick", "cub_quick"), ("configs/cub.py:tiny", "cub_tiny"), ("configs/cub.py", "cub_paper"),
    ("configs/cub_ablations.py:variance,tiny", "cub_ablations_variance_tiny"), ("/x/configs/cars.py:quick", "cars_quick"),
])
def test_the_default_workdir_is_the_config_files_and_variants(argument, label):
    assert cli.config_label(argument) == label
    assert cli.default_workdir(argument) == os.path.join("workdirs", label)  # the README's workdirs/cub_quick


def test_command_line_typos_are_one_line_with_status_2_from_every_command(tmp_path):
    """The issue's reproductions; each fails while its flags are parsed or checked, before any JAX work."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(cub.get_config("tiny").to_json())
    commands = {
        "fgpair_jax.main": (["--config=configs/cub.py:quik"], "error: --config=configs/cub.py:quik: configs/cub.py "
                                                               "has no variant 'quik'"),
        "fgpair_jax.evaluate": ([f"--workdir={workdir}", "--config.num_epochs=two"],
                                "error: --config.num_epochs=two: config.num_epochs takes an int"),
        "fgpair_jax.experiments": (["--arms=mocco,fgpair", f"--root={tmp_path / 'root'}"],
                                   "error: --arms=mocco,fgpair: unknown arm(s) mocco; choose from moco,"),
    }
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    running = {module: subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for module, (args, _) in commands.items()}
    for module, process in running.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 2, (module, stderr[-2000:])
        assert len(stderr.strip().splitlines()) == 1 and stderr.startswith(commands[module][1]), (module, stderr)
    assert not (tmp_path / "root").exists()


def test_a_config_file_that_does_not_exist_is_one_line_listing_the_ones_there(monkeypatch):
    monkeypatch.chdir(REPO)
    line = cli.missing_config_file(["prog", "--config=configs/cubb.py:quick", "--config.num_epochs=2"])
    assert line.startswith("--config=configs/cubb.py:quick: no config file 'configs/cubb.py'")
    assert line.endswith("configs/ has aircraft.py, cars.py, common.py, cub.py, cub_ablations.py, image_folder.py.")
    assert cli.missing_config_file(["prog", "--config=configs/cub.py:quik"]) is None  # the file exists
    assert cli.missing_config_file(["prog", "--config.eval.knn_k=3"]) is None  # evaluate: the workdir's config
