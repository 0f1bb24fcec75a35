"""The comparison-table runner: arm configs, resumable records, intervals, paired gains, the report."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from configs import cub
from fgpair_jax import experiments, methods, run_config
from fgpair_jax.errors import ConfigError
from fgpair_jax.evaluation import HEADLINE_METRICS


def record(arm, seed, value, base=None, **overrides):
    """A finished run's record; given a base config, with the config `arm_config` gives it (plus overrides)."""
    entry = {"arm": arm, "seed": seed, "metrics": {m: value for m in HEADLINE_METRICS}}
    if base is not None:
        config = run_config.override(experiments.arm_config(base, arm, seed), overrides)
        entry["config"] = json.loads(config.to_json_best_effort())
    return entry


def write_records(results, records):
    os.makedirs(os.path.join(results, "runs"), exist_ok=True)
    for r in records:
        with open(os.path.join(results, "runs", f"{r['arm']}_seed{r['seed']}.json"), "w") as f:
            json.dump(r, f)


def test_arms_change_only_method_criterion_and_seed():
    base = cub.get_config("quick")
    for arm in experiments.ARMS:
        config = experiments.arm_config(base, arm, seed=7)
        assert config.seed == 7
        assert config.num_epochs == (0 if arm == "init" else base.num_epochs)
        assert config.data.image_size == base.data.image_size
        assert config.model.init == base.model.init and config.global_batch_size == base.global_batch_size
    assert experiments.arm_config(base, "variance", 0).fgpair.criterion == "variance"
    assert experiments.arm_config(base, "moco", 0).method == "moco"
    assert base.seed == 0 and base.method == "fgpair"  # the base is not modified
    assert experiments.arm_config(base, "simsiam", 0).method == "simsiam"
    assert experiments.arm_config(base, "byol", 0).method == "byol"
    on_simsiam = experiments.arm_config(base, "fgpair_simsiam", 0)
    assert (on_simsiam.method, on_simsiam.fgpair.base, on_simsiam.fgpair.criterion) == ("fgpair", "simsiam", "both")
    assert experiments.arm_config(base, "fgpair_byol", 0).fgpair.base == "byol"
    with pytest.raises(ValueError, match="Unknown arm 'simclr'"):
        experiments.arm_config(base, "simclr", 0)


def test_an_unavailable_metric_is_left_out_of_means_and_gains(tmp_path):
    records = [record("moco", 0, 50.0), record("moco", 1, 60.0), record("fgpair", 0, 52.0), record("fgpair", 1, 61.0)]
    records[1]["metrics"]["retrieval_rank1"] = None  # moco seed 1 could not compute retrieval
    for r in records[2:]:
        r["metrics"]["retrieval_map"] = None  # no fgpair run could
    summary = experiments.summarize(records)
    assert summary["moco"]["metrics"]["retrieval_rank1"][0] == 50.0
    assert summary["fgpair"]["gain_over_moco"]["retrieval_rank1"][2] == 1  # only seed 0 pairs
    assert "retrieval_map" not in summary["fgpair"]["gain_over_moco"]
    table = experiments.markdown_table(summary)
    assert "n/a" in table and "| fgpair | 2 | 56.50 ± " in table
    os.makedirs(tmp_path / "runs")
    for r in records:
        with open(tmp_path / "runs" / f"{r['arm']}_seed{r['seed']}.json", "w") as f:
            json.dump(r, f)
    experiments.write_report(str(tmp_path))  # the plot and strict JSON take the gaps too
    assert (tmp_path / "plot.png").exists() and json.load(open(tmp_path / "summary.json"))


def test_interval_is_the_student_t_interval():
    mean, half = experiments.mean_and_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    np.testing.assert_allclose(half, 4.302652729911275 * 1.0 / np.sqrt(3))  # t(0.975, 2) * s / sqrt(n)
    assert np.isnan(experiments.mean_and_interval([5.0])[1])


