"""The CPU train step against a PyTorch peer, side by side in one run (issue 27.2).

Two measurements, each side in its own fresh process, one after the other (never sharing the CPU):
- `mocov2`: one MoCo v2 train step (temperature 0.2, SGD, random init) in three settings (`MOCO_STEPS`):
  `resnet18_112` (ResNet-18, 112 px, batch 64, queue 1024, momentum 0.999: the issue's step),
  `scratch` (the CPU test bed's step, configs/cub.py:scratch: half-width ResNet-18, 80 px, batch 128,
  queue 1024, momentum 0.99) and `quick_lite0` (the quick config's encoder, EfficientNet-Lite0, 112 px,
  batch 64, queue 1472, momentum 0.99, every stage trained). The peer is written with lightly, a
  maintained PyTorch SSL library, the way its MoCo v2 benchmark module
  (`benchmarks/imagenet/resnet50/mocov2.py`) builds it: a torch backbone (torchvision's ResNet-18, the same
  BasicBlocks at half width, efficientnet-lite-pytorch's Lite0), `MoCoProjectionHead`,
  `NTXentLoss(memory_bank_size=...)` (the queue), `update_momentum`; once in PyTorch's default layout and
  once channels_last. Ours is `step.make_train_step` of the setting's config (`configs/cub.py`, the
  variant named in `MOCO_STEPS`, with its overrides), which also augments both views on the device and
  shuffles BN over the variant's `bn_groups` (the peer's BN is plain); the peer's views are given, its
  augmentation is not timed. Ours alone also times the quick config's own step (`quick_fgpair`: fgpair,
  ImageNet Lite0 with its first 4 stages frozen), the one the README's main job runs.
- `resnet18`: a plain ResNet-18 classifier forward + backward (cross-entropy, 200 classes, batch 64,
  train-mode batch norm, no optimizer) at several image sizes: the convolutions alone, to see whether
  the step's gap (and XLA's small-size cliff) is the convolutions'.

Both sides time steady-state steps after warm-up steps (compile seconds reported apart); inputs are
random, fixed. The peer needs torch, torchvision, lightly and efficientnet-lite-pytorch: the `peer` extra,
in a venv of its own
(PyPI's torchvision does not import beside the dev extra's torch 2.13.0; setup.py). Kept out of CI.

    python3 -m venv .venv-peer && .venv-peer/bin/pip install -e '.[peer]'
    .venv-peer/bin/python benchmarks/peer_step.py --side=torch --out=/tmp/peer_torch.json
    .venv/bin/python benchmarks/peer_step.py --side=jax --peer_json=/tmp/peer_torch.json \
        --out=results/bench/peer_step.json
"""
import json
import os
import platform
import sys
import time

import numpy as np
from absl import app, flags

