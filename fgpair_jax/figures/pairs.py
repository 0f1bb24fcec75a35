"""pairs.png: each test image beside the two images of its synthesized pair (fgpair)."""
import numpy as np

from fgpair_jax.figures.images import image_grid, save, step_text, wrapped

LOOK_FOR = ("What to look for: x_a and x_b should show the same object and differ only in the details the "
            "encoder is asked to ignore (the masked, non-discriminative dimensions). 'contrast' = mean |x_b - x_a| "
            "/ mean |x_i - x_j| over different real images: 0 = the same image twice, 1 = as different as two photos.")


def save_pair_grid(images: np.ndarray, pair_a: np.ndarray, pair_b: np.ndarray, path: str,
                   titles=("image", "x_a = d(h)", "x_b = d(h') (perturbed)"), title: str = "",
                   row_notes=None, step=None, look_for: str = "") -> None:
    """One row per image: the image and the two images of its synthesized pair ([B, S, S, 3] uint8 each),
    side by side, under `title` (e.g. the run's variant, `fgpair.variant_text`) and the step, with `row_notes`
    ([B] strings, e.g. each pair's contrast) beside each row and `look_for` (e.g. `LOOK_FOR`) as the caption."""
    heading = f"Synthesized pairs{step_text(step)}" + (f"\n{title}" if title else "")
    fig, axes = image_grid(len(images), 3, 1.9, 1.7, title=wrapped(heading, 62),
                           note=wrapped(look_for, 80) if look_for else "",
                           title_size=9)
    for i, triplet in enumerate(zip(images, pair_a, pair_b)):
        for j, picture in enumerate(triplet):
            axes[i, j].imshow(picture)
            if i == 0:
                axes[i, j].set_title(titles[j], fontsize=8)
        if row_notes is not None:
            axes[i, 2].set_xlabel(row_notes[i], fontsize=8)
    save(fig, path)
