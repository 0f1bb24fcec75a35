"""gradcam.png: test images above their Grad-CAM maps of the SSL loss, with a colour bar."""
import numpy as np
from matplotlib import cm, colors

from fgpair_jax.figures.images import image_grid, save, step_text, wrapped

CMAP = "jet"
LOOK_FOR = ("What to look for: warm colours (the locations whose features the SSL loss depends on most) "
            "should sit on the object (a bird's head, breast, wing pattern), not on the background.")


def save_gradcam_overlays(images: np.ndarray, cams: np.ndarray, path: str, columns: int = 8, step=None,
                          run: str = "") -> None:
    """Each image ([B, S, S, 3] uint8) above itself overlaid with its Grad-CAM map ([B, S, S] float in
    [0, 1], each map divided by its maximum: `gradcam.resized_cam`), a colour bar of that scale, the
    step and what to look for. `run` (e.g. 'fgpair / resnet18') opens the title."""
    columns = max(1, min(columns, len(images)))
    title = f"{run + ': ' if run else ''}test images and Grad-CAM of the SSL loss{step_text(step)}"
    rows = 2 * int(np.ceil(len(images) / columns))
    fig, axes = image_grid(rows, columns, 1.6, 1.6, title=wrapped(title, 15 * columns),
                           note=wrapped(LOOK_FOR, 17 * columns))
    fig.subplots_adjust(right=0.9)
    for i, (image, cam) in enumerate(zip(images, cams)):
        row, col = 2 * (i // columns), i % columns
        axes[row, col].imshow(image)
        axes[row + 1, col].imshow(image)
        axes[row + 1, col].imshow(cam, cmap=CMAP, alpha=0.5, vmin=0, vmax=1)
        if col == 0:
            axes[row, col].set_ylabel("image", fontsize=8)
            axes[row + 1, col].set_ylabel("Grad-CAM", fontsize=8)
    bar = fig.colorbar(cm.ScalarMappable(colors.Normalize(0, 1), CMAP), ax=axes.ravel().tolist(),
                       fraction=0.025, pad=0.02)
    bar.set_label("Grad-CAM of the SSL loss,\neach map / its maximum", fontsize=8)
    save(fig, path)