_SIDE = flags.DEFINE_enum("side", "jax", ["jax", "torch"], "Which side this process measures.")
_SIZES = flags.DEFINE_list("sizes", ["56", "64", "72", "80", "96", "112"], "resnet18 image sizes (px).")
_MOCO = flags.DEFINE_list("moco_steps", ["resnet18_112", "scratch", "quick_lite0"], "MOCO_STEPS to time.")
_STEPS = flags.DEFINE_integer("steps", 8, "Timed steps per measurement (after the warm-up steps).", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps first (compile, allocator warm-up).", lower_bound=1)
_CONV_IMPL = flags.DEFINE_enum("conv_impl", "auto", ["auto", "xla", "im2col"], "Ours: config.model.conv_impl "
                                "(auto = im2col on CPU; xla = XLA's convolution, as before it).")
_PEER_JSON = flags.DEFINE_string("peer_json", None, "The torch side's JSON, merged into --out (jax side).")
_OUT = flags.DEFINE_string("out", None, "JSON result file.")

BATCH, NUM_CLASSES, TEMPERATURE = 64, 200, 0.2
# name -> the step's sizes; `variant` and `overrides` make our config, the rest the peer's modules.
MOCO_STEPS = {
    "resnet18_112": dict(variant="", model="resnet18", width=512, hidden=2048, size=112, batch=64, queue=1024,
                         momentum=0.999, overrides={"model.init": "none", "model.frozen_stages": 0,
                                                    "model.bn_groups": 1, "model.dtype": "float32",
                                                    "moco.hidden_dim": 2048,  # lightly's MoCoProjectionHead(512, 2048, 128)
                                                    "optim.learning_rate": 0.06, "optim.weight_decay": 5e-4}),
    "scratch": dict(variant="scratch", model="resnet18_half", width=256, hidden=256, size=80, batch=128,
                    queue=1024, momentum=0.99, overrides={}),
    "quick_lite0": dict(variant="quick", model="efficientnet_lite0", width=1280, hidden=1280, size=112, batch=64,
                        queue=1472, momentum=0.99, overrides={"model.init": "none", "model.frozen_stages": 0,
                                                              "moco.queue_size": 1472}),
}
# configs/cub.py:quick as its run trains it (ImageNet Lite0, 4 stages frozen), with the queue a run sizes
# from the CUB subset's 2,999 train images (1,472 keys).
QUICK_FGPAIR = {"method": "fgpair", "moco.queue_size": 1472}


def timed(step, warmup: int, steps: int, sync=lambda out: out, batch: int = BATCH) -> dict:
    """{'first_step_seconds', 'seconds_per_step', 'images_per_second'} of `step()` (`batch` images each)."""
    start = time.perf_counter()
    sync(step())
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        sync(step())
    start = time.perf_counter()
    for _ in range(steps):
        out = step()
    sync(out)
    seconds = (time.perf_counter() - start) / steps
    return {"first_step_seconds": first, "seconds_per_step": seconds, "images_per_second": batch / seconds}


# --- the PyTorch peer -------------------------------------------------------------------------------

def torch_half_resnet18():
    """torchvision's ResNet-18 at half width (32-256 channels, ours `resnet18_half`), built from its
    BasicBlock: torchvision's ResNet has no width knob for BasicBlock networks."""
    import torch
    from torch import nn
    from torchvision.models.resnet import BasicBlock

    def stage(inplanes, planes, stride):
        downsample = None if stride == 1 and inplanes == planes else nn.Sequential(
            nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        return nn.Sequential(BasicBlock(inplanes, planes, stride, downsample), BasicBlock(planes, planes))

    return nn.Sequential(nn.Conv2d(3, 32, 7, 2, 3, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
                         nn.MaxPool2d(3, 2, 1), stage(32, 32, 1), stage(32, 64, 2), stage(64, 128, 2),
                         stage(128, 256, 2), nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())


def torch_backbone(name: str):
    """A random-init torch encoder giving [B, width] pooled features."""
    import torch
    import torchvision

    if name == "resnet18":
        backbone = torchvision.models.resnet18()
        backbone.fc = torch.nn.Identity()
        return backbone
    if name == "resnet18_half":
        return torch_half_resnet18()
    from efficientnet_lite_pytorch import EfficientNet

    class Lite0Features(torch.nn.Module):  # the port's `extract_features`, average-pooled: [B, 1280]
        def __init__(self):
            super().__init__()
            self.lite0 = EfficientNet.from_name("efficientnet-lite0")

        def forward(self, x):
            return torch.flatten(torch.nn.functional.adaptive_avg_pool2d(self.lite0.extract_features(x), 1), 1)

    return Lite0Features()


def torch_mocov2(name: str, channels_last: bool) -> dict:
    """lightly's MoCo v2 step (see the module docstring) on two given views, sized by MOCO_STEPS[name]."""
    import copy

    import torch
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    spec = MOCO_STEPS[name]
    torch.manual_seed(0)
    backbone = torch_backbone(spec["model"])
    head = MoCoProjectionHead(spec["width"], spec["hidden"], 128)
    key_backbone, key_head = copy.deepcopy(backbone), copy.deepcopy(head)
    deactivate_requires_grad(key_backbone)
    deactivate_requires_grad(key_head)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for module in (backbone, head, key_backbone, key_head):
        module.to(memory_format=memory_format).train()
    criterion = NTXentLoss(temperature=TEMPERATURE, memory_bank_size=(spec["queue"], 128))
    optimizer = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.06, momentum=0.9,
                                weight_decay=5e-4)
    size = spec["size"]
    views = [torch.randn(spec["batch"], 3, size, size).to(memory_format=memory_format) for _ in range(2)]

    def step():
        update_momentum(backbone, key_backbone, m=spec["momentum"])
        update_momentum(head, key_head, m=spec["momentum"])
        query = head(backbone(views[0]))
        with torch.no_grad():
            key = key_head(key_backbone(views[1]))
        loss = criterion(query, key)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.detach()

    return timed(step, _WARMUP.value, _STEPS.value, sync=lambda loss: float(loss), batch=spec["batch"])


def torch_resnet18(size: int) -> dict:
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=NUM_CLASSES).train()
    images = torch.randn(BATCH, 3, size, size)
    labels = torch.randint(0, NUM_CLASSES, (BATCH,))

    def step():
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        return loss.detach()

    return timed(step, _WARMUP.value, _STEPS.value, sync=lambda loss: float(loss))


def torch_side() -> dict:
    import lightly
    import torch
    import torchvision

    from importlib.metadata import version

    return {"versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                         "lightly": lightly.__version__,
                         "efficientnet-lite-pytorch": version("efficientnet-lite-pytorch")},
            "threads": torch.get_num_threads(),
            "mocov2": {name: {"default": torch_mocov2(name, False), "channels_last": torch_mocov2(name, True)}
                       for name in _MOCO.value},
            "resnet18": {str(size): torch_resnet18(int(size)) for size in _SIZES.value}}


# --- ours -------------------------------------------------------------------------------------------

