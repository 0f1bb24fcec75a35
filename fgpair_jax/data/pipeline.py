"""Host input pipeline (grain): decode + geometric augmentation on the host, uint8 batches out.

Why this split: JPEG decoding and random-resized crops need variable-sized images, which only the host
handles well; photometric augmentation (colour jitter, greyscale, blur) and normalisation are dense
per-pixel maths that the accelerator does far faster (fgpair_jax/data/augment.py). Shipping uint8 also
cuts host->device traffic by 4x.

Determinism: every random choice for a record comes from `np.random.default_rng((seed, epoch, record))`
and the order from grain's index shuffle (reseeded each epoch), so a global batch depends only on (seed,
step) -- never on worker, thread or process counts (a process's share of it also on the process index).

Multi-host: global batch g holds the shuffled positions [g*B, (g+1)*B); process p reads and decodes only
positions [g*B + p*b, g*B + (p+1)*b) with b = B // process_count, so the process-local batches laid side by
side (e.g. by jax.make_array_from_process_local_data) are exactly the single-process global batch.

Host cost per image (issue 27; measured per core by benchmarks/pipeline_throughput.py, results/README.md):
reading and decoding the JPEG, then two crop-resizes. Options, each a `config.data` knob: `view_resize=
"opencv"` (the resizes, the largest part at 224 px, in OpenCV: `resize.py`), `reduced_decode` (JPEGs decoded
at 1/2-1/8 size when both crops allow: `jpeg.py`), `stored_short_side` (a build of smaller copies:
`images.py`), `cache_gib` (the train split decoded once into shared memory: `decoded_cache.py`), and
`worker_count=-1` (the default: one grain worker process per core on a GPU/TPU, none on a CPU). None
changes a draw; the pixels differ by resampling only (tests/test_host_pipeline_options.py).

Resuming therefore needs no iterator state: `train_dataset(..., start_step=step)` starts at the restored
step, under any `data.worker_count` and process count. (grain's own iterator state differs per worker count:
restored under another one it fails.) Each checkpoint records the position, `train_position(step)`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import grain
from absl import flags
import numpy as np
from PIL import Image

from fgpair_jax.data import jpeg, nuisance as nuisance_lib, resize
from fgpair_jax.errors import ConfigError

CROP_ATTEMPTS = 10  # torchvision RandomResizedCrop tries 10 boxes before its centre-crop fallback.
_RESAMPLING = resize.PIL_RESAMPLING


# ---------------------------------------------------------------- per-image transforms (pure, numpy/PIL)


def _check_rgb_uint8(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 [H,W,3] image, got {image.dtype} {image.shape}; decode to RGB first")


def sample_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(top, left, crop_height, crop_width) with torchvision RandomResizedCrop semantics.

    Area fraction ~ U(scale), log aspect ~ U(log ratio); up to 10 tries to fit, then a centre crop clamped
    to the ratio range.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(CROP_ATTEMPTS):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        crop_width = int(round(math.sqrt(target_area * aspect)))
        crop_height = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(rng.integers(0, height - crop_height + 1))
            left = int(rng.integers(0, width - crop_width + 1))
            return top, left, crop_height, crop_width
    input_ratio = width / height
    if input_ratio < min(ratio):
        crop_width, crop_height = width, int(round(width / min(ratio)))
    elif input_ratio > max(ratio):
        crop_height, crop_width = height, int(round(height * max(ratio)))
    else:
        crop_height, crop_width = height, width
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def random_resized_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    size: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    interpolation: str = "bilinear",
) -> np.ndarray:
    """A random box (see sample_crop_box) of a uint8 [H,W,3] image, resized by PIL to uint8 [size,size,3]."""
    _check_rgb_uint8(image)
    box = sample_crop_box(image.shape[0], image.shape[1], rng, scale, ratio)
    return np.asarray(resize.view_pil(Image.fromarray(image), box, size, False, interpolation))


def two_views(
    image: np.ndarray | jpeg.EncodedImage,
    rng: np.random.Generator,
    size: int,
    scale: tuple[float, float] = (0.2, 1.0),
    interpolation: str = "bilinear",
    resize_with: str = "pil",
) -> tuple[np.ndarray, np.ndarray]:
    """Two independent MoCo-v2 geometric views of a uint8 [H,W,3] image: random resized crop, then a
    horizontal flip with p=0.5; each view uint8 [size,size,3].

    The draws (box, flip, box, flip from `rng`, on the image's [H,W]) are the same whatever the image's
    form and the resampling: `image` may be decoded pixels or a `jpeg.EncodedImage`, which is decoded at the
    reduced size both boxes allow (`jpeg.reduction_for`; the boxes scaled to it). `resize_with`: "pil"
    (torchvision's PIL path: antialiased bilinear or bicubic) or "opencv" (`resize.view_opencv`, several
    times cheaper on the host; within a few grey levels of "pil").
    """
    resize.check_view_resize(resize_with)
    if not isinstance(image, jpeg.EncodedImage):
        _check_rgb_uint8(image)
    height, width = image.shape[:2]
    boxes, flips = [], []
    for _ in range(2):
        boxes.append(sample_crop_box(height, width, rng, scale, (3 / 4, 4 / 3)))
        flips.append(bool(rng.random() < 0.5))
    if isinstance(image, jpeg.EncodedImage):
        image, region = image.decode_region(jpeg.reduction_for(boxes, size))
        boxes = [_box_in_region(box, region, height, width) for box in boxes]
    if resize_with == "opencv":
        return tuple(resize.view_opencv(image, box, size, flip, interpolation) for box, flip in zip(boxes, flips))
    pil_image = Image.fromarray(image)  # PIL's flip is ~15x cheaper than a strided numpy copy
    return tuple(np.asarray(resize.view_pil(pil_image, box, size, flip, interpolation))
                 for box, flip in zip(boxes, flips))


def _box_in_region(box: tuple[int, int, int, int], region: tuple[float, float, float, float], height: int,
                   width: int) -> tuple[float, float, float, float]:
    """`box` (top, left, height, width) in an image of [height, width] pixels, in the pixels of a decoded
    array where that image is `region` (top, left, height, width; scaled and offset)."""
    scale_y, scale_x = region[2] / height, region[3] / width
    return (region[0] + box[0] * scale_y, region[1] + box[1] * scale_x, box[2] * scale_y, box[3] * scale_x)


def eval_transform(
    image: np.ndarray, size: int, crop_fraction: float = 0.875, interpolation: str = "bilinear"
) -> np.ndarray:
    """Shorter side to round(size / crop_fraction), then a centre size x size crop (Resize(256)+CenterCrop(224)).
    `image`: uint8 [H,W,3], or a `jpeg.EncodedImage`, decoded in full (evaluation's pixels never depend on
    `config.data.reduced_decode`)."""
    image = np.asarray(image)
    _check_rgb_uint8(image)
    height, width = image.shape[:2]
    short_side = int(round(size / crop_fraction))
    if height <= width:
        new_height, new_width = short_side, int(short_side * width / height)
    else:
        new_height, new_width = int(short_side * height / width), short_side
    resized = np.asarray(Image.fromarray(image).resize((new_width, new_height), _RESAMPLING[interpolation]))
    top = int(round((new_height - size) / 2.0))
    left = int(round((new_width - size) / 2.0))
    return resized[top : top + size, left : left + size]


# ---------------------------------------------------------------- batching arithmetic


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Full global batches per epoch; each epoch drops its own remainder, so step // steps = epoch."""
    steps = num_examples // global_batch_size
    if steps == 0:
        raise ConfigError(f"config.global_batch_size={global_batch_size} exceeds the {num_examples} training "
                          f"images (an epoch is at least one full batch); lower it to at most {num_examples}.")
    return steps


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    """Each process's share of a global batch."""
    if global_batch_size % process_count:
        raise ConfigError(f"config.global_batch_size={global_batch_size} is not divisible by the {process_count} "
                          "processes of the job; use a multiple of the number of processes.")
    return global_batch_size // process_count


def global_position(local_position: int, local_batch: int, process_index: int, process_count: int) -> int:
    """Position in the global stream of this process's `local_position`-th element (contiguous slices)."""
    batch_number, offset = divmod(local_position, local_batch)
    return batch_number * local_batch * process_count + process_index * local_batch + offset


# ---------------------------------------------------------------- grain element functions (picklable)


@dataclasses.dataclass(frozen=True)
class _TwoViewExample:
    """Maps a process-local stream position to {view1, view2, label, index} of the record it stands for."""

    source: Sequence[dict]
    record_order: grain.MapDataset  # position epoch*N + i -> record index; reshuffled every epoch
    examples_per_epoch: int  # steps_per_epoch * global batch (the epoch's remainder is dropped)
    seed: int
    image_size: int
    crop_scale: tuple[float, float]
    local_batch: int
    process_index: int
    process_count: int
    nuisance: nuisance_lib.Nuisance = nuisance_lib.Nuisance()
    resize_with: str = "pil"

    def __call__(self, local_position: int) -> dict[str, Any]:
        position = global_position(local_position, self.local_batch, self.process_index, self.process_count)
        epoch, offset = divmod(position, self.examples_per_epoch)
        record = int(self.record_order[epoch * len(self.source) + offset])
        rng = np.random.default_rng((self.seed, epoch, record))
        element = self.source[record]
        view1, view2 = two_views(element["image"], rng, self.image_size, self.crop_scale,
                                 resize_with=self.resize_with)
        view1, view2 = nuisance_lib.two_views(view1, view2, record, rng, self.nuisance)
        return {
            "view1": view1,
            "view2": view2,
            "label": np.int32(element["label"]),
            "index": np.int32(record),
        }


@dataclasses.dataclass(frozen=True)
class _EvalExample:
    """Maps a process-local position to {image, label, mask, index}; positions past the data are padding."""

    source: Sequence[dict]
    image_size: int
    local_batch: int
    process_index: int
    process_count: int
    crop_fraction: float = 0.875
    nuisance: nuisance_lib.Nuisance = nuisance_lib.Nuisance()
    nuisance_stream: int = nuisance_lib.EVAL_STREAM

    def __call__(self, local_position: int) -> dict[str, Any]:
        record = global_position(local_position, self.local_batch, self.process_index, self.process_count)
        if record >= len(self.source):
            return {
                "image": np.zeros((self.image_size, self.image_size, 3), np.uint8),
                "label": np.int32(-1),
                "mask": np.bool_(False),
                "index": np.int32(-1),
            }
        element = self.source[record]
        return {
            "image": nuisance_lib.eval_image(eval_transform(element["image"], self.image_size, self.crop_fraction),
                                             record, self.nuisance, self.nuisance_stream),
            "label": np.int32(element["label"]),
            "mask": np.bool_(True),
            "index": np.int32(record),
        }


def default_worker_count(backend: str | None = None) -> int:
    """Grain worker processes for `config.data.worker_count = -1`: none on a CPU backend (`backend`, default
    `jax.default_backend()`), where XLA's step already uses every core and workers only compete with it
    (results/README.md, input pipeline); one per core this process may run on otherwise, since decoding and
    cropping two 224-px views per image is host work a GPU or TPU step does not share."""
    if backend is None:
        import jax  # pylint: disable=import-outside-toplevel  # the host pipeline needs JAX for this alone

        backend = jax.default_backend()
    return 0 if backend == "cpu" else len(os.sched_getaffinity(0))


def _to_iter_dataset(dataset: grain.MapDataset, read_threads: int, worker_count: int) -> grain.IterDataset:
    """Threads prefetch whole batches (PIL releases the GIL); optional worker processes slice by batch.
    A negative `worker_count` means `default_worker_count()`."""
    if worker_count < 0:
        worker_count = default_worker_count()
    options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(2, 2 * read_threads))
    iterable = dataset.to_iter_dataset(options)
    if worker_count > 0:
        if not flags.FLAGS.is_parsed():  # grain reads its absl flags when it starts worker processes
            raise RuntimeError("worker_count > 0 needs parsed absl flags (grain's worker processes read them): "
                               "run through an absl app (fgpair_jax.main), or call "
                               "absl.flags.FLAGS.mark_as_parsed() first to use their defaults.")
        iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count),
                                        worker_init_fn=_leave_interrupts_to_the_main_process)
    return iterable


