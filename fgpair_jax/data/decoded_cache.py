"""Decoded images held in host memory (`config.data.cache_gib`): each JPEG of a split decoded once per run,
not once per epoch.

Why: reading a record and decoding its JPEG is a fixed share of the host's cost per training image (about a
third at 224 px on the CUB subset; benchmarks/pipeline_throughput.py), paid again every epoch. A fine-grained
data set decoded fits in a host's memory: CUB's 5,994 training images are about 3.4 GB at their own size,
1.6 GB stored with their shorter side at 256 px (`config.data.stored_short_side`), the CUB subset's 2,999
0.46 GB.

The pixels live in one POSIX shared-memory block (`multiprocessing.shared_memory`), so grain's worker
processes, which receive the data set pickled, attach to it by name instead of each getting a copy. The
process that built the cache owns the block and removes it when the cache is garbage-collected or at exit;
the block needs that much free room in /dev/shm, checked before it is made (a container's /dev/shm is
often 64 MB: then lower the budget or enlarge /dev/shm, e.g. `docker run --shm-size=8g`).

The cache changes no pixel: a cached record is the source's record, image included, byte for byte (an
`EncodedImage` of `config.data.reduced_decode` is decoded in full, so that option has nothing left to do).
"""

from __future__ import annotations

import os
import shutil
import weakref
from collections.abc import Sequence
from multiprocessing import shared_memory

import numpy as np

from fgpair_jax.errors import ConfigError

GIB = 2**30
SHARED_MEMORY_DIR = "/dev/shm"  # where Linux's shm_open keeps blocks


class DecodedImages(Sequence):
    """The records of a random-access `source`, with every image decoded once into shared memory.

    Each element is the source's record (a dict: "image" uint8 [H,W,3] plus its other fields) as
    `source[i]` returned it. Build it with `decoded_cache`, which checks the budget.
    """

    def __init__(self, records: list[dict], offsets: np.ndarray, shapes: np.ndarray, block_name: str,
                 owner: shared_memory.SharedMemory | None):
        self._records = records  # every field but "image"
        self._offsets = offsets  # int64 [N+1]: image i is bytes offsets[i]:offsets[i+1] of the block
        self._shapes = shapes  # int64 [N, 3]
        self._block_name = block_name
        self._attach(owner)

    def _attach(self, owner: shared_memory.SharedMemory | None) -> None:
        if owner is None:  # a grain worker: attach to the block its parent owns
            self._block = shared_memory.SharedMemory(name=self._block_name)
        else:
            self._block = owner
            weakref.finalize(self, _remove_block, owner)  # also runs at interpreter exit
        self._pixels = np.ndarray((int(self._offsets[-1]),), np.uint8, buffer=self._block.buf)

    def __getstate__(self) -> dict:
        """Pickled for a worker process: the block's name, not its pixels."""
        return {"records": self._records, "offsets": self._offsets, "shapes": self._shapes,
                "block_name": self._block_name}

    def __setstate__(self, state: dict) -> None:
        self._records, self._offsets, self._shapes = state["records"], state["offsets"], state["shapes"]
        self._block_name = state["block_name"]
        self._attach(None)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, position: int) -> dict:
        start, end = int(self._offsets[position]), int(self._offsets[position + 1])
        image = self._pixels[start:end].reshape(tuple(self._shapes[position]))
        image.flags.writeable = False  # shared by every reader: a crop must not change it in place
        return {**self._records[position], "image": image}

    @property
    def nbytes(self) -> int:
        """Bytes of decoded pixels held."""
        return int(self._offsets[-1])


def _remove_block(block: shared_memory.SharedMemory) -> None:
    block.close()
    try:
        block.unlink()
    except FileNotFoundError:  # already removed
        pass


def decoded_cache(source: Sequence[dict], budget_gib: float, *, what: str = "train split") -> Sequence[dict]:
    """`source` itself for `budget_gib` 0 (no cache), else a `DecodedImages` of it.

    Decodes every record once, in order. Raises `ConfigError` (one line) as soon as the decoded images
    exceed `budget_gib` GiB, before any shared memory is made (the images decoded so far are dropped), and
    when /dev/shm has less room than they take.
    """
    if budget_gib < 0:
        raise ConfigError(f"config.data.cache_gib={budget_gib} must be >= 0 (0: no cache).")
    if budget_gib == 0:
        return source
    budget = int(budget_gib * GIB)
    images, records, total = [], [], 0
    for position in range(len(source)):
        record = dict(source[position])
        image = np.ascontiguousarray(record.pop("image"))
        total += image.nbytes
        if total > budget:
            estimate = total / (position + 1) * len(source) / GIB
            raise ConfigError(
                f"config.data.cache_gib={budget_gib:g}: the {what}'s {len(source):,} decoded images take more "
                f"(over {total / GIB:.2f} GiB after {position + 1:,}, about {estimate:.2f} GiB in all); raise it "
                f"above that, store smaller copies (config.data.stored_short_side), or set 0 to decode every epoch.")
        images.append(image)
        records.append(record)
    _check_shared_memory_room(total, budget_gib)
    offsets = np.zeros(len(images) + 1, np.int64)
    offsets[1:] = np.cumsum([image.nbytes for image in images])
    shapes = np.array([image.shape for image in images], np.int64).reshape(len(images), 3)
    block = shared_memory.SharedMemory(create=True, size=max(1, total))
    pixels = np.ndarray((total,), np.uint8, buffer=block.buf)
    for position, image in enumerate(images):
        pixels[offsets[position] : offsets[position + 1]] = image.reshape(-1)
        images[position] = None  # peak memory: the decoded images once, plus the block
    del pixels
    return DecodedImages(records, offsets, shapes, block.name, owner=block)


def _check_shared_memory_room(needed: int, budget_gib: float) -> None:
    """`ConfigError` when /dev/shm (Linux) has less free room than `needed` bytes: writing past it would
    kill the process with SIGBUS, not raise."""
    if not os.path.isdir(SHARED_MEMORY_DIR):
        return
    free = shutil.disk_usage(SHARED_MEMORY_DIR).free
    if free < needed:
        raise ConfigError(
            f"config.data.cache_gib={budget_gib:g}: the decoded images take {needed / GIB:.2f} GiB but "
            f"{SHARED_MEMORY_DIR} has {free / GIB:.2f} GiB free; enlarge it (docker run --shm-size), or set "
            f"config.data.cache_gib=0 to decode every epoch.")
