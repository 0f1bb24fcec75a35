"""Find the encoder inside another project's checkpoint, as those projects' linear-evaluation scripts do.

A checkpoint of a self-supervised run wraps the encoder: MoCo v2 and LCR (`main_moco.py`) save
`{"epoch", "arch", "state_dict": DDP(model).state_dict(), "optimizer"}`, so the encoder's weights are
`state_dict.module.encoder_q.conv1.weight`... beside the momentum copy `module.encoder_k.`, the queue and
an MLP head `encoder_q.fc.0/fc.2`; MoCo's `main_lincls.py` keeps `module.encoder_q.` minus `fc`. SSL
libraries save `backbone.` beside `momentum_backbone.` (solo-learn, Lightning's `state_dict`),
`backbone.` beside `momentum_encoder.` (mmselfsup), `classy_state_dict.base_model.model.trunk._feature_blocks.`
(VISSL), or a backbone built as `nn.Sequential(*list(resnet.children())[:-1])` whose keys are numbered
children (`backbone.0.weight` = conv1, `backbone.4.0.conv1.weight` = layer1.0.conv1: lightly's examples).

The rule, one for all of them (`select_encoder`): flatten the file to dotted names (nested dicts and
lists; pickled non-tensor objects such as training arguments are inert, `pretrained.Opaque`); every name
ending in the encoder's first entry (`conv1.weight` for a ResNet) proposes a prefix; a prefix is complete
when every encoder entry is under it with the model's shape (torch names converted by `pretrained.py`'s
rule). The online encoder is the complete prefix that is not a momentum copy (no `encoder_k`, `momentum`,
`target`, `teacher`, `ema`, `key` among its words); `config.model.init_prefix` names one explicitly. Entries
under the prefix that are no part of the encoder (heads, classifier) and everything outside it (the
momentum copy, queues, optimiser state) are dropped, and `Selection.summary` says so in one line. Method
branches beside the encoder (LCR's `conv16`/`bn16` attention, `Method.CHECKPOINT_BRANCHES`) are taken when
the run's method has them.

Errors are one line (`pretrained.CheckpointError`) naming the closest prefix and what it lacks, or the first
entry expected when no name ends in it; all of it runs on shapes alone (`read_checkpoint(with_data=False)`),
so `preflight` refuses an unusable file before any data is built.
"""
import dataclasses
import hashlib
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
from flax import serialization, traverse_util

from fgpair_jax import pretrained
from fgpair_jax.atomic_files import write_atomically
from fgpair_jax.export import torchvision_order
from fgpair_jax.pretrained import CheckpointError, TensorSpec

# torchvision ResNet's children in order: a backbone saved as nn.Sequential(*children) numbers them.
RESNET_CHILDREN = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc")
# Words of a prefix that mark a momentum / EMA copy of the encoder (MoCo's encoder_k, BYOL's target,
# solo-learn's momentum_backbone, mmselfsup's momentum_encoder, DINO's teacher, timm's model_ema).
MOMENTUM_WORDS = frozenset({"k", "key", "momentum", "target", "teacher", "ema"})
CLASSIFIER = pretrained.CLASSIFIER
_SHOWN = 4  # names listed per group in the summary line before "+N more"


def _is_tensor(value) -> bool:
    return isinstance(value, (np.ndarray, TensorSpec))


def flatten_tensors(obj, prefix: str = "") -> Dict[str, Any]:
    """{dotted name: tensor} of every tensor in nested dicts and lists (list items by index); other
    values (numbers, strings, `Opaque` objects) are left out."""
    flat = {}
    if _is_tensor(obj):
        flat[prefix.rstrip(".")] = obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            flat.update(flatten_tensors(value, f"{prefix}{key}."))
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            flat.update(flatten_tensors(value, f"{prefix}{index}."))
    return flat