def _leave_interrupts_to_the_main_process(worker_index: int, worker_count: int) -> None:
    """Run first in each grain worker process: ignore SIGINT. A terminal's Ctrl-C reaches the whole process
    group; the main process turns it into a clean stop with a checkpoint (`preemption.StopRequests`), while
    each worker would die with a KeyboardInterrupt traceback of its own. The main process ends the workers."""
    del worker_index, worker_count
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ClosingIterator:
    """`iter(dataset)` that `close()` (or leaving a `with` block) ends for good: grain's prefetch threads and
    worker processes (`worker_count` > 0) stop then, while the interpreter is whole, and the grain iterator is
    released at once. Why: an iterator still alive when the interpreter exits (a frame kept by a traceback, a
    global) is closed by grain's `__del__` with its modules already torn down, which prints 'Exception
    ignored in ... __del__' tracebacks; a closed grain iterator closes again there, with the same result."""

    def __init__(self, dataset: grain.IterDataset):
        self._iterator = iter(dataset)

    def __iter__(self):
        return self

    def __next__(self):
        if self._iterator is None:
            raise StopIteration
        return next(self._iterator)

    def close(self) -> None:
        if self._iterator is not None:
            iterator, self._iterator = self._iterator, None
            iterator.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# ---------------------------------------------------------------- public datasets


