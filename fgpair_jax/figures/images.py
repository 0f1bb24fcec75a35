"""What every figure module shares: images back to uint8, a grid of image panels, coloured frames, saving."""
import textwrap

import numpy as np
from matplotlib.figure import Figure

from fgpair_jax.models import input_normalization

CORRECT, WRONG, QUERY = "#1a9641", "#d7191c", "#2b83ba"  # frame colours: same class, other class, the query


def to_uint8_image(normalized: np.ndarray, model_config) -> np.ndarray:
    """Encoder-space (normalised) float images [..., 3] -> displayable uint8 RGB of the same shape."""
    mean, std = (np.asarray(v) for v in input_normalization(model_config))
    return (np.clip(normalized * std + mean, 0.0, 1.0) * 255).round().astype(np.uint8)


def text_inches(text: str, fontsize: float) -> float:
    """The height in inches of `text`'s lines at `fontsize` points (line spacing 1.3)."""
    return (text.count("\n") + 1) * fontsize * 1.3 / 72 if text else 0.0


def image_grid(rows: int, columns: int, width: float, height: float, title: str = "", note: str = "",
               title_size: float = 10, note_size: float = 8):
    """(Figure, axes [rows, columns]) of `width` x `height`-inch image panels with their ticks hidden,
    `title` (already wrapped) above them and `note` (already wrapped: what to look for) below, with room
    made for both."""
    top_inches = text_inches(title, title_size) + 0.55  # and room for the first row's panel titles
    bottom_inches = text_inches(note, note_size) + 0.4  # and room for a label under the last row
    fig = Figure(figsize=(width * columns, height * rows + top_inches + bottom_inches))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    total = fig.get_figheight()
    fig.subplots_adjust(left=0.02, right=0.98, top=1 - top_inches / total, bottom=bottom_inches / total,
                        wspace=0.08, hspace=0.35)
    if title:
        fig.suptitle(title, fontsize=title_size, y=1 - 0.05 / total, va="top")
    if note:
        fig.text(0.5, 0.05 / total, note, ha="center", va="bottom", fontsize=note_size, color="0.25")
    return fig, axes


def frame(ax, colour: str, width: float = 4.0) -> None:
    """A coloured frame around an image panel (retrieval: green same class, red another class)."""
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_edgecolor(colour)
        spine.set_linewidth(width)


def wrapped(text: str, characters: int) -> str:
    """`text` wrapped to lines of at most `characters` (titles and captions that fit their figure)."""
    return "\n".join(textwrap.fill(paragraph, characters) for paragraph in text.split("\n"))


def save(fig, path: str, dpi: int = 100) -> None:
    fig.savefig(path, dpi=dpi)


def step_text(step) -> str:
    """' at step 1234' or '' when the step is unknown."""
    return "" if step is None else f" at step {int(step)}"