def jax_step(variant: str, overrides: dict) -> dict:
    """Our train step of `configs/cub.py:<variant>` with `overrides`, timed on fixed uint8 views."""
    import jax

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from configs import cub
    from fgpair_jax import optim, parallel, run_config, state as state_lib, step as step_lib

    config = run_config.override(cub.get_config(variant), {**overrides, "model.conv_impl": _CONV_IMPL.value})
    mesh = parallel.make_mesh()
    tx = optim.make_optimizer(config, 1000)
    state = jax.device_put(state_lib.create_train_state(config, jax.random.key(0), tx,
                                                        state_lib.method_sizes(config, None)),
                           parallel.replicated(mesh))
    train_step = step_lib.make_train_step(config, tx, mesh, 1000)
    rng = np.random.default_rng(0)
    shape = (config.global_batch_size, config.data.image_size, config.data.image_size, 3)
    batch = parallel.global_batch({"view1": rng.integers(0, 256, shape, dtype=np.uint8),
                                   "view2": rng.integers(0, 256, shape, dtype=np.uint8)}, mesh)
    holder = {"state": state}

    def step():
        holder["state"], metrics = train_step(holder["state"], batch)
        return metrics

    return timed(step, _WARMUP.value, _STEPS.value, sync=jax.block_until_ready, batch=config.global_batch_size)


def jax_mocov2(name: str) -> dict:
    spec = MOCO_STEPS[name]
    overrides = {"method": "moco", "model.name": spec["model"], "data.image_size": spec["size"],
                 "global_batch_size": spec["batch"], "moco.queue_size": spec["queue"],
                 "moco.temperature": TEMPERATURE, "moco.momentum": spec["momentum"], **spec["overrides"]}
    return jax_step(spec["variant"], overrides)


def jax_resnet18(size: int) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax
    import jax.numpy as jnp
    import ml_collections
    import optax

    from fgpair_jax.models import build_encoder

    encoder = build_encoder(ml_collections.ConfigDict({"name": "resnet18", "bn_groups": 1, "dtype": "float32",
                                                       "frozen_stages": 0, "init": "none",
                                                       "keep_bn_stats": False, "depthwise_impl": "auto",
                                                       "conv_impl": _CONV_IMPL.value}))
    images = jax.random.normal(jax.random.key(1), (BATCH, size, size, 3))
    labels = jax.random.randint(jax.random.key(2), (BATCH,), 0, NUM_CLASSES)
    variables = jax.jit(lambda r: encoder.init(r, images, train=False))(jax.random.key(0))
    head = jax.random.normal(jax.random.key(3), (512, NUM_CLASSES)) * 0.01

    @jax.jit
    def grads(params, head, batch_stats):
        def loss_fn(params, head):
            (_, pooled), _ = encoder.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                           mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(pooled @ head, labels).mean()
        return jax.grad(loss_fn, argnums=(0, 1))(params, head)

    return timed(lambda: grads(variables["params"], head, variables["batch_stats"]), _WARMUP.value,
                 _STEPS.value, sync=jax.block_until_ready)


def jax_side() -> dict:
    import jax

    return {"versions": {"jax": jax.__version__}, "conv_impl": _CONV_IMPL.value, "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
            "mocov2": {name: {"ours": jax_mocov2(name)} for name in _MOCO.value},
            "quick_fgpair": jax_step("quick", QUICK_FGPAIR) if "quick_lite0" in _MOCO.value else None,
            "resnet18": {str(size): jax_resnet18(int(size)) for size in _SIZES.value}}


def ratios(ours: dict, peer: dict) -> dict:
    """ours img/s / the peer's, per measurement (> 1: ours is faster)."""
    out = {f"mocov2_{name}_vs_{layout}": ours["mocov2"][name]["ours"]["images_per_second"] /
           record["images_per_second"] for name in ours["mocov2"] if name in peer["mocov2"]
           for layout, record in peer["mocov2"][name].items()}
    out.update({f"resnet18_{size}px": ours["resnet18"][size]["images_per_second"] /
                peer["resnet18"][size]["images_per_second"] for size in ours["resnet18"] if size in peer["resnet18"]})
    return out


def main(argv):
    del argv
    result = torch_side() if _SIDE.value == "torch" else jax_side()
    report = {"benchmark": "peer_step", "side": _SIDE.value, "batch": BATCH, "steps": _STEPS.value,
              "host": {"cpu_count": os.cpu_count(), "machine": platform.machine()},
              "load_average_at_end": os.getloadavg()[0], "command": " ".join(sys.argv), _SIDE.value: result}
    if _PEER_JSON.value:
        with open(_PEER_JSON.value) as f:
            peer = json.load(f)
        report["torch"], report["torch_load_average_at_end"] = peer["torch"], peer["load_average_at_end"]
        report["ours_over_peer_images_per_second"] = ratios(result, peer["torch"])
    text = json.dumps(report, indent=2)
    print(text)
    if _OUT.value:
        os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
        with open(_OUT.value, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    app.run(main)