def train_dataset(
    source: Sequence[dict],
    *,
    global_batch_size: int,
    image_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    worker_count: int = 0,
    read_threads: int = 2,
    crop_scale: tuple[float, float] = (0.2, 1.0),
    start_step: int = 0,
    nuisance: nuisance_lib.Nuisance = nuisance_lib.Nuisance(),
    resize_with: str = "pil",
) -> grain.IterDataset:
    """Shuffled two-view training batches for this process, from global batch `start_step` on.

    Yields {"view1", "view2": uint8 [b,S,S,3], "label", "index": int32 [b]} with b = global_batch_size //
    process_count; `index` is the record's position in `source`. num_epochs=None repeats forever.
    `nuisance`: the mechanism control's per-image nuisance on both views (`data/nuisance.py`; none by default).
    `resize_with`: how the views are resampled, "pil" or "opencv" (`two_views`; `config.data.view_resize`).
    `worker_count`: grain worker processes; -1 for `default_worker_count()`.
    """
    resize.check_view_resize(resize_with)
    local_batch = local_batch_size(global_batch_size, process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is outside [0, {process_count}); check the launcher")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed {seed} must lie in [0, 2**32) for grain's shuffle")
    num_examples = len(source)
    steps = steps_per_epoch(num_examples, global_batch_size)
    total_steps = sys.maxsize // global_batch_size if num_epochs is None else num_epochs * steps
    example = _TwoViewExample(
        source=source,
        record_order=grain.MapDataset.range(num_examples).shuffle(seed=seed).repeat(),
        examples_per_epoch=steps * global_batch_size,
        seed=seed,
        image_size=image_size,
        crop_scale=tuple(crop_scale),
        local_batch=local_batch,
        process_index=process_index,
        process_count=process_count,
        nuisance=nuisance,
        resize_with=resize_with,
    )
    if not 0 <= start_step <= total_steps:
        raise ValueError(f"start_step {start_step} is outside [0, {total_steps}]")
    positions = grain.MapDataset.range(start_step * local_batch, total_steps * local_batch)
    batches = positions.map(example).batch(local_batch, drop_remainder=True)
    return _to_iter_dataset(batches, read_threads, worker_count)


