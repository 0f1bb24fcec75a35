"""Shared test fixtures: a tiny config, a tiny CUB-layout folder, the shared subset's location."""
import os

import numpy as np
import pytest
from PIL import Image

from configs import cub

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_CUB = cub.DEFAULT_CUB_DIR


def tiny_config(**overrides):
    """The quick config shrunk to seconds: 8-channel ResNet, 32 px, batch 8, queue 16, small decoder."""
    config = cub.get_config("quick")
    config.model.name = "resnet_tiny"
    config.model.init = "none"
    config.model.frozen_stages = 0
    config.model.bn_groups = 2
    config.data.image_size = 32
    config.global_batch_size = 8
    config.moco.queue_size = 16
    config.moco.momentum = 0.9
    config.optim.learning_rate = 0.05
    config.num_epochs = 1
    config.eval.batch_size = 16
    config.log_every_steps = 1
    config.fgpair.decoder_channels = (16, 8)
    config.fgpair.pair_stride = 1
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config


def write_tiny_cub(folder, class_ids=(2, 5, 9), train_per_class=6, test_per_class=3, seed=0):
    """A CUB_200_2011-layout folder with small coloured JPEGs; class ids have gaps like the subset's.

    Each class has its own dominant colour so that a model can learn something in a few steps.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    images, labels, split, classes = [], [], [], []
    image_id = 0
    for class_index, class_id in enumerate(class_ids):
        class_dir = f"{class_id:03d}.Bird_{class_id}"
        classes.append(f"{class_id} {class_dir}")
        os.makedirs(os.path.join(folder, "images", class_dir), exist_ok=True)
        colour = np.array([255 * (class_index == c) for c in range(3)], np.float32)
        for i in range(train_per_class + test_per_class):
            image_id += 1
            noise = rng.normal(0, 40, (40 + 4 * i, 48, 3))
            pixels = np.clip(0.6 * colour + noise + 50, 0, 255).astype(np.uint8)
            name = f"{class_dir}/Bird_{class_id}_{i:04d}.jpg"
            Image.fromarray(pixels).save(os.path.join(folder, "images", name), quality=90)
            images.append(f"{image_id} {name}")
            labels.append(f"{image_id} {class_id}")
            split.append(f"{image_id} {int(i < train_per_class)}")
    for file_name, lines in (("images.txt", images), ("image_class_labels.txt", labels),
                             ("train_test_split.txt", split), ("classes.txt", classes)):
        with open(os.path.join(folder, file_name), "w") as f:
            f.write("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def tiny_cub(tmp_path):
    return write_tiny_cub(str(tmp_path / "CUB_200_2011"))


def requires_shared_cub():
    """Skip (not fail) when the shared CUB subset is not beside the repository."""
    if not os.path.isdir(os.path.join(SHARED_CUB, "images")):
        pytest.skip(f"shared CUB subset not found at {SHARED_CUB}")
    return SHARED_CUB
