"""Validation splits carved from train: stratified, fixed, disjoint from what SSL trains on, and the
test split out of reach when tuning (config.data.eval_split = "val")."""
import numpy as np
import pytest

from conftest import tiny_config
from fgpair_jax import checkpointing, run_config
from fgpair_jax.data import splits
from fgpair_jax.data.builder import SourceInfo


def fake_train(labels):
    return [{"label": label, "image_id": i} for i, label in enumerate(labels)]


def fake_info(train_size, test_size):
    return SourceInfo(num_classes=3, class_ids=(1, 2, 3), class_names=("a", "b", "c"),
                         split_sizes={"train": train_size, "test": test_size},
                         skipped_files={"train": (), "test": ()}, builder_dir="/nowhere")


def test_validation_as_eval_is_a_stratified_part_of_train_and_drops_the_test_split():
    labels = np.repeat([0, 1, 2], [10, 20, 1])
    train = fake_train(labels)
    test = [{"label": 0, "image_id": -1}]  # must never appear
    sources, info = splits.with_validation_as_eval({"train": train, "test": test}, fake_info(31, 1), 0.1)
    fit_ids = {sources["train"][i]["image_id"] for i in range(len(sources["train"]))}
    val_ids = {sources["test"][i]["image_id"] for i in range(len(sources["test"]))}
    assert fit_ids.isdisjoint(val_ids) and fit_ids | val_ids == set(range(31))
    val_labels = [train[i]["label"] for i in val_ids]
    assert [val_labels.count(c) for c in range(3)] == [1, 2, 0]  # round(0.1 n_c); a singleton class is kept
    assert info.split_sizes == {"train": 28, "test": 3}
    again, _ = splits.with_validation_as_eval({"train": train, "test": test}, fake_info(31, 1), 0.1)
    assert [again["test"][i]["image_id"] for i in range(3)] == [sources["test"][i]["image_id"] for i in range(3)]


def test_bad_eval_split_settings_are_one_line_errors():
    with pytest.raises(ValueError, match=r"eval_split='validation'; use 'test' .* or 'val'"):
        splits.check_eval_split("validation", 0.1)
    with pytest.raises(ValueError, match=r"val_fraction=1.0 must lie strictly between 0 and 1"):
        splits.check_eval_split("val", 1.0)
    splits.check_eval_split("test", 5.0)  # the fraction only matters when tuning


def test_a_tuning_checkpoint_does_not_resume_as_a_final_run():
    tuning, final = tiny_config(**{"data.eval_split": "val"}), tiny_config()
    shapes = {"shapes": {"params": [1]}}
    saved = {**checkpointing.fingerprint(tuning, {}), **shapes}
    expected = {**checkpointing.fingerprint(final, {}), **shapes}
    assert "trained_on is 'train minus a 0.1 validation part'" in checkpointing.describe_mismatch(saved, expected)
    older = {k: v for k, v in expected.items() if k != "trained_on"}  # written before the key existed
    assert checkpointing.describe_mismatch(older, expected) is None


def test_tuning_sources_hold_out_part_of_the_built_train_split_and_never_the_test_split(tiny_cub, tmp_path):
    from fgpair_jax.data import sources as data_sources

    final = tiny_config(**{"data.manual_dir": tiny_cub, "data.data_dir": str(tmp_path / "tfds")})
    tuning = tiny_config(**{"data.manual_dir": tiny_cub, "data.data_dir": str(tmp_path / "tfds"),
                            "data.eval_split": "val", "data.val_fraction": 0.34})
    built, _ = data_sources.load_sources(final, str(tmp_path))
    carved, info = data_sources.load_sources(tuning, str(tmp_path))

    def ids(source):
        return {int(source[i]["image_id"]) for i in range(len(source))}

    # 18 train images, 3 classes of 6: 2 per class held out, the other 12 train SSL and the probe.
    assert info.split_sizes["train"] == len(carved["train"]) == 12
    assert info.split_sizes["test"] == len(carved["test"]) == 6
    assert sorted(np.bincount([carved["test"][i]["label"] for i in range(6)])) == [2, 2, 2]
    assert ids(carved["train"]) | ids(carved["test"]) == ids(built["train"])
    assert ids(carved["train"]).isdisjoint(ids(carved["test"]))
    assert ids(carved["test"]).isdisjoint(ids(built["test"]))


def test_a_fraction_that_holds_out_nothing_is_refused_before_training():
    labels = np.repeat([0, 1, 2], 30)
    with pytest.raises(ValueError, match=r"val_fraction=0.01 holds out no image .* raise it"):
        splits.with_validation_as_eval({"train": fake_train(labels), "test": []}, fake_info(90, 0), 0.01)


def test_a_run_saved_before_eval_split_existed_reloads_as_the_final_run_it_was(tmp_path):
    import json

    saved = tiny_config().to_dict()
    del saved["data"]["eval_split"], saved["data"]["val_fraction"], saved["eval"]["probe_weight_decays"]
    with open(tmp_path / "config.json", "w") as f:
        json.dump(saved, f)
    config = run_config.load(str(tmp_path))
    assert config.data.eval_split == "test" and config.data.val_fraction == 0.1
    assert tuple(config.eval.probe_weight_decays)[0] == 0.0  # the probe grid those runs were scored with
    assert config.model.name == "resnet_tiny"  # the saved values themselves are kept
