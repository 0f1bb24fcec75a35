"""Finished work is never lost to a later failure: the epoch's checkpoint is saved before its kNN monitor,
and figures (diagnostics, drawn after the metrics are written) cannot fail a finished run."""
import os

import pytest

from conftest import tiny_config
from fgpair_jax import features, train, viz
from fgpair_jax.errors import ConfigError
from fgpair_jax.methods import fgpair


def test_a_failing_knn_monitor_keeps_the_epochs_checkpoint(tiny_cub, tmp_path, monkeypatch):
    def broken_monitor(*args, **kwargs):
        raise RuntimeError("monitor broke")

    monkeypatch.setattr(features, "knn_monitor", broken_monitor)
    config = tiny_config(**{"data.manual_dir": tiny_cub, "eval.knn_every_epochs": 1, "checkpoint_every_steps": 100})
    with pytest.raises(RuntimeError, match="monitor broke"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert "2" in os.listdir(tmp_path / "run" / "checkpoints")  # 18 images / batch 8: epoch 1 ends at step 2


def test_failing_figures_are_a_warning_and_the_metrics_are_returned(tiny_cub, tmp_path, monkeypatch, capsys):
    def broken_figures(*args, **kwargs):
        raise ValueError("no backend\nsecond line")

    monkeypatch.setattr(viz, "write_figures", broken_figures)
    metrics = train.train_and_evaluate(tiny_config(**{"data.manual_dir": tiny_cub}), str(tmp_path / "run"))
    assert 0 <= metrics["linear_top1"] <= 100 and (tmp_path / "run" / "eval" / "metrics.json").exists()
    out = capsys.readouterr()
    assert "Warning: the figures failed (ValueError: no backend)" in out.out + out.err
    assert "Traceback" not in out.out + out.err


def test_an_image_size_the_decoder_cannot_reach_is_a_config_error():
    with pytest.raises(ConfigError, match="config.data.image_size=72"):
        fgpair.validate(tiny_config(**{"data.image_size": 72}))
    fgpair.validate(tiny_config(**{"data.image_size": 72, "fgpair.decode_from": "feature_map"}))  # resizes to S