def test_gain_over_moco_is_paired_by_seed():
    records = [record("moco", 0, 50.0), record("moco", 1, 60.0), record("moco", 2, 70.0),
               record("fgpair", 0, 52.0), record("fgpair", 1, 63.0), record("fgpair", 2, 71.0),
               record("lcr", 5, 80.0)]  # no seed shared with moco: no gain
    summary = experiments.summarize(records)
    gain_mean, gain_half, paired = summary["fgpair"]["gain_over_moco"]["linear_top1"]
    assert paired == 3 and gain_mean == pytest.approx(2.0)
    np.testing.assert_allclose(gain_half, experiments.mean_and_interval([2.0, 3.0, 1.0])[1])
    assert summary["lcr"]["gain_over_moco"] == {} and summary["moco"]["gain_over_moco"] == {}
    table = experiments.markdown_table(summary)
    assert "| fgpair | 3 | 62.00 ± " in table and "| lcr | 1 | 80.00 |" in table and "Gain over moco" in table


def test_finished_runs_are_not_run_again_and_the_report_is_written(tmp_path):
    results, quick = str(tmp_path / "results"), cub.get_config("quick")
    write_records(results, [record(arm, seed, value, quick) for arm, seed, value in (
        ("moco", 0, 40.0), ("moco", 1, 42.0), ("fgpair", 0, 41.0), ("fgpair", 1, 45.0))])
    # Finished under the same config: returns the stored record without importing or running any training.
    again = experiments.run_one(quick, "fgpair", 1, str(tmp_path / "root"), results)
    assert again["metrics"]["linear_top1"] == 45.0 and not os.path.exists(tmp_path / "root")
    summary = experiments.write_report(results)
    assert summary["fgpair"]["gain_over_moco"]["retrieval_rank1"][0] == pytest.approx(2.0)
    with open(os.path.join(results, "plot.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| moco | 2 | 41.00 ± " in open(os.path.join(results, "table.md")).read()


def test_zero_step_run_draws_no_loss_curves(tmp_path):
    """The `init` arm logs no step: its figures must skip the loss curves, not fail on an empty plot."""
    from fgpair_jax import viz

    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "eval/linear_top1": 80.0}\n')
    assert viz.save_loss_curves(str(tmp_path / "metrics.jsonl"), str(tmp_path / "curves.png")) is False
    assert not (tmp_path / "curves.png").exists()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 6.0}\n{"step": 2, "loss": 5.5}\n')
    assert viz.save_loss_curves(str(tmp_path / "metrics.jsonl"), str(tmp_path / "curves.png")) is True
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_feature_drift_compares_runs_with_init_and_with_moco_of_the_same_seed(tmp_path):
    rng = np.random.default_rng(0)
    start, other_start = rng.normal(size=(50, 6)), rng.normal(size=(50, 6))
    runs = {"init_seed0": start, "init_seed1": other_start, "moco_seed0": start * 2.0,
            "moco_seed1": other_start + 3.0, "moco_seed2": rng.normal(size=(50, 6)),
            "fgpair_seed0": start + 1.0, "random_seed0": np.ones((50, 6)), "gradcam_seed0": start[:40],
            "lcr_seed0": None, "notes": None}  # lcr unfinished, notes no run
    for name, test in runs.items():
        os.makedirs(tmp_path / name / "eval")
        if test is not None:
            np.savez(tmp_path / name / "eval" / "features.npz", test_features=test, train_features=test)
    found = experiments.finished_features(str(tmp_path))
    assert ("lcr", 0) not in found and len(found) == 8
    drift = experiments.feature_drift(found)
    assert drift["from_init"]["moco_seed0"] == pytest.approx(1.0)  # scale does not count as drift
    assert drift["from_init"]["moco_seed1"] == pytest.approx(1.0)  # against init of its own seed
    assert drift["init_reference"]["moco_seed1"] == "init_seed1"
    assert drift["init_reference"]["moco_seed2"] == "init_seed0" and drift["from_init"]["moco_seed2"] < 0.9
    assert drift["vs_moco"]["fgpair_seed0"] == pytest.approx(1.0)  # a shift does not count either
    assert drift["vs_moco"]["random_seed0"] is None  # constant features: 0/0, not NaN in the JSON
    assert drift["vs_moco"]["gradcam_seed0"] is None  # other images: not comparable
    assert set(drift["moco_across_seeds"]) == {"seed0_seed1", "seed0_seed2", "seed1_seed2"}


