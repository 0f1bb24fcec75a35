"""A trained encoder -> a torchvision-layout state dict (`.safetensors`, or `.pth` with torch installed).

`torchvision_state_dict` inverts `pretrained.py`'s naming rule for the ResNet encoders: params/layer1_0/
conv1/kernel [3, 3, I, O] -> `layer1.0.conv1.weight` [O, I, 3, 3], downsample_conv/bn -> downsample.0/1,
BN scale/bias/mean/var -> weight/bias/running_mean/running_var, plus torchvision's `num_batches_tracked`
counters, in torchvision's key order. `torchvision.models.resnet50()` with `fc = nn.Identity()` loads it
with `strict=True` and its pooled features equal this project's (tests/test_checkpoint_formats.py);
`fc_classes=N` adds a zero `fc` of N classes so that `resnet50(num_classes=N)` loads it as it is.

CLI: `python -m fgpair_jax.export --workdir=W --output=encoder.safetensors [--fc_classes=1000]` writes the
latest checkpoint's (online) encoder of a run, reading nothing but `W/checkpoints` (no data is built).
"""
import os
from typing import Dict, Mapping, Optional

import numpy as np
from flax import traverse_util

from fgpair_jax import safetensors_io
from fgpair_jax.errors import MissingFileError, UserError

TORCH_SUFFIXES = (".pth", ".pt", ".pth.tar", ".tar", ".bin")


class ExportError(UserError, ValueError):
    """An encoder or an output path that cannot be exported (one line naming the fix)."""


def _torch_module(flax_module: str) -> str:
    name = {"downsample_conv": "downsample_0", "downsample_bn": "downsample_1"}.get(flax_module, flax_module)
    head, _, index = name.rpartition("_")
    return f"{head}.{index}" if head and index.isdigit() else name


def torchvision_state_dict(encoder_variables: Mapping, *, fc_classes: int = 0,
                           num_batches_tracked: int = 0) -> Dict[str, np.ndarray]:
    """{torchvision name: array} of a ResNet encoder's `{"params", "batch_stats"}` (float32 as stored;
    conv weights OIHW; `num_batches_tracked` int64 scalars). `fc_classes` > 0 adds `fc.weight`
    [fc_classes, D] and `fc.bias` [fc_classes], zeros. Raises `ExportError` for an encoder that is not in
    torchvision's ResNet layout (EfficientNet-Lite0) or that already holds a classifier of another size."""
    params = traverse_util.flatten_dict(dict(encoder_variables["params"]))
    stats = traverse_util.flatten_dict(dict(encoder_variables.get("batch_stats", {})))
    if ("conv1", "kernel") not in params or not any(path[0].startswith("layer1_") for path in params):
        raise ExportError("export writes torchvision's ResNet layout; this encoder is not a ResNet "
                          "(config.model.name resnet18, resnet18_half, resnet50 or resnet_tiny can be exported).")
    state = {}
    for path, value in params.items():
        *modules, leaf = path
        module = ".".join(_torch_module(m) for m in modules)
        value = np.asarray(value, np.float32)
        if leaf == "kernel":
            state[f"{module}.weight"] = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        elif leaf == "scale":
            state[f"{module}.weight"] = value
        elif leaf == "bias":
            state[f"{module}.bias"] = value
            if tuple(modules) + ("mean",) in stats:  # a batch norm: its buffers follow, as torchvision orders them
                state[f"{module}.running_mean"] = np.asarray(stats[tuple(modules) + ("mean",)], np.float32)
                state[f"{module}.running_var"] = np.asarray(stats[tuple(modules) + ("var",)], np.float32)
                state[f"{module}.num_batches_tracked"] = np.array(num_batches_tracked, np.int64)
        else:
            raise ExportError(f"encoder leaf {'/'.join(path)} has no torchvision name")
    if fc_classes:
        last = [key for key in state if key.startswith("layer4.") and key.endswith("running_mean")][-1]
        width = state[last].shape[0]
        if "fc.weight" in state and state["fc.weight"].shape != (fc_classes, width):
            raise ExportError(f"the encoder has a classifier of shape {state['fc.weight'].shape}; drop --fc_classes.")
        state.setdefault("fc.weight", np.zeros((fc_classes, width), np.float32))
        state.setdefault("fc.bias", np.zeros((fc_classes,), np.float32))
    return {key: np.array(state[key], order="C") for key in sorted(state, key=torchvision_order)}  # 0-d stays 0-d


