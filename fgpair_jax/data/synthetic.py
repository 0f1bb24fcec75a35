"""A tiny CUB_200_2011-layout folder of synthetic images: for tests, smoke runs and the kill harness.

The real data set cannot be shipped or downloaded; this writes the same five index files and an
`images/` tree, with class ids that have gaps like the shared subset's, in well under a second.
"""
import os

import numpy as np
from PIL import Image


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