def flax_key(torch_name: str, shape: Tuple[int, ...]) -> Optional[Tuple[str, Tuple[int, ...]]]:
    """("params/layer1_0/conv1/kernel", flax shape) of a torch entry by `pretrained.py`'s rule; ("", ())
    for `num_batches_tracked` (a counter with no flax counterpart); None for a leaf with no counterpart."""
    module, _, leaf = torch_name.rpartition(".")
    if not module:
        return None
    path = "/".join(pretrained._flax_module_path(module))
    shape = tuple(shape)
    if leaf == "weight" and len(shape) == 4:
        return f"params/{path}/kernel", (shape[2], shape[3], shape[1], shape[0])
    if leaf == "weight" and len(shape) == 2:
        return f"params/{path}/kernel", (shape[1], shape[0])
    named = {"bias": ("params", "bias"), "running_mean": ("batch_stats", "mean"),
             "running_var": ("batch_stats", "var")}
    if leaf == "weight" and len(shape) == 1:
        return f"params/{path}/scale", shape
    if leaf in named:
        collection, name = named[leaf]
        return f"{collection}/{path}/{name}", shape
    if leaf == "num_batches_tracked":
        return "", ()
    return None


def torch_name(flax_key_: str) -> str:
    """The torchvision name of a flax key: params/layer1_0/downsample_conv/kernel -> layer1.0.downsample.0.weight."""
    collection, *modules, leaf = flax_key_.split("/")
    names = []
    for module in modules:
        module = {"downsample_conv": "downsample_0", "downsample_bn": "downsample_1"}.get(module, module)
        names.append(re.sub(r"_(\d+)$", r".\1", module))
    leaf = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
            "var": "running_var"}[leaf]
    return ".".join(names + [leaf])


def _is_momentum(prefix: str) -> bool:
    return bool(MOMENTUM_WORDS & set(re.split(r"[._]", prefix.lower())))


@dataclasses.dataclass
class _Candidate:
    prefix: str
    sequential: bool  # keys numbered as nn.Sequential(*torchvision children)
    entries: Dict[str, Any]  # torch name (children renamed) -> tensor, under the prefix
    used: Dict[str, str]  # flax key -> torch name of the entries that make up the encoder
    classifier: Dict[str, str]  # flax key -> torch name of a torchvision `fc` classifier (kept, unused)
    problem: Optional[str]  # the first expected entry missing or of another shape; None when complete

    @property
    def shown(self) -> str:
        return f"{self.prefix!r}" + (" (numbered nn.Sequential children)" if self.sequential else "")


def _renamed(rest: str, sequential: bool) -> str:
    if not sequential:
        return rest
    head, _, tail = rest.partition(".")
    if head.isdigit() and int(head) < len(RESNET_CHILDREN):
        return f"{RESNET_CHILDREN[int(head)]}.{tail}"
    return rest