def test_init_reference_gets_no_gain_row_and_one_seed_intervals_are_null_in_json(tmp_path):
    results = str(tmp_path)
    os.makedirs(os.path.join(results, "runs"))
    for arm, seed, value in (("moco", 0, 40.0), ("init", 0, 30.0), ("fgpair", 0, 41.0)):
        with open(os.path.join(results, "runs", f"{arm}_seed{seed}.json"), "w") as f:
            json.dump(record(arm, seed, value), f)
    summary = experiments.write_report(results)
    assert summary["init"]["gain_over_moco"] == {} and summary["fgpair"]["gain_over_moco"]
    with open(os.path.join(results, "summary.json")) as f:
        assert json.load(f)["fgpair"]["metrics"]["linear_top1"] == [41.0, None]


def test_a_results_folder_of_another_data_set_is_refused_before_any_training(tmp_path):
    """The comparison runner runs on each data set; one results folder holds one, named in table.md."""
    from fgpair_jax.errors import ConfigError
    cub_run = {"arm": "moco", "seed": 0, "config": {"data": {"name": "cub", "manual_dir": "/d/CUB_200_2011",
                                                             "eval_split": "test"}}}
    assert experiments.data_of([cub_run]) == "cub (CUB_200_2011), eval split test"
    cars_run = {"arm": "lcr", "seed": 1, "config": {"data": {"name": "cars", "manual_dir": "/d/cars/",
                                                             "eval_split": "test"}}}
    with pytest.raises(ConfigError) as excinfo:
        experiments.data_of([cub_run, cars_run])
    message = str(excinfo.value)
    assert "\n" not in message and "moco seed 0 ran on cub (CUB_200_2011)" in message and "cars (cars)" in message
    assert "its own --results" in message


def test_a_finished_run_of_another_training_config_is_refused_in_one_line_naming_the_key(tmp_path):
    """The issue: a `tiny` experiment given the quick table's --results got the quick numbers back."""
    results, tiny = str(tmp_path), cub.get_config("tiny")
    write_records(results, [record("moco", 0, 40.0, tiny, num_epochs=2),
                            record("fgpair", 0, 41.0, tiny, **{"eval.knn_k": 5, "data.manual_dir": "/elsewhere"}),
                            record("lcr", 0, 42.0)])  # no config recorded
    with pytest.raises(ConfigError) as excinfo:
        experiments.run_one(tiny, "moco", 0, str(tmp_path / "root"), results)
    message = str(excinfo.value)
    assert "\n" not in message and "moco_seed0.json was trained with config.num_epochs=2" in message
    assert "asks for config.num_epochs=1" in message and "another --results folder" in message
    assert "delete that file to retrain" in message
    with pytest.raises(ConfigError, match="lcr_seed0.json records no config"):
        experiments.finished_record(tiny, "lcr", 0, results)
    # Evaluation knobs and data paths do not define training (`run_config.MAY_CHANGE_ON_RESUME`): reused.
    assert experiments.finished_record(tiny, "fgpair", 0, results)["metrics"]["linear_top1"] == 41.0
    assert experiments.finished_record(tiny, "fgpair", 1, results) is None  # not finished
    assert not os.path.exists(tmp_path / "root")


def test_a_record_predating_a_key_compares_it_at_the_value_runs_had_before_it(tmp_path):
    tiny = cub.get_config("tiny")
    old = record("fgpair", 0, 40.0, tiny)
    del old["config"]["fgpair"]["base"]  # written before issue 24: fgpair had only MoCo under it
    write_records(str(tmp_path), [old])
    assert experiments.finished_record(tiny, "fgpair", 0, str(tmp_path)) is not None
    with pytest.raises(ConfigError, match="config.fgpair.base='moco', but this experiment asks for "
                                          "config.fgpair.base='simsiam'"):
        experiments.finished_record(run_config.override(tiny, {"fgpair.base": "simsiam"}), "fgpair", 0, str(tmp_path))