def train_position(step: int) -> dict:
    """The data position saved with the checkpoint of `step`: the index of the next global batch (the
    step itself; in grain's terms for a worker-free iterator). A resume starts at the restored step."""
    return {"next_index": int(step)}


def eval_batches(
    source: Sequence[dict],
    *,
    batch_size: int,
    image_size: int,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int = 0,
    read_threads: int = 2,
    crop_fraction: float = 0.875,
    nuisance: nuisance_lib.Nuisance = nuisance_lib.Nuisance(),
    nuisance_stream: int = nuisance_lib.EVAL_STREAM,
) -> grain.IterDataset:
    """Every example exactly once, in source order, in fixed-shape batches; iterate it once per evaluation.

    Each image is `eval_transform`ed (shorter side to image_size / crop_fraction, centre crop), then carries
    its own `nuisance` when one is on (`nuisance_stream`: whose images these are, `nuisance.stream_of`).

    `batch_size` is global; each process yields batch_size // process_count rows per batch and all
    processes yield the same number of batches. The last global batch is padded: mask False, image zeros,
    label and index -1. Yields {"image": uint8 [b,S,S,3], "label": int32 [b], "mask": bool [b],
    "index": int32 [b]}.
    """
    local_batch = local_batch_size(batch_size, process_count)
    num_batches = -(-len(source) // batch_size)
    example = _EvalExample(source, image_size, local_batch, process_index, process_count, crop_fraction,
                           nuisance, nuisance_stream)
    batches = grain.MapDataset.range(num_batches * local_batch).map(example).batch(local_batch)
    return _to_iter_dataset(batches, read_threads, worker_count)