def _torch_shape(flax_shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """A flax shape in torch's layout: HWIO -> OIHW, [in, out] -> [out, in] (`flax_key` inverted)."""
    if len(flax_shape) == 4:
        return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
    return tuple(reversed(flax_shape)) if len(flax_shape) == 2 else flax_shape


def _candidate(flat, prefix: str, sequential: bool, expected: Mapping[str, Tuple[int, ...]]) -> _Candidate:
    entries = {_renamed(name[len(prefix):], sequential): value for name, value in flat.items()
               if name.startswith(prefix)}
    used, classifier, shapes = {}, {}, {}
    for name, value in entries.items():
        converted = flax_key(name, value.shape)
        if converted is None or not converted[0]:
            continue
        key, shape = converted
        shapes[key] = (shape, name)
        if key in expected and tuple(expected[key]) == shape:
            used[key] = name
        elif key.split("/")[1] == CLASSIFIER and len(key.split("/")) == 3:
            classifier[key] = name
    problem = None
    for key, shape in sorted(expected.items(), key=lambda item: torchvision_order(torch_name(item[0]))):
        if key not in shapes:
            problem = f"lacks {torch_name(key)} (model shape {tuple(shape)})"
            break
        if key not in used:
            name = shapes[key][1]
            problem = (f"has {name} of shape {tuple(entries[name].shape)} where the model needs "
                       f"{_torch_shape(tuple(shape))}")
            break
    for key, name in list(classifier.items()):
        if key.endswith("kernel") and len(entries[name].shape) != 2:
            del classifier[key]
    return _Candidate(prefix, sequential, entries, used, classifier, problem)


def first_entry(expected: Mapping[str, Tuple[int, ...]]) -> str:
    """The flax key of the encoder's stem convolution (ResNet's conv1, EfficientNet's conv_stem): the entry
    that anchors a prefix. jax returns dicts sorted by key, so insertion order cannot tell it."""
    for key in ("params/conv1/kernel", "params/conv_stem/kernel"):
        if key in expected:
            return key
    return min((k for k in expected if k.startswith("params/") and k.endswith("/kernel")), key=lambda k: (k.count("/"), k))


def _candidates(flat, expected) -> List[_Candidate]:
    first = first_entry(expected)
    resnet = first == "params/conv1/kernel"
    found = []
    for name, value in flat.items():
        parts = name.split(".")
        for cut in range(len(parts)):
            prefix, rest = ".".join(parts[:cut]) + ("." if cut else ""), ".".join(parts[cut:])
            converted = flax_key(rest, value.shape)
            if converted and converted[0] == first:
                found.append((prefix, False))
            elif resnet and rest == "0.weight" and len(value.shape) == 4:
                found.append((prefix, True))
    unique = list(dict.fromkeys(found))
    return [_candidate(flat, prefix, sequential, expected) for prefix, sequential in unique]


@dataclasses.dataclass
class Selection:
    """What `select_encoder` chose: the encoder's entries (torch names as in torchvision), the method
    branches found beside it ({subtree: {flax module: {torch leaf: tensor}}} per method), the one-line
    summary of what was used and dropped, and the prefix."""
    prefix: str
    encoder: Dict[str, Any]
    branches: Dict[str, Dict[str, Dict[str, Dict[str, Any]]]]
    summary: str


def _group(names, depth_of) -> str:
    counts: Dict[str, int] = {}
    for name in names:
        parts = name.split(".")
        group = ".".join(parts[:depth_of(parts)])
        counts[group] = counts.get(group, 0) + 1
    shown = [f"{group} ({count})" if count > 1 else group for group, count in list(counts.items())[:_SHOWN]]
    more = len(counts) - _SHOWN
    return ", ".join(shown) + (f", +{more} more" if more > 0 else "")


def _branches(flat, prefix: str, method_branches) -> Dict[str, Dict[str, Dict[str, Dict[str, Any]]]]:
    """For each method, its `CHECKPOINT_BRANCHES` found complete beside the encoder's prefix (the same
    parent: LCR's `module.conv16` beside `module.encoder_q.`): {method: {subtree: {torch module: {leaf:
    tensor}}}}."""
    parent = prefix.rstrip(".").rpartition(".")[0]
    parent = f"{parent}." if parent else ""
    found = {}
    for method, subtrees in method_branches.items():
        for subtree, modules in subtrees.items():
            got = {}
            for torch_module in modules:
                leaves = {name[len(parent) + len(torch_module) + 1:]: value for name, value in flat.items()
                          if name.startswith(f"{parent}{torch_module}.")}
                if leaves:
                    got[torch_module] = leaves
            if set(got) == set(modules):
                found.setdefault(method, {})[subtree] = got
    return found


def select_encoder(flat: Mapping[str, Any], expected: Mapping[str, Tuple[int, ...]], *, what: str,
                   prefix: Optional[str] = None, method_branches: Mapping[str, Any] = (),
                   method: str = "") -> Selection:
    """Choose the online encoder's entries in a flattened checkpoint (module docstring).

    Args:
      flat: {dotted name: array or TensorSpec} (`flatten_tensors`).
      expected: {flax key "params/conv1/kernel": shape} of the model's encoder.
      what: how messages name the file and model, e.g. "checkpoint 'moco.pth.tar' for resnet50".
      prefix: None or "" to choose automatically, else the exact prefix to take (`model.init_prefix`).
      method_branches: {method: {params subtree: {torch module: flax module}}} (`methods.checkpoint_branches`).
      method: the run's method; its branches are reported used, the others' dropped.
    Raises `CheckpointError` (one line) when no prefix or several hold a complete encoder.
    """
    candidates = _candidates(flat, expected)
    first = torch_name(first_entry(expected))
    if prefix:
        candidates = [c for c in candidates if c.prefix == prefix]
        if not candidates:
            raise CheckpointError(f"{what}: no entry {prefix}{first} (config.model.init_prefix={prefix!r}); "
                                  "set config.model.init_prefix='' to choose automatically.")
    complete = [c for c in candidates if c.problem is None]
    online = [c for c in complete if prefix or not _is_momentum(c.prefix)]
    if not candidates:
        sample = ", ".join(list(flat)[:3]) or "no tensors at all"
        raise CheckpointError(f"{what}: no entry ends in {first}, the first entry of the encoder (its entries "
                              f"start {sample}); is it a checkpoint of this architecture (config.model.name)?")
    if not complete:
        closest = max(candidates, key=lambda c: (len(c.used), not _is_momentum(c.prefix)))  # ties: the online one
        raise CheckpointError(f"{what}: no complete encoder; the closest is prefix {closest.shown} with "
                              f"{len(closest.used)} of {len(expected)} entries, which {closest.problem}: is it a "
                              "checkpoint of this architecture (config.model.name)?")
    if not online:
        raise CheckpointError(f"{what}: the only complete encoder is the momentum copy at prefix "
                              f"{complete[0].prefix!r}; the online encoder is what its own linear evaluation "
                              "uses; set config.model.init_prefix to take this one anyway.")
    if len(online) > 1:
        names = ", ".join(repr(c.prefix) for c in online[:3])
        raise CheckpointError(f"{what}: several complete encoders ({names}); choose one with "
                              "config.model.init_prefix.")
    chosen = online[0]
    used_names = set(chosen.used.values())
    encoder = {name: chosen.entries[name] for name in list(chosen.used.values()) + list(chosen.classifier.values())}
    counters = {n for n in chosen.entries  # BN's num_batches_tracked of the encoder's own BN layers
                if n.endswith(".num_batches_tracked") and n[: -len("num_batches_tracked")] + "running_mean" in used_names}
    taken = used_names | counters
    branches = _branches(flat, chosen.prefix, method_branches)
    parent = chosen.prefix.rstrip(".").rpartition(".")[0]
    branch_names = {f"{parent}.{m}".lstrip(".") for subtrees in branches.get(method, {}).values() for m in subtrees}
    dropped_inside = [n for n in chosen.entries if n not in taken and n not in chosen.classifier.values()]
    outside = [n for n in flat if not n.startswith(chosen.prefix)]
    kept_branch = [n for n in outside if any(n.startswith(b + ".") for b in branch_names)]
    other_branches = {f"{parent}.{m}".lstrip(".") for name, subtrees in branches.items() if name != method
                      for modules in subtrees.values() for m in modules}
    dropped_outside = [n for n in outside if n not in kept_branch
                       and not any(n.startswith(b + ".") for b in other_branches)]
    parts = [f"{what}: encoder at prefix {chosen.shown} ({len(taken)} entries)"]
    if branch_names:
        parts.append(f"{method}'s {'/'.join(sorted(m.rpartition('.')[2] for m in branch_names))} beside it")
    if chosen.classifier:
        parts.append(f"classifier {CLASSIFIER} kept aside (unused by the encoder)")
    dropped = []
    if dropped_inside:
        dropped.append(_group(dropped_inside, lambda p: max(1, len(p) - 1)))
    if dropped_outside:  # grouped one level below where they part from the encoder's path
        anchor = chosen.prefix.rstrip(".").split(".") if chosen.prefix else []

        def parting(parts):
            common = next((i for i, (a, b) in enumerate(zip(parts, anchor)) if a != b), min(len(parts), len(anchor)))
            return min(len(parts), common + 1)

        dropped.append(_group(dropped_outside, parting))
    for other, subtrees in branches.items():
        if other != method:
            dropped.append(f"{'/'.join(m for s in subtrees.values() for m in s)} ({other}'s branch: "
                           f"--config.method={other} uses it)")
    summary = "; ".join(parts) + ("; dropped " + "; ".join(dropped) if dropped else "") + "."
    return Selection(chosen.prefix, encoder, branches, summary)


# ----------------------------------------------------------------------------- to flax variables


def flax_variables(state: Mapping[str, Any]) -> dict:
    """{"params", "batch_stats"} of a torch {name: tensor} dict by `pretrained.py`'s rule; `TensorSpec`
    values become `TensorSpec`s of the flax shape (the shapes-only preflight), arrays are transposed."""
    flat = {}
    for name, value in state.items():
        converted = flax_key(name, value.shape)
        if not converted or not converted[0]:
            continue
        key, shape = converted
        if isinstance(value, TensorSpec):
            flat[key] = TensorSpec(shape, value.dtype)
        else:
            flat[key] = np.ascontiguousarray(pretrained._flax_leaf(name.rpartition(".")[2], np.asarray(value))[2])
    return traverse_util.unflatten_dict(flat, sep="/")


def _branch_variables(modules: Mapping[str, Mapping[str, Any]], flax_names: Mapping[str, str]) -> dict:
    """{torch module: {leaf: tensor}} -> {"params", "batch_stats"} under the method's flax module names."""
    return flax_variables({f"{flax_names[module]}.{leaf}": value for module, leaves in modules.items()
                           for leaf, value in leaves.items()})


def to_flax(selection: Selection, method_branches: Mapping[str, Any]) -> dict:
    """{"encoder": {"params", "batch_stats"} (with the classifier, if any, under params/fc),
    "branches": {method: {subtree: {"params", "batch_stats"}}}} of a `Selection` (arrays or TensorSpecs)."""
    branches = {method: {subtree: _branch_variables(modules, method_branches[method][subtree])
                         for subtree, modules in subtrees.items()}
                for method, subtrees in selection.branches.items()}
    return {"encoder": flax_variables(selection.encoder), "branches": branches}


def expected_shapes(abstract_variables) -> Dict[str, Tuple[int, ...]]:
    """{"params/conv1/kernel": shape} of abstract encoder variables (`models.abstract_encoder_variables`)."""
    flat = traverse_util.flatten_dict(dict(abstract_variables), sep="/")
    return {key: tuple(value.shape) for key, value in flat.items() if key.split("/")[0] in ("params", "batch_stats")}


def _cache_path(source: str, cache_dir: str, fingerprint: str) -> str:
    stat = os.stat(source)
    key = f"{pretrained.CONVERTER_VERSION}|{os.path.abspath(source)}|{stat.st_size}|{stat.st_mtime_ns}|{fingerprint}"
    stem = os.path.basename(source).split(".")[0]
    return os.path.join(cache_dir, f"{stem}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.msgpack")


def import_encoder(path: str, expected: Mapping[str, Tuple[int, ...]], *, what: str, prefix: str = "",
                   method_branches: Mapping[str, Any] = (), method: str = "", cache_dir: Optional[str] = None,
                   with_data: bool = True) -> Tuple[dict, str]:
    """(variables, summary line) of the encoder in the checkpoint file `path` (`to_flax`'s dict; with
    `with_data` False its leaves are `TensorSpec`s: names and shapes only, the file's index alone is read).

    Reads torch.save files (zip and legacy, any wrapper) and `.safetensors` (`pretrained.read_checkpoint`);
    chooses the encoder with `select_encoder`; caches the converted variables under `cache_dir` keyed by
    the file's path, size, modification time, the expected shapes, prefix and branches.
    Raises `MissingFileError`, or `CheckpointError` (one line) for a file that is unreadable or holds no
    usable encoder.
    """
    fingerprint = repr((sorted(expected.items()), prefix, sorted(method_branches.items()) if method_branches else (),
                        method))
    cache = _cache_path(path, cache_dir, fingerprint) if cache_dir and with_data and os.path.isfile(path) else None
    if cache and os.path.isfile(cache):
        try:
            with open(cache, "rb") as stream:
                stored = serialization.msgpack_restore(stream.read())
            return {"encoder": stored["encoder"], "branches": stored.get("branches", {})}, stored["summary"]
        except Exception:  # a damaged cache entry is derived data: convert again and overwrite it
            pass
    flat = flatten_tensors(pretrained.read_checkpoint(path, with_data=with_data))
    selection = select_encoder(flat, expected, what=what, prefix=prefix, method_branches=dict(method_branches),
                               method=method)
    variables = to_flax(selection, method_branches)
    if cache:
        os.makedirs(cache_dir, exist_ok=True)

        def write(temporary):
            with open(temporary, "wb") as stream:
                stream.write(serialization.msgpack_serialize(dict(variables, summary=selection.summary)))

        write_atomically(cache, write)
    return variables, selection.summary