_LEAF_ORDER = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def torchvision_order(name: str):
    """Sort key giving torchvision's state-dict order: conv1, bn1, layer1.0 (conv1, bn1, conv2, bn2, ...,
    downsample.0, downsample.1), ..., fc; within a module weight, bias, running_mean, running_var, counter."""
    *modules, leaf = name.split(".")
    rank = []
    for module in modules:
        if module.isdigit():
            rank.append((int(module), 0))
        elif module == "fc":
            rank.append((99, 0))
        elif module == "downsample":
            rank.append((90, 0))
        else:
            digits = "".join(ch for ch in module if ch.isdigit()) or "0"
            rank.append((int(digits) + (10 if module.startswith("layer") else 0), 0 if module.startswith("conv") else 1))
    return rank, _LEAF_ORDER.index(leaf) if leaf in _LEAF_ORDER else len(_LEAF_ORDER)


def save(path: str, state_dict: Mapping[str, np.ndarray], metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write `state_dict` to `path`: `.safetensors` (no torch needed; `metadata` in its header) or a torch
    suffix (`.pth`, `.pt`, ...: `torch.save` of a dict of tensors, needs torch). Raises `ExportError` for
    another suffix or a `.pth` without torch installed."""
    if path.endswith(".safetensors"):
        safetensors_io.write(path, state_dict, metadata)
        return
    if not path.endswith(TORCH_SUFFIXES):
        raise ExportError(f"--output={path!r}: use a .safetensors or .pth file name.")
    try:
        import torch
    except ImportError:
        raise ExportError(f"writing {path!r} needs torch (pip install torch), or write .safetensors, which "
                          "torch reads with safetensors.torch.load_file.") from None
    torch.save({key: torch.from_numpy(np.array(value)) for key, value in state_dict.items()}, path)


def latest_encoder(workdir: str) -> tuple:
    """(step, encoder {"params", "batch_stats"} as numpy) of the newest checkpoint in `<workdir>/checkpoints`,
    restored without a template (no data, no config needed). Raises `MissingFileError` if there is none."""
    import orbax.checkpoint as ocp

    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        raise MissingFileError(f"No checkpoint in {directory}: train first with `python -m fgpair_jax.main`.")
    manager = ocp.CheckpointManager(directory, item_names=("state", "meta", "data"))
    try:
        step = manager.latest_step()
        if step is None:
            raise MissingFileError(f"No checkpoint in {directory}: train first with `python -m fgpair_jax.main`.")
        state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    finally:
        manager.close()
    encoder = {collection: traverse_util.unflatten_dict(
        {k: np.asarray(v) for k, v in traverse_util.flatten_dict(dict(state[collection]["encoder"])).items()})
        for collection in ("params", "batch_stats")}
    return step, encoder


def main(argv) -> None:
    from absl import flags

    del argv
    step, encoder = latest_encoder(flags.FLAGS.workdir)
    state_dict = torchvision_state_dict(encoder, fc_classes=flags.FLAGS.fc_classes)
    save(flags.FLAGS.output, state_dict, {"format": "pt", "source": f"fgpair_jax {flags.FLAGS.workdir} step {step}"})
    print(f"Wrote {len(state_dict)} entries (torchvision layout{', fc of ' + str(flags.FLAGS.fc_classes) + ' classes' if flags.FLAGS.fc_classes else ', no fc'}) "
          f"of step {step} to {flags.FLAGS.output}.")


if __name__ == "__main__":
    from absl import flags

    from fgpair_jax import cli

    flags.DEFINE_string("workdir", None, "Run directory written by fgpair_jax.main.", required=True)
    flags.DEFINE_string("output", None, "encoder.safetensors, or encoder.pth (needs torch).", required=True)
    flags.DEFINE_integer("fc_classes", 0, "> 0: add a zero fc of this many classes (torchvision's resnet50() "
                         "loads strict=True as it is); 0: no fc (set model.fc = nn.Identity() before loading).")
    cli.run(main)
