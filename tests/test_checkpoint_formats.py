"""Checkpoints of other projects in, torchvision-layout state dicts out (issue 25).

Each format is a tiny checkpoint this file writes itself around the 8-channel `resnet_tiny` encoder:
MoCo v2 / LCR (`main_moco.py`: DDP state dict with encoder_q, encoder_k, queue, MLP head; LCR adds
conv16/bn16), plain DDP (`module.`), Lightning / solo-learn (`backbone.` beside `momentum_backbone.`,
pickled hyper-parameter objects), mmselfsup (`backbone.` beside `momentum_encoder.0.`), VISSL (`trunk.
_feature_blocks.`), lightly's numbered `nn.Sequential` of torchvision's children, and `.safetensors`
(written without torch, and by the `safetensors` package when installed). `.pth` files need torch (the
dev extra); the `.safetensors` and error tests do not.
"""
import argparse
import os
import pickle

import jax
import ml_collections
import numpy as np
import pytest

from conftest import tiny_config
from fgpair_jax import export, models, pretrained, run, safetensors_io, train
from fgpair_jax.methods import checkpoint_branches
from test_pretrained import torchvision_resnet_shapes

TINY = ml_collections.ConfigDict({"name": "resnet_tiny", "bn_groups": 1, "init_prefix": ""})


class TrainingArguments:
    """Stands for an SSL library's pickled hyper-parameters (a class the reader must never import)."""

    def __init__(self, lr):
        self.lr = lr


