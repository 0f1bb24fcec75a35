"""What a finished run says instead of redoing work (issue 26): eval/metrics.json records the step and the
evaluation config it scored, and `evaluate` on a workdir it already scores returns at once, saying so."""
import json
import os

import pytest

from conftest import tiny_config
from fgpair_jax import evaluate, run_config
from fgpair_jax.errors import MissingFileError


def write_metrics(workdir, **fields):
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    with open(os.path.join(workdir, "eval", "metrics.json"), "w") as f:
        json.dump({"linear_top1": 50.0, "retrieval_rank1": 60.0, "retrieval_rank5": 70.0, "retrieval_map": 40.0,
                   "knn_top1": 55.0, **fields}, f)


def test_saved_metrics_are_current_only_for_their_step_and_evaluation_config(tmp_path):
    workdir, config = str(tmp_path), tiny_config()
    scored_as = evaluate.evaluation_config(config)
    assert scored_as["eval.knn_k"] == config.eval.knn_k and "eval.knn_every_epochs" not in scored_as
    assert "data.eval_crop_fraction" in scored_as and "optim.learning_rate" not in scored_as

    assert evaluate.current_metrics(workdir, 4, config) is None  # no metrics.json
    write_metrics(workdir, step=4, evaluation_config=scored_as)
    assert evaluate.current_metrics(workdir, 4, config)["linear_top1"] == 50.0
    assert evaluate.current_metrics(workdir, 6, config) is None  # a newer checkpoint
    other_k = run_config.override(config, {"eval.knn_k": config.eval.knn_k + 1})
    assert evaluate.current_metrics(workdir, 4, other_k) is None
    # What training's monitor does is no evaluation knob; a changed data path is not either.
    monitor = run_config.override(config, {"eval.knn_every_epochs": config.eval.knn_every_epochs + 1})
    assert evaluate.current_metrics(workdir, 4, monitor)
    assert evaluate.current_metrics(workdir, 4, run_config.override(config, {"data.manual_dir": "/elsewhere"}))

    write_metrics(workdir, step=4)  # written before the evaluation config was recorded: read, never current
    assert evaluate.read_metrics(workdir)["step"] == 4 and evaluate.current_metrics(workdir, 4, config) is None
    write_metrics(workdir)  # before the step was recorded
    assert evaluate.current_metrics(workdir, 4, config) is None
    with open(os.path.join(workdir, "eval", "metrics.json"), "w") as f:
        f.write('{"linear_top1": 5')  # cut short
    assert evaluate.read_metrics(workdir) is None and evaluate.current_metrics(workdir, 4, config) is None


def test_results_line_names_the_step_and_what_it_replaced(tmp_path):
    line = evaluate.results_line(str(tmp_path), 8, {"step": 4})
    assert line == f"Results of step 8: {tmp_path}/eval/metrics.json and features.npz (replaced those of step 4)"
    assert evaluate.results_line(str(tmp_path), 8, None).endswith("features.npz")
    assert evaluate.results_line(str(tmp_path), 8, {}).endswith("(replaced earlier ones)")


@pytest.fixture
def evaluated_workdir(tmp_path):
    """A workdir whose metrics.json scores its latest checkpoint (step 4) under its saved config, whose data
    folder does not exist: any evaluation work would start by failing to load it."""
    workdir = str(tmp_path / "run")
    config = run_config.resolved(tiny_config(**{"data.manual_dir": str(tmp_path / "nowhere")}))
    run_config.save(config, workdir)
    for step in ("2", "4", "6.orbax-checkpoint-tmp"):  # a save in progress is no checkpoint yet
        os.makedirs(os.path.join(workdir, "checkpoints", step))
    write_metrics(workdir, step=4, evaluation_config=evaluate.evaluation_config(config))
    return workdir


def test_evaluate_on_an_evaluated_workdir_does_no_work_and_names_the_step(evaluated_workdir, capsys):
    assert evaluate.latest_checkpoint_step(evaluated_workdir) == 4
    metrics = evaluate.evaluate_workdir(evaluated_workdir)
    assert metrics["step"] == 4 and metrics["linear_top1"] == 50.0
    out = capsys.readouterr().out
    assert out.startswith("Already evaluated: step 4, the latest checkpoint, under this evaluation config: "
                          "Evaluation (%): linear_top1 50.00") and "Pass --force to re-evaluate." in out
    # Forced, or under another evaluation knob, it does the work (here: loading the data, which is gone).
    with pytest.raises(MissingFileError, match="config.data.manual_dir"):
        evaluate.evaluate_workdir(evaluated_workdir, force=True)
    saved = run_config.load(evaluated_workdir)
    other_k = run_config.override(saved, {"eval.knn_k": saved.eval.knn_k + 1})
    with pytest.raises(MissingFileError, match="config.data.manual_dir"):
        evaluate.evaluate_workdir(evaluated_workdir, other_k)
