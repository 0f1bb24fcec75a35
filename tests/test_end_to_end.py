"""The command line on a tiny CUB-layout folder: train + evaluate, re-evaluate, and bad input."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, write_tiny_cub, xla_flags

# The tiny config over two epochs with the kNN monitor after each: the CLI's whole path in seconds.
TWO_EPOCHS = ("--config=configs/cub.py:tiny", "--config.num_epochs=2", "--config.eval.knn_every_epochs=1")


def run_cli(*args, module="fgpair_jax.main", timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def last_error_line(result) -> str:
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.mark.slow
def test_train_evaluate_and_reevaluate_from_the_cli(tiny_cub, tmp_path):
    workdir = str(tmp_path / "run")
    result = run_cli(*TWO_EPOCHS, f"--workdir={workdir}", f"--config.data.manual_dir={tiny_cub}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "epoch 2/2" in result.stdout + result.stderr
    # Each long phase says what it does (issue 26): lines on stdout, bars on stderr; the libraries' noise is gone.
    for line in ("Building CUB folder (27 images listed) into ", "Compiling the training step", "Evaluating step 4: ",
                 "Results of step 4: ", "Drawing figures into "):
        assert line in result.stdout, (line, result.stdout[-3000:])
    for bar in ("Training: ", "Extracting train features: ", "Extracting test features: ", "Fitting the linear probe: "):
        assert bar in result.stderr, (bar, result.stderr[-3000:])
    for noise in ("Downloading and preparing", "Using custom data configuration", "OpenCV", "Exception ignored"):
        assert noise not in result.stdout + result.stderr, noise

    with open(os.path.join(workdir, "eval", "metrics.json")) as f:
        metrics = json.load(f)
    for key in ("linear_top1", "retrieval_rank1", "retrieval_rank5", "retrieval_map", "knn_top1"):
        assert 0.0 <= metrics[key] <= 100.0, (key, metrics)
    features = np.load(os.path.join(workdir, "eval", "features.npz"))
    assert features["train_features"].shape == (18, 64) and features["test_features"].shape == (9, 64)
    np.testing.assert_array_equal(np.bincount(features["train_labels"]), [6, 6, 6])
    assert np.isfinite(features["train_features"]).all()

    log = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [entry["step"] for entry in log if "loss" in entry] == [1, 2, 3, 4]
    assert any("knn_top1" in entry for entry in log)
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    # fgpair (the default method) draws its figures; they are real PNG files.
    for name in ("gradcam.png", "pairs.png", "loss_curves.png", "retrieval.png", "embedding.png"):
        with open(os.path.join(workdir, "figures", name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    assert any("loss_reconstruction" in entry for entry in log)

    # Re-evaluation of the latest checkpoint (forced: metrics.json scores it) reproduces the run's own evaluation.
    again = run_cli(f"--workdir={workdir}", "--force", module="fgpair_jax.evaluate")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Evaluating step 4: " in again.stdout and "Evaluation (%): linear_top1 " in again.stdout
    assert f"Results of step 4: {workdir}/eval/metrics.json and features.npz (replaced those of step 4)" in again.stdout
    with open(os.path.join(workdir, "eval", "metrics.json")) as f:
        reevaluated = json.load(f)
    for key in ("linear_top1", "retrieval_rank1", "retrieval_map", "knn_top1"):
        assert reevaluated[key] == pytest.approx(metrics[key], abs=1e-6), key

    # Running the same command again finds the run finished and evaluated: no work, the saved result said.
    rerun = run_cli(*TWO_EPOCHS, f"--workdir={workdir}", f"--config.data.manual_dir={tiny_cub}")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "Finished and evaluated at step 4: Evaluation (%): linear_top1 " in rerun.stdout, rerun.stdout[-2000:]
    assert "Compiling" not in rerun.stdout and "Extracting" not in rerun.stderr


def test_missing_data_folder_is_one_clear_error(tmp_path):
    result = run_cli("--config=configs/cub.py:quick", f"--workdir={tmp_path / 'run'}",
                     f"--config.data.manual_dir={tmp_path / 'nowhere'}")
    assert result.returncode != 0
    assert "config.data.manual_dir" in last_error_line(result), result.stderr[-2000:]


def test_unknown_config_key_is_an_error(tmp_path):
    result = run_cli("--config=configs/cub.py:quick", f"--workdir={tmp_path / 'run'}", "--config.no_such_key=1")
    assert result.returncode != 0
    assert "Unknown config key in --config.no_such_key=1" in last_error_line(result), result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_wrongly_typed_config_value_is_an_error(tmp_path):
    result = run_cli("--config=configs/cub.py:quick", f"--workdir={tmp_path / 'run'}", "--config.num_epochs=many")
    assert result.returncode != 0
    assert "num_epochs" in result.stderr


@pytest.mark.slow
def test_indivisible_device_count_tilde_paths_and_evaluating_after_the_data_moved(tmp_path):
    """Two issues' reproductions in one training run (each CLI run costs CI seconds):
    - on 3 devices with global batch 6 the run trained, then died at the first kNN monitor with an
      IndivisibleError (eval batch 16 over 3 devices); the eval batch is now rounded up;
    - `~` in --workdir, data.manual_dir and data.data_dir means $HOME (never a folder named '~' here), and
      `evaluate` takes overrides of data paths and evaluation knobs, refusing any that changes what trained."""
    home = tmp_path / "home"
    write_tiny_cub(str(home / "CUB_200_2011"))
    env = dict(os.environ, JAX_PLATFORMS="cpu", HOME=str(home),
               XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=3"))

    def cli(module, *args):
        return subprocess.run([sys.executable, "-m", module, *args], cwd=str(tmp_path), env=env, capture_output=True,
                              text=True, timeout=600)

    result = cli("fgpair_jax.main", f"--config={os.path.join(REPO, 'configs', 'cub.py')}:tiny", "--workdir=~/run",
                 "--config.data.manual_dir=~/CUB_200_2011", "--config.data.data_dir=~/tfds",
                 "--config.method=moco", "--config.global_batch_size=6", "--config.moco.queue_size=12",
                 "--config.eval.knn_every_epochs=1", "--config.eval.figures=false")  # figures: not checked here
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 3 cpu device(s)" in result.stdout
    assert "config.eval.batch_size=16 rounded up to 18, a multiple of the 3 devices" in result.stdout
    assert "knn_top1" in result.stdout.split("epoch 1/1")[1].splitlines()[0]  # the kNN monitor ran
    features = np.load(home / "run" / "eval" / "features.npz")
    assert features["train_features"].shape[0] == 18 and features["test_features"].shape[0] == 9
    assert not os.path.exists(tmp_path / "~")
    assert (home / "run" / "eval" / "metrics.json").exists() and (home / "tfds").is_dir()

    os.rename(home / "CUB_200_2011", home / "moved")
    shutil.rmtree(home / "tfds")  # the built copy is gone too: evaluation must rebuild from the moved folder
    result = cli("fgpair_jax.evaluate", "--workdir=~/run", "--force")  # forced: metrics.json scores the checkpoint
    assert result.returncode == 2 and "config.data.manual_dir" in last_error_line(result), result.stderr[-2000:]
    result = cli("fgpair_jax.evaluate", "--workdir=~/run", "--config.data.manual_dir=~/moved",
                 "--config.eval.knn_k=2")
    assert result.returncode == 0, result.stderr[-3000:]
    with open(home / "run" / "eval" / "metrics.json") as f:
        assert 0 <= json.load(f)["knn_top1"] <= 100
    result = cli("fgpair_jax.evaluate", "--workdir=~/run", "--config.data.manual_dir=~/moved",
                 "--config.optim.learning_rate=0.5")
    assert result.returncode == 2, result.stderr[-2000:]
    assert last_error_line(result).startswith("error: config.optim.learning_rate defines what this run trained")
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [["--config.fgpair.base=byol"]], ids=["fgpair_byol"])
def test_negative_free_methods_train_and_evaluate_from_the_cli(tiny_cub, tmp_path, overrides):
    """The tiny config from the CLI: train and evaluate (figures: every method's figure arrays are checked in
    tests/test_figures.py, their drawing by the CLI test above). The checkpoint holds the method's own
    state: a target network for BYOL, no queue. fgpair on byol runs BYOL's whole step and target network
    under the pairs; byol's and simsiam's steps alone are checked in-process (test_train_step.py,
    test_simsiam_byol.py), so one CLI run of
    this family is enough (each costs 1-2 minutes of CI)."""
    workdir = str(tmp_path / "run")
    result = run_cli("--config=configs/cub.py:tiny", *overrides, f"--workdir={workdir}",
                     f"--config.data.manual_dir={tiny_cub}", "--config.eval.figures=false")
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(workdir, "eval", "metrics.json")) as f:
        metrics = json.load(f)
    assert 0.0 <= metrics["linear_top1"] <= 100.0 and 0.0 <= metrics["knn_top1"] <= 100.0, metrics
    log = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert all(np.isfinite(entry["loss_ssl"]) for entry in log if "loss" in entry)
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import kill_resume
    saved = kill_resume.final_state_leaves(workdir)
    assert not [name for name in saved if "queue" in name], sorted(saved)[:5]
    assert any("target_params" in name for name in saved) == ("byol" in overrides[0])