class RunsCode:
    """A pickle that would run `touch <path>` when unpickled by `pickle.load`."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def random_encoder(name="resnet_tiny", seed=0):
    """{"params", "batch_stats"} of the named encoder with random values, BN variances positive (no
    compilation: the shapes come from eval_shape)."""
    shapes = models.abstract_encoder_variables(ml_collections.ConfigDict({"name": name, "bn_groups": 1}))
    rng = np.random.RandomState(seed)
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    values = [(np.abs(rng.randn(*s.shape)) + 0.5 if path[-1].key == "var" else rng.randn(*s.shape)).astype(np.float32)
              for path, s in flat]
    return jax.tree.unflatten(jax.tree.structure(shapes), values)


ENCODER = random_encoder()
MOMENTUM = random_encoder(seed=1)
STATE = export.torchvision_state_dict(ENCODER)  # torchvision names of resnet_tiny
MOMENTUM_STATE = export.torchvision_state_dict(MOMENTUM)


def assert_same_encoder(loaded, expected=ENCODER):
    for collection in ("params", "batch_stats"):
        got = jax.tree_util.tree_flatten_with_path(loaded[collection])[0]
        want = dict(jax.tree_util.tree_flatten_with_path(expected[collection])[0])
        assert len(got) == len(want)
        for path, value in got:
            np.testing.assert_array_equal(np.asarray(value), want[path], err_msg=str(path))


def imported(path, method="moco", model=TINY, prefix=""):
    model = model.copy_and_resolve_references()
    model.init_prefix = prefix
    return models.import_init(str(path), model, method=method, method_branches=checkpoint_branches())


def torch_tensors(state):
    torch = pytest.importorskip("torch")
    return {key: torch.from_numpy(np.array(value)) for key, value in state.items()}


def moco_state_dict(lcr=False):
    """main_moco.py's DDP MoCo v2 (or LCR builder.py) state dict around the tiny encoder."""
    torch = pytest.importorskip("torch")
    state = {"module.queue": torch.randn(16, 32), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    state.update({f"module.encoder_q.{k}": v for k, v in torch_tensors(STATE).items()})
    state.update({f"module.encoder_q.fc.0.weight": torch.randn(64, 64), "module.encoder_q.fc.0.bias": torch.randn(64),
                  "module.encoder_q.fc.2.weight": torch.randn(16, 64), "module.encoder_q.fc.2.bias": torch.randn(16)})
    state.update({f"module.encoder_k.{k}": v for k, v in torch_tensors(MOMENTUM_STATE).items()})
    state.update({f"module.encoder_k.fc.0.weight": torch.randn(64, 64), "module.encoder_k.fc.0.bias": torch.randn(64),
                  "module.encoder_k.fc.2.weight": torch.randn(16, 64), "module.encoder_k.fc.2.bias": torch.randn(16)})
    if lcr:
        state["module.conv16.weight"] = torch.randn(32, 64, 1, 1)
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            state[f"module.bn16.{leaf}"] = torch.rand(32) + 0.5
        state["module.bn16.num_batches_tracked"] = torch.tensor(7)
        state.update({"module.conv16_2.weight": torch.randn(1, 32, 1, 1), "module.queue_max": torch.randn(16, 32),
                      "module.qmax.0.weight": torch.randn(64, 64), "module.qmax.2.weight": torch.randn(16, 64)})
    return state


def save_moco(path, lcr=False):
    torch = pytest.importorskip("torch")
    optimizer = {"state": {0: {"momentum_buffer": torch.randn(8, 3, 7, 7)}}, "param_groups": [{"lr": 0.03, "params": [0]}]}
    torch.save({"epoch": 800, "arch": "resnet50", "state_dict": moco_state_dict(lcr), "optimizer": optimizer}, path)
    return path


# ----------------------------------------------------------------------------- the three reproductions


def test_moco_v2_checkpoint_loads_the_online_encoder_and_says_what_it_dropped(tmp_path):
    path = save_moco(tmp_path / "moco_v2_800ep_pretrain.pth.tar")
    variables, summary = imported(path)
    assert_same_encoder(variables["encoder"])  # encoder_q, not encoder_k
    assert "\n" not in summary
    assert "prefix 'state_dict.module.encoder_q.' (72 entries)" in summary  # torchvision's 72, no fc
    for dropped in ("fc.0 (2)", "fc.2 (2)", "state_dict.module.queue", "state_dict.module.encoder_k (", "optimizer"):
        assert dropped in summary, (dropped, summary)


def test_ddp_checkpoint_with_module_prefix_loads(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in torch_tensors(STATE).items()}, path)
    variables, summary = imported(path)
    assert_same_encoder(variables["encoder"])
    assert "prefix 'module.'" in summary
    # The second try: MoCo's state dict with `module.encoder_q.` stripped by hand keeps its MLP head.
    stripped = tmp_path / "stripped.pth"
    torch.save({k[len("module.encoder_q."):]: v for k, v in moco_state_dict().items()
                if k.startswith("module.encoder_q.")}, stripped)
    variables, summary = imported(stripped)
    assert_same_encoder(variables["encoder"])
    assert "prefix '' (72 entries); dropped fc.0 (2), fc.2 (2)." in summary, summary


@pytest.mark.parametrize("writer", ["ours", "safetensors"])
def test_safetensors_with_torchvision_names_loads(tmp_path, writer):
    path = str(tmp_path / "resnet.safetensors")
    state = dict(STATE, **{"fc.weight": np.zeros((5, 64), np.float32), "fc.bias": np.zeros(5, np.float32)})
    if writer == "ours":
        safetensors_io.write(path, state)
    else:
        save_file = pytest.importorskip("safetensors.numpy").save_file
        save_file({k: np.atleast_1d(v) if v.ndim == 0 else v for k, v in state.items()}, path)
    variables, summary = imported(path)
    assert_same_encoder(pretrained.without_classifier(variables["encoder"]))
    assert variables["encoder"]["params"]["fc"]["kernel"].shape == (64, 5)  # kept aside, as for ImageNet files
    assert "prefix ''" in summary and "classifier fc kept aside" in summary