def test_a_run_is_compared_on_its_own_methods_knobs_only(tmp_path):
    """A moco run does not read `lcr.*` or `fgpair.*`: a change there reuses it; lcr (built on moco) reads both."""
    tiny = cub.get_config("tiny")
    changed = {"lcr.attention_channels": 0, "fgpair.sigma": 9.0}
    write_records(str(tmp_path), [record("moco", 0, 40.0, tiny, **changed), record("lcr", 0, 41.0, tiny, **changed),
                                  record("lcr", 1, 42.0, tiny)])
    assert experiments.finished_record(tiny, "moco", 0, str(tmp_path))["metrics"]["linear_top1"] == 40.0
    with pytest.raises(ConfigError, match="config.lcr.attention_channels=0"):
        experiments.finished_record(tiny, "lcr", 0, str(tmp_path))
    with pytest.raises(ConfigError, match="config.moco.temperature"):
        experiments.finished_record(run_config.override(tiny, {"moco.temperature": 0.5}), "lcr", 1, str(tmp_path))


def test_the_table_holds_the_requested_arms_and_seeds_and_says_why_no_gain_column(tmp_path):
    write_records(str(tmp_path), [record("moco", 0, 40.0), record("moco", 1, 44.0), record("fgpair", 0, 41.0),
                                  record("fgpair", 1, 47.0), record("lcr", 0, 30.0)])
    summary = experiments.write_report(str(tmp_path), arms=["moco", "fgpair"], seeds=[0])
    assert list(summary) == ["moco", "fgpair"] and summary["fgpair"]["seeds"] == [0]
    assert summary["fgpair"]["gain_over_moco"]["linear_top1"][0] == pytest.approx(1.0)
    summary = experiments.write_report(str(tmp_path), arms=["lcr", "fgpair"], seeds=None)
    table = open(tmp_path / "table.md").read()
    assert list(summary) == ["lcr", "fgpair"] and "| fgpair | 2 | 44.00 ± " in table and "| moco |" not in table
    assert "No gain over moco: moco is not among the tabulated arms (add it to --arms)." in table
    assert set(experiments.write_report(str(tmp_path))) == {"moco", "lcr", "fgpair"}  # None: the whole folder


def test_the_runner_reuses_same_config_runs_tabulates_only_the_request_and_refuses_stale_ones_first(tmp_path):
    """The command line, without any training: same-config runs are reused and said so, the table holds
    the requested arms x seeds, and a stale record is refused before an unfinished run would train."""
    tiny = cub.get_config("tiny")
    reused, stale = str(tmp_path / "reused"), str(tmp_path / "stale")
    write_records(reused, [record("moco", 0, 40.0, tiny), record("fgpair", 0, 41.0, tiny),
                           record("lcr", 0, 42.0, tiny), record("moco", 1, 43.0, tiny)])
    write_records(stale, [record("fgpair", 0, 41.0, tiny, **{"optim.learning_rate": 0.1})])  # moco_seed0 unfinished
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    command = [sys.executable, "-m", "fgpair_jax.experiments", "--config=configs/cub.py:tiny", "--arms=moco,fgpair",
               "--seeds=0", f"--root={tmp_path / 'root'}"]
    runs = [subprocess.Popen([*command, f"--results={results}"], cwd=REPO, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for results in (reused, stale)]
    (out, err), (_, stale_err) = [run.communicate(timeout=300) for run in runs]
    assert runs[0].returncode == 0, err[-3000:]
    assert "moco_seed0: reused (same config)" in out and "fgpair_seed0: reused (same config)" in out
    assert "===" not in out and f"Wrote table.md, plot.png, summary.json to {reused}/" in out
    table = open(os.path.join(reused, "table.md")).read()
    assert "| moco | 1 | 40.00 |" in table and "| fgpair | 1 | 41.00 |" in table and "lcr" not in table
    assert runs[1].returncode == 2, stale_err[-3000:]
    assert stale_err.startswith("error: ") and len(stale_err.strip().splitlines()) == 1
    assert "fgpair_seed0.json was trained with config.optim.learning_rate=0.1" in stale_err
    assert not os.path.exists(tmp_path / "root")  # nothing trained, not even the unfinished moco_seed0


def test_a_runs_header_names_the_ablation_it_runs():
    quick = cub.get_config("quick")
    assert methods.arm_of(experiments.arm_config(quick, "variance", 0)) == ("variance", {"fgpair.criterion": "variance"})
    assert methods.arm_of(experiments.arm_config(quick, "fgpair_simsiam", 0))[0] == "fgpair_simsiam"
    assert methods.arm_of(experiments.arm_config(quick, "fgpair", 0))[0] == "fgpair"
    assert methods.arm_of(experiments.arm_config(quick, "moco", 0)) == ("moco", {})

