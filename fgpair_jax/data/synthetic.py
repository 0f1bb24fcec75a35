"""Tiny folders of synthetic images in each supported data set's official layout: for tests, smoke runs and
the kill harness.

The real data sets cannot be shipped or downloaded; these write the same index files and image trees
(CUB: with class ids that have gaps like the shared subset's; Cars: the devkit's .mat files; Aircraft: the
2013b text files; a class-per-folder tree), in well under a second. `write_tiny(name, folder)` picks one.
"""
import os

import numpy as np
from PIL import Image


def _tiny_image(rng, class_index: int, i: int) -> np.ndarray:
    """uint8 [40 + 4i, 48, 3]: the class's own dominant colour plus noise, so a model learns in a few steps."""
    colour = np.array([255 * (class_index % 3 == c) for c in range(3)], np.float32) * (1 + class_index // 3) / 2
    noise = rng.normal(0, 40, (40 + 4 * i, 48, 3))
    return np.clip(0.6 * colour + noise + 50, 0, 255).astype(np.uint8)


def write_tiny_cub(folder, class_ids=(2, 5, 9), train_per_class=6, test_per_class=3, seed=0, boxes=False):
    """A CUB_200_2011-layout folder with small coloured JPEGs; class ids have gaps like the subset's.

    Each class has its own dominant colour so that a model can learn something in a few steps. `boxes`: also
    the full release's bounding_boxes.txt (`<id> <x> <y> <width> <height>`), a box inset 4 px from each side.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    images, labels, split, classes = [], [], [], []
    image_id = 0
    box_lines = []
    for class_index, class_id in enumerate(class_ids):
        class_dir = f"{class_id:03d}.Bird_{class_id}"
        classes.append(f"{class_id} {class_dir}")
        os.makedirs(os.path.join(folder, "images", class_dir), exist_ok=True)
        for i in range(train_per_class + test_per_class):
            image_id += 1
            pixels = _tiny_image(rng, class_index, i)
            box_lines.append(f"{image_id} 4.0 4.0 {pixels.shape[1] - 8:.1f} {pixels.shape[0] - 8:.1f}")
            name = f"{class_dir}/Bird_{class_id}_{i:04d}.jpg"
            Image.fromarray(pixels).save(os.path.join(folder, "images", name), quality=90)
            images.append(f"{image_id} {name}")
            labels.append(f"{image_id} {class_id}")
            split.append(f"{image_id} {int(i < train_per_class)}")
    for file_name, lines in (("images.txt", images), ("image_class_labels.txt", labels),
                             ("train_test_split.txt", split), ("classes.txt", classes)):
        with open(os.path.join(folder, file_name), "w") as f:
            f.write("\n".join(lines) + "\n")
    if boxes:
        with open(os.path.join(folder, "bounding_boxes.txt"), "w") as f:
            f.write("\n".join(box_lines) + "\n")
    return folder


def write_tiny_image_folder(folder, num_classes=3, train_per_class=6, test_per_class=3, seed=0):
    """`train/<class>/*.jpg` and `test/<class>/*.jpg` (torchvision's ImageFolder layout, as LCR reads it)."""
    rng = np.random.default_rng(seed)
    for class_index in range(num_classes):
        for i in range(train_per_class + test_per_class):
            split = "train" if i < train_per_class else "test"
            class_dir = os.path.join(folder, split, f"class {class_index:02d}")
            os.makedirs(class_dir, exist_ok=True)
            Image.fromarray(_tiny_image(rng, class_index, i)).save(os.path.join(class_dir, f"{i:04d}.jpg"), quality=90)
    return folder


CARS_NAMES = ("AM General Hummer SUV 2000", "Ram C/V Cargo Van Minivan 2012", "smart fortwo Convertible 2012")


def write_tiny_cars(folder, class_names=CARS_NAMES, train_per_class=6, test_per_class=3, seed=0,
                    test_annos_in_devkit=False):
    """Stanford Cars as its authors distributed it: cars_train/, cars_test/, devkit/cars_meta.mat,
    devkit/cars_train_annos.mat and the labelled cars_test_annos_withlabels.mat (at the top, or in devkit/),
    with 1-based inclusive box corners inset 4 px; MATLAB-shaped structs as scipy.io.savemat writes them."""
    from scipy import io as scipy_io  # only the Cars writer needs it

    rng = np.random.default_rng(seed)
    fields = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
    annos = {"train": [], "test": []}
    for class_index in range(len(class_names)):
        for i in range(train_per_class + test_per_class):
            split = "train" if i < train_per_class else "test"
            pixels = _tiny_image(rng, class_index, i)
            fname = f"{len(annos[split]) + 1:05d}.jpg"
            os.makedirs(os.path.join(folder, f"cars_{split}"), exist_ok=True)
            Image.fromarray(pixels).save(os.path.join(folder, f"cars_{split}", fname), quality=90)
            height, width = pixels.shape[:2]
            annos[split].append((5, 5, width - 4, height - 4, class_index + 1, fname))

    def struct(rows):
        array = np.zeros((1, len(rows)), dtype=[(field, object) for field in fields])
        for column, row in enumerate(rows):
            for field, value in zip(fields, row):
                array[0, column][field] = np.array([[value]], np.uint16) if field != "fname" else np.array([value])
        return array

    os.makedirs(os.path.join(folder, "devkit"), exist_ok=True)
    names = np.empty((1, len(class_names)), object)
    names[0, :] = [np.array([name]) for name in class_names]
    scipy_io.savemat(os.path.join(folder, "devkit", "cars_meta.mat"), {"class_names": names})
    scipy_io.savemat(os.path.join(folder, "devkit", "cars_train_annos.mat"), {"annotations": struct(annos["train"])})
    test_dir = os.path.join(folder, "devkit") if test_annos_in_devkit else folder
    scipy_io.savemat(os.path.join(test_dir, "cars_test_annos_withlabels.mat"), {"annotations": struct(annos["test"])})
    return folder


AIRCRAFT_VARIANTS = ("707-320", "F/A-18", "Cessna 172")


def write_tiny_aircraft(folder, variants=AIRCRAFT_VARIANTS, per_split=3, seed=0):
    """FGVC-Aircraft 2013b: fgvc-aircraft-2013b/data/ with images/<7-digit id>.jpg, variants.txt,
    images_variant_{train,val,trainval,test}.txt and images_box.txt (1-based inclusive corners inset 4 px);
    each image carries a 20-px banner of its own colour at the bottom, like the real copyright banner."""
    rng = np.random.default_rng(seed)
    data = os.path.join(folder, "data")
    os.makedirs(os.path.join(data, "images"), exist_ok=True)
    lines = {"train": [], "val": [], "test": []}
    boxes = []
    image_id = 1000000
    for class_index, variant in enumerate(variants):
        for i in range(3 * per_split):
            split = ("train", "val", "test")[i // per_split]
            image_id += 1
            pixels = _tiny_image(rng, class_index, i)
            pixels = np.concatenate([pixels, np.full((20, pixels.shape[1], 3), 255, np.uint8)])
            Image.fromarray(pixels).save(os.path.join(data, "images", f"{image_id:07d}.jpg"), quality=90)
            lines[split].append(f"{image_id:07d} {variant}")
            boxes.append(f"{image_id:07d} 5 5 {pixels.shape[1] - 4} {pixels.shape[0] - 4}")
    lines["trainval"] = lines["train"] + lines["val"]
    for split, split_lines in lines.items():
        with open(os.path.join(data, f"images_variant_{split}.txt"), "w") as f:
            f.write("\n".join(split_lines) + "\n")
    with open(os.path.join(data, "variants.txt"), "w") as f:
        f.write("\n".join(variants) + "\n")
    with open(os.path.join(data, "images_box.txt"), "w") as f:
        f.write("\n".join(boxes) + "\n")
    return folder


WRITERS = {"cub": write_tiny_cub, "cars": write_tiny_cars, "aircraft": write_tiny_aircraft,
           "image_folder": write_tiny_image_folder}


def write_tiny(data_set: str, folder):
    """A tiny folder of `data_set` (a `sources.DATA_SETS` name) in its official layout; returns `folder`."""
    return WRITERS[data_set](folder)