def test_the_three_reproductions_pass_the_preflight_and_start_a_run(tmp_path):
    """What train.py runs before any data: the check reads names and shapes only; then the run's state."""
    torch = pytest.importorskip("torch")
    moco = save_moco(tmp_path / "moco.pth.tar")
    ddp = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in torch_tensors(STATE).items()}, ddp)
    safe = tmp_path / "r.safetensors"
    safetensors_io.write(str(safe), STATE)
    for path in (moco, ddp, safe):
        config = tiny_config(**{"method": "moco", "model.name": "resnet_tiny", "model.init": str(path)})
        assert "encoder at prefix" in run.check_init_checkpoint(config)
        variables = run.pretrained_variables(config, str(tmp_path / "run"))
        assert_same_encoder({c: variables[c]["encoder"] for c in ("params", "batch_stats")})


# ----------------------------------------------------------------------------- LCR and the SSL libraries' layouts


def test_lcr_checkpoint_loads_its_attention_branch_into_method_lcr(tmp_path):
    path = save_moco(tmp_path / "checkpoint_0099.pth.tar", lcr=True)
    held = pretrained.read_checkpoint(str(path))["state_dict"]
    config = tiny_config(**{"method": "lcr", "model.name": "resnet_tiny", "model.init": str(path), "num_epochs": 0})
    summary = run.check_init_checkpoint(config)
    assert "lcr's bn16/conv16 beside it" in summary and "conv16_2" not in summary.split("beside it")[0]
    variables = run.pretrained_variables(config, str(tmp_path / "run"))
    branch_params, branch_stats = variables["params"]["attention"], variables["batch_stats"]["attention"]
    np.testing.assert_array_equal(branch_params["conv"]["kernel"],
                                  held["module.conv16.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(branch_params["bn"]["scale"], held["module.bn16.weight"])
    np.testing.assert_array_equal(branch_stats["bn"]["var"], held["module.bn16.running_var"])
    assert_same_encoder({c: variables[c]["encoder"] for c in ("params", "batch_stats")})
    # Under moco the branch is reported, not silently lost; with another width it is refused in one line.
    moco_summary = run.check_init_checkpoint(tiny_config(**{"method": "moco", "model.name": "resnet_tiny",
                                                            "model.init": str(path)}))
    assert "conv16/bn16 (lcr's branch: --config.method=lcr uses it)" in moco_summary
    narrow = tiny_config(**{"method": "lcr", "model.name": "resnet_tiny", "model.init": str(path),
                            "lcr.attention_channels": 16})
    with pytest.raises(pretrained.CheckpointError, match=r"lcr's conv16/bn16 -> attention\) has params/bn/bias of "
                                                         r"shape \(32,\) but the model needs \(16,\): set config.lcr's"):
        run.check_init_checkpoint(narrow)


def test_evaluating_a_checkpoint_without_lcrs_branch_as_lcr_is_refused(tmp_path):
    path = save_moco(tmp_path / "moco.pth.tar")
    config = tiny_config(**{"method": "lcr", "model.name": "resnet_tiny", "model.init": str(path), "num_epochs": 0})
    with pytest.raises(pretrained.CheckpointError, match="has no conv16/bn16 beside its encoder.*--config.method=moco"):
        run.check_init_checkpoint(config)
    assert run.check_init_checkpoint(tiny_config(**{"method": "lcr", "model.name": "resnet_tiny",
                                                    "model.init": str(path)}))  # training lcr from it is fine


def test_lightning_solo_learn_checkpoint_with_pickled_objects_runs_no_code(tmp_path):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "code_ran"
    state = {f"backbone.{k}": v for k, v in torch_tensors(STATE).items()}
    state.update({f"momentum_backbone.{k}": v for k, v in torch_tensors(MOMENTUM_STATE).items()})
    state.update({"projector.0.weight": torch.randn(32, 64), "classifier.weight": torch.randn(10, 64)})
    path = tmp_path / "solo.ckpt"
    torch.save({"epoch": 3, "state_dict": state, "hyper_parameters": {"args": TrainingArguments(0.1),
                "namespace": argparse.Namespace(lr=0.3), "hook": RunsCode(marker)}}, path)
    variables, summary = imported(path)
    assert not marker.exists()
    assert_same_encoder(variables["encoder"])
    assert "prefix 'state_dict.backbone.'" in summary and "state_dict.momentum_backbone" in summary


def test_mmselfsup_vissl_and_numbered_sequential_backbones(tmp_path):
    torch = pytest.importorskip("torch")
    tensors, momentum = torch_tensors(STATE), torch_tensors(MOMENTUM_STATE)
    mmselfsup = {"meta": {"epoch": 200}, "state_dict": {**{f"backbone.{k}": v for k, v in tensors.items()},
                                                        **{f"momentum_encoder.0.{k}": v for k, v in momentum.items()},
                                                        "neck.mlp.0.weight": torch.randn(4, 64)}}
    vissl = {"classy_state_dict": {"base_model": {"model": {
        "trunk": {f"_feature_blocks.{k}": v for k, v in tensors.items()},
        "heads": {"0.clf.0.weight": torch.randn(4, 64)}}}}}
    children = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}
    sequential = {"backbone." + str(children[k.split(".")[0]]) + k[len(k.split(".")[0]):]: v for k, v in tensors.items()}
    sequential["projection_head.layers.0.weight"] = torch.randn(4, 64)
    for name, obj, prefix in (("mmselfsup.pth", mmselfsup, "'state_dict.backbone.'"),
                              ("vissl.torch", vissl, "'classy_state_dict.base_model.model.trunk._feature_blocks.'"),
                              ("lightly.pth", sequential, "'backbone.' (numbered nn.Sequential children)")):
        torch.save(obj, tmp_path / name)
        variables, summary = imported(tmp_path / name)
        assert_same_encoder(variables["encoder"])
        assert f"prefix {prefix}" in summary, summary


def test_init_prefix_takes_the_momentum_copy_when_asked(tmp_path):
    path = save_moco(tmp_path / "moco.pth.tar")
    variables, summary = imported(path, prefix="state_dict.module.encoder_k.")
    assert_same_encoder(variables["encoder"], MOMENTUM)
    torch = pytest.importorskip("torch")
    only_momentum = tmp_path / "k.pth"
    torch.save({f"encoder_k.{k}": v for k, v in torch_tensors(STATE).items()}, only_momentum)
    with pytest.raises(pretrained.CheckpointError, match="the only complete encoder is the momentum copy at "
                                                         "prefix 'encoder_k.'.*config.model.init_prefix"):
        imported(only_momentum)


# ----------------------------------------------------------------------------- errors, before any data


def test_unusable_checkpoints_name_the_closest_prefix_and_the_first_key(tmp_path):
    resnet18 = {k: np.zeros(s, np.float32) for k, s in torchvision_resnet_shapes(18).items() if s}
    path = str(tmp_path / "r18.safetensors")
    safetensors_io.write(path, {f"module.encoder_q.{k}": v for k, v in resnet18.items()})
    with pytest.raises(pretrained.CheckpointError) as error:
        imported(path)
    message = str(error.value)
    assert "\n" not in message and "truncated" not in message
    assert "closest is prefix 'module.encoder_q.'" in message and "config.model.name" in message
    assert "which has conv1.weight of shape (64, 3, 7, 7) where the model needs (8, 3, 7, 7)" in message
    vit = str(tmp_path / "vit.safetensors")
    safetensors_io.write(vit, {"blocks.0.attn.qkv.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(pretrained.CheckpointError, match=r"no entry ends in conv1\.weight, the first entry of the "
                                                         r"encoder \(its entries start blocks\.0\.attn\.qkv\.weight\)"):
        imported(vit)


def test_damaged_safetensors_is_named_as_such(tmp_path):
    path = str(tmp_path / "r.safetensors")
    safetensors_io.write(path, STATE)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-100])
    with pytest.raises(safetensors_io.SafetensorsError, match="is truncated: entry .* re-download it"):
        imported(path)


def test_a_bad_checkpoint_is_refused_before_any_data_is_built(tmp_path):
    path = str(tmp_path / "vit.safetensors")
    safetensors_io.write(path, {"blocks.0.attn.qkv.weight": np.zeros((3, 3), np.float32)})
    data_dir = tmp_path / "tfds"
    config = tiny_config(**{"model.name": "resnet_tiny", "model.init": path,
                            "data.manual_dir": str(tmp_path / "nowhere"), "data.data_dir": str(data_dir)})
    with pytest.raises(pretrained.CheckpointError, match="no entry ends in conv1.weight"):
        train.train_and_evaluate(config, str(tmp_path / "run"))  # not the missing data folder's error
    assert not data_dir.exists()
    config = tiny_config(**{"model.name": "resnet_tiny", "model.init": str(tmp_path / "absent.pth"),
                            "data.manual_dir": str(tmp_path / "nowhere")})
    with pytest.raises(FileNotFoundError, match="absent.pth' does not exist"):
        train.train_and_evaluate(config, str(tmp_path / "run2"))


@pytest.mark.parametrize("zip_format", [True, False])
def test_files_pickling_code_load_their_tensors_and_run_nothing(tmp_path, zip_format):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"conv": torch.ones(2), "x": RunsCode(marker), "args": TrainingArguments(0.1)}, path,
               _use_new_zipfile_serialization=zip_format)
    obj = pretrained.read_checkpoint(str(path))
    assert not marker.exists()
    assert isinstance(obj["x"], pretrained.Opaque) and isinstance(obj["args"], pretrained.Opaque)
    np.testing.assert_array_equal(obj["conv"], [1, 1])
    raw = tmp_path / "raw.pth"  # a bare pickle (not torch.save's format) is refused, and runs nothing either
    raw.write_bytes(pickle.dumps(RunsCode(marker), protocol=2))
    with pytest.raises(pretrained.CheckpointError, match="is truncated or not a torch checkpoint"):
        pretrained.read_checkpoint(str(raw))
    assert not marker.exists()


# ----------------------------------------------------------------------------- export


def test_export_has_torchvisions_resnet50_keys_and_shapes():
    """torchvision is not installable beside torch 2.13: the reference is test_pretrained's list, written
    from torchvision's layout; with torchvision present, resnet50() itself loads it with strict=True."""
    abstract = models.abstract_encoder_variables(ml_collections.ConfigDict({"name": "resnet50", "bn_groups": 1}))
    state = export.torchvision_state_dict(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract), fc_classes=1000)
    reference = torchvision_resnet_shapes(50)
    assert list(state) == list(reference)  # torchvision's order, too
    assert {k: v.shape for k, v in state.items()} == reference
    assert state["layer1.0.bn1.num_batches_tracked"].dtype == np.int64
    try:
        import torch
        import torchvision
    except ImportError:
        return  # torchvision absent: the key/shape list above is the check
    model = torchvision.models.resnet50()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)


def test_export_import_round_trip_is_exact_and_gives_identical_features(tmp_path):
    path = str(tmp_path / "encoder.safetensors")
    export.save(path, export.torchvision_state_dict(ENCODER), {"format": "pt"})
    variables, _ = imported(path)
    assert_same_encoder(variables["encoder"])
    model = models.build_encoder(TINY)
    images = np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32)
    before = model.apply(ENCODER, images, train=False)[1]
    after = model.apply(variables["encoder"], images, train=False)[1]
    np.testing.assert_array_equal(np.asarray(before), np.asarray(after))
    load_file = pytest.importorskip("safetensors.numpy").load_file
    assert set(load_file(path)) == set(export.torchvision_state_dict(ENCODER))


def tiny_torch_resnet():
    """torchvision's BasicBlock ResNet layout at resnet_tiny's size (width 8, one block per stage)."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, in_c, out_c, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(in_c, out_c, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(out_c)
            self.conv2 = nn.Conv2d(out_c, out_c, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(out_c)
            self.downsample = None
            if stride != 1 or in_c != out_c:
                self.downsample = nn.Sequential(nn.Conv2d(in_c, out_c, 1, stride, bias=False), nn.BatchNorm2d(out_c))

        def forward(self, x):
            y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
            return torch.relu(y + (x if self.downsample is None else self.downsample(x)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(8)
            for stage, (in_c, out_c) in enumerate(((8, 8), (8, 16), (16, 32), (32, 64))):
                setattr(self, f"layer{stage + 1}", nn.Sequential(Block(in_c, out_c, 1 if stage == 0 else 2)))
            self.fc = nn.Identity()  # as one loads an exported encoder without --fc_classes

        def feature_map(self, x):
            x = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 3, 2, 1)
            for stage in range(1, 5):
                x = getattr(self, f"layer{stage}")(x)
            return x

        def forward(self, x):
            return self.fc(self.feature_map(x).mean(dim=(2, 3)))

    return Net()


def test_an_lcr_checkpoint_is_evaluated_with_lcrs_own_feature(tmp_path):
    """The re-measure is of LCR's feature: method lcr's eval_features on the imported checkpoint equal
    builder.py `inference` run in torch on the same weights (encoder_q's map, conv16, bn16, relu, channel
    max, min-max over the batch, mean, L2 normalisation)."""
    torch = pytest.importorskip("torch")
    from fgpair_jax.methods import lcr

    net = tiny_torch_resnet().eval()
    net.load_state_dict(torch_tensors(STATE), strict=True)
    torch.manual_seed(0)
    conv16, bn16 = torch.nn.Conv2d(64, 32, 1, bias=False), torch.nn.BatchNorm2d(32).eval()
    with torch.no_grad():
        bn16.weight.uniform_(0.5, 1.5), bn16.bias.normal_(0, 0.5)
        bn16.running_mean.normal_(0, 1e5), bn16.running_var.uniform_(1e9, 2e9)  # the tiny net's scale
    state = {f"module.encoder_q.{k}": v for k, v in net.state_dict().items()}
    state.update({f"module.conv16.{k}": v for k, v in conv16.state_dict().items()})
    state.update({f"module.bn16.{k}": v for k, v in bn16.state_dict().items()})
    path = tmp_path / "checkpoint_0099.pth.tar"
    torch.save({"epoch": 100, "arch": "resnet50", "state_dict": state}, path)
    config = tiny_config(**{"method": "lcr", "model.init": str(path), "data.image_size": 64, "num_epochs": 0})
    variables = run.pretrained_variables(config, str(tmp_path / "run"))
    images = np.random.RandomState(2).randn(lcr.per_gpu_batch(config), 64, 64, 3).astype(np.float32)
    got = np.asarray(lcr.eval_features(variables["params"], variables["batch_stats"], images, config))
    with torch.no_grad():
        feature_map = net.feature_map(torch.from_numpy(images.transpose(0, 3, 1, 2)))
        attention = torch.relu(bn16(conv16(feature_map))).max(dim=1).values
        attention = attention - attention.min()
        attention = attention / (1e-7 + attention.max())
        pooled = (feature_map * attention[:, None]).mean(dim=(2, 3))
        expected = torch.nn.functional.normalize(pooled, dim=1).numpy()
        plain = torch.nn.functional.normalize(feature_map.mean(dim=(2, 3)), dim=1).numpy()
    assert got.shape == expected.shape == (4, 64)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.abs(got - plain).max() > 1e-2  # the attention weighs positions: not the plain pooled feature


def test_exported_pth_loads_strictly_into_torch_and_its_forward_matches_jax(tmp_path):
    torch = pytest.importorskip("torch")
    path = str(tmp_path / "encoder.pth")
    export.save(path, export.torchvision_state_dict(ENCODER))
    net = tiny_torch_resnet().eval()
    net.load_state_dict(torch.load(path), strict=True)
    images = np.random.RandomState(1).randn(3, 32, 32, 3).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    pooled = np.asarray(models.build_encoder(TINY).apply(ENCODER, images, train=False)[1])
    assert pooled.shape == expected.shape == (3, 64)
    assert np.abs(pooled - expected).max() <= 1e-5 * np.abs(expected).max()  # float32 sums in another order
    variables, _ = imported(path)  # and back: .pth -> flax is exact too
    assert_same_encoder(variables["encoder"])


def test_export_refuses_efficientnet_and_unknown_suffixes(tmp_path):
    abstract = models.abstract_encoder_variables(ml_collections.ConfigDict({"name": "efficientnet_lite0", "bn_groups": 1}))
    with pytest.raises(export.ExportError, match="not a ResNet"):
        export.torchvision_state_dict(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract))
    with pytest.raises(export.ExportError, match="use a .safetensors or .pth"):
        export.save(str(tmp_path / "x.npz"), STATE)


# ----------------------------------------------------------------------------- the commands


@pytest.mark.slow
def test_one_command_evaluates_an_lcr_checkpoint_and_export_writes_it_back(tiny_cub, tmp_path):
    """`fgpair_jax.evaluate_checkpoint` scores a published-style LCR checkpoint as it is (method lcr, its
    conv16/bn16 attention) into eval/metrics.json + features.npz; `fgpair_jax.export` writes the run's
    encoder back in torchvision's layout, equal to the file's encoder_q."""
    from test_end_to_end import last_error_line, run_cli

    checkpoint = save_moco(tmp_path / "checkpoint_0099.pth.tar", lcr=True)
    workdir = str(tmp_path / "lcr_eval")
    common = ("--config=configs/cub.py:tiny", "--config.data.image_size=64", f"--config.data.manual_dir={tiny_cub}")
    result = run_cli(f"--checkpoint={checkpoint}", *common, f"--workdir={workdir}", module="fgpair_jax.evaluate_checkpoint")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "with method lcr (its own branch" in result.stdout
    assert "Init: checkpoint 'checkpoint_0099.pth.tar' for resnet_tiny: encoder at prefix " \
           "'state_dict.module.encoder_q.'" in result.stdout
    with open(os.path.join(workdir, "eval", "metrics.json")) as f:
        metrics = __import__("json").load(f)
    assert metrics["step"] == 0 and 0 <= metrics["linear_top1"] <= 100 and 0 <= metrics["knn_top1"] <= 100
    features = np.load(os.path.join(workdir, "eval", "features.npz"))
    assert features["train_features"].shape == (18, 64) and features["test_features"].shape == (9, 64)
    norms = np.linalg.norm(features["test_features"], axis=1)  # LCR's inference(): L2-normalised, attention-pooled
    assert np.all((np.abs(norms - 1) < 1e-4) | (norms < 1e-6)), norms

    exported = str(tmp_path / "encoder.safetensors")
    result = run_cli(f"--workdir={workdir}", f"--output={exported}", module="fgpair_jax.export")
    assert result.returncode == 0, result.stderr[-3000:]
    back = safetensors_io.read(exported)
    assert set(back) == set(STATE)
    for key, value in STATE.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)

    bad = str(tmp_path / "vit.safetensors")
    safetensors_io.write(bad, {"blocks.0.attn.qkv.weight": np.zeros((3, 3), np.float32)})
    result = run_cli(f"--checkpoint={bad}", "--config=configs/cub.py:tiny",
                     f"--config.data.manual_dir={tmp_path / 'nowhere'}", f"--workdir={tmp_path / 'bad'}",
                     module="fgpair_jax.evaluate_checkpoint")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert last_error_line(result).startswith("error: checkpoint 'vit.safetensors' for resnet_tiny: no entry ends in "
                                              "conv1.weight"), result.stderr[-2000:]
