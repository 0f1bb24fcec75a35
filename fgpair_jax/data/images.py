"""Image hygiene shared by every data set's build: finding listed files on disk, checking and converting them.

No TFDS here (it imports in seconds): `run_config` checks `max_image_pixels` through this module.

Image hygiene happens once, at build time: every image is fully decoded; valid RGB JPEGs are stored
byte-for-byte, anything else (greyscale, CMYK, RGBA, PNG under a .jpg name, ...) is converted to an RGB
JPEG. Files that cannot be stored are skipped and reported as what they are: "missing" (no such file, even
across Unicode normal forms), "undecodable" (not a complete image) and "too large" (more pixels than
`max_image_pixels`; default Pillow's decompression-bomb limit). The decode is strict even where PIL has been
told to accept truncated files. Nothing undecodable can reach training.

Names are matched to the files part by part, exactly first, then across Unicode normal forms (NFC/NFD): a
folder prepared or unzipped on macOS stores 'é' as 'e' + U+0301, other bytes on Linux. Each folder is listed
once per build (`FolderListing`), so the lookup stays linear in the number of names. A name found only in
another letter case ('.JPG' on disk for '.jpg') stays missing; the build's warning says so.

Large images: readers decode with Pillow in fresh processes, which refuse more than 2 x
`PIL.Image.MAX_IMAGE_PIXELS` and warn above it. An image accepted above `STORED_MAX_PIXELS` (possible once
`max_image_pixels` is raised deliberately) is therefore stored downscaled to fit, and reported.

Smaller stored copies (`config.data.stored_short_side`, a build option): each image whose shorter side is
longer is stored resized to that shorter side (aspect kept; Lanczos, re-encoded as quality-95 JPEG; never
enlarged). Decoding and cropping then cost the host less per image, at the price of the detail above that
resolution: keep it at least 8/7 of the training size (256 for 224 px), as ImageNet pipelines do.
"""

from __future__ import annotations

import contextlib
import io
import os
import typing
import unicodedata

from PIL import Image, ImageFile

from fgpair_jax.errors import ConfigError

_REENCODE_JPEG_QUALITY = 95
MISSING, UNDECODABLE, TOO_LARGE = "missing", "undecodable", "too large"
SKIP_REASONS = (MISSING, UNDECODABLE, TOO_LARGE)
STORED_MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's default (about 89 million): readers decode this quietly


class UnreadableImage(Exception):
    """A listed image that cannot be stored; `reason` is one of SKIP_REASONS, `detail` says more."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class StoredJpeg(typing.NamedTuple):
    """What a build stores for one image: RGB JPEG `data`, whether it was `downscaled` to Pillow's pixel
    limit, and `scale`, the stored size over the original's (1.0 unless downscaled or stored smaller:
    boxes in original pixels are multiplied by it)."""

    data: bytes
    downscaled: bool
    scale: float
    width: int  # of the stored image, pixels
    height: int


def find_image(images_dir: str, file_name: str, listing: FolderListing | None = None) -> str | None:
    """The path on disk of `file_name` ('/'-separated, relative to `images_dir`), or None if there is none.

    Each part is matched exactly first, then across Unicode normal forms (NFC/NFD, see the module docstring).
    Pass one `FolderListing` for many lookups: each folder is then listed once, not once per name.
    """
    listing = FolderListing() if listing is None else listing
    path = images_dir
    for part in file_name.split("/"):
        path = listing.entry(path, part)
        if path is None:
            return None
    return path


class FolderListing:
    """The entries of folders, each listed and normalised once, for looking up many names.

    A name that is not spelt on disk exactly as listed (another Unicode normal form, or no such file at all)
    needs the folder's entries; listing the folder again for each such name made a build quadratic in the
    folder's size (8,000 names in one folder: over a minute). Make one per build: it does not see files that
    appear later.
    """

    def __init__(self):
        self._by_form: dict[str, dict[str, str] | None] = {}  # folder -> {NFC name: entry}, None: not a folder
        self._by_case: dict[str, dict[str, str]] = {}  # folder -> {casefolded NFC name: entry}

    def _entries(self, folder: str) -> dict[str, str] | None:
        if folder not in self._by_form:
            try:
                entries = sorted(os.listdir(folder))
            except OSError:  # `folder` is missing or not a folder
                self._by_form[folder] = None
            else:
                by_form: dict[str, str] = {}
                for entry in entries:  # sorted: of several entries equal in NFC, the first one wins
                    by_form.setdefault(unicodedata.normalize("NFC", entry), entry)
                self._by_form[folder] = by_form
        return self._by_form[folder]

    def entry(self, folder: str, name: str) -> str | None:
        """`folder/name` if it exists, else the entry of `folder` equal to `name` in NFC (first in sorted order)."""
        exact = os.path.join(folder, name)
        if os.path.lexists(exact):
            return exact
        match = (self._entries(folder) or {}).get(unicodedata.normalize("NFC", name))
        return None if match is None else os.path.join(folder, match)

    def other_case(self, images_dir: str, file_name: str) -> str | None:
        """For a name `find_image` does not find: the file on disk it names in another letter case (the name
        relative to `images_dir`, e.g. 'a/B.JPG' for 'a/b.jpg'), or None. A hint only: names never match so."""
        path, parts = images_dir, []
        for part in file_name.split("/"):
            found = self.entry(path, part)
            if found is None:
                if path not in self._by_case:
                    by_case: dict[str, str] = {}
                    for form, entry in sorted((self._entries(path) or {}).items(), key=lambda item: item[1]):
                        by_case.setdefault(form.casefold(), entry)
                    self._by_case[path] = by_case
                entry = self._by_case[path].get(unicodedata.normalize("NFC", part).casefold())
                if entry is None:
                    return None
                found = os.path.join(path, entry)
            parts.append(os.path.basename(found))
            path = found
        return "/".join(parts)



def pixel_limit(max_image_pixels: int | None) -> int | None:
    """The most pixels an image may have: `max_image_pixels`, or for None Pillow's own limit, 2 x
    `PIL.Image.MAX_IMAGE_PIXELS` (above it Pillow raises DecompressionBombError; None there means no limit)."""
    if max_image_pixels is not None:
        return max_image_pixels
    return None if Image.MAX_IMAGE_PIXELS is None else 2 * Image.MAX_IMAGE_PIXELS


@contextlib.contextmanager
def _strict_pillow():
    """A strict decode whatever Pillow's globals say, and no pixel check of Pillow's own (`load_rgb_jpeg`
    applies the limit). TFDS sets LOAD_TRUNCATED_IMAGES=True when it draws a thumbnail (other libraries do
    too): a truncated JPEG accepted here would be stored byte-for-byte and fail mid-run in a fresh process."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
    ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = False, None
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = saved


def load_rgb_jpeg(path: str, max_image_pixels: int | None = None, short_side: int = 0) -> StoredJpeg:
    """The `StoredJpeg` to store for the image file at `path`.

    The original bytes when already an RGB JPEG of at most STORED_MAX_PIXELS pixels whose shorter side is at
    most `short_side` (0: any); otherwise the fully decoded image converted to RGB (downscaled to
    STORED_MAX_PIXELS, then to `short_side`: `stored_size`) and re-encoded. Raises
    `UnreadableImage` with reason MISSING (no file), TOO_LARGE (more than `pixel_limit(max_image_pixels)`
    pixels; checked from the header, before decoding) or UNDECODABLE (anything Pillow cannot fully decode).
    Pillow's own check is off meanwhile: this one applies its criterion (pixels > 2 x MAX_IMAGE_PIXELS, its
    DecompressionBombError) by default, and a deliberately raised limit instead.
    """
    limit = pixel_limit(max_image_pixels)
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise UnreadableImage(MISSING) from None
    except OSError as error:  # a folder, no permission, an I/O error
        raise UnreadableImage(UNDECODABLE, error.strerror or type(error).__name__) from None
    with _strict_pillow():
        try:
            with Image.open(io.BytesIO(raw)) as image:
                if limit is not None and image.width * image.height > limit:
                    raise UnreadableImage(TOO_LARGE, f"{image.width}x{image.height} pixels, above {limit}")
                image.load()  # A full decode: truncated files fail here, not mid-training.
                return _stored_jpeg(raw, image, short_side)
        except (OSError, SyntaxError, ValueError) as error:
            raise UnreadableImage(UNDECODABLE, str(error) or type(error).__name__) from None


def stored_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) of an image stored with its shorter side at most `short_side` pixels (0: as it is):
    the shorter side becomes `short_side`, the longer one keeps the aspect (rounded, at least 1). Never
    larger than the image."""
    shorter = min(width, height)
    if short_side <= 0 or shorter <= short_side:
        return width, height
    ratio = short_side / shorter
    if width <= height:
        return short_side, max(1, int(round(height * ratio)))
    return max(1, int(round(width * ratio))), short_side


def _stored_jpeg(raw: bytes, image: Image.Image, short_side: int = 0) -> StoredJpeg:
    """`raw` if it is an RGB JPEG readers can decode quietly, at most `short_side` on its shorter side, else
    `image` as one (downscaled to Pillow's limit, then to `short_side`)."""
    pixels = image.width * image.height
    smaller = stored_size(image.width, image.height, short_side) != (image.width, image.height)
    if image.format == "JPEG" and image.mode == "RGB" and pixels <= STORED_MAX_PIXELS and not smaller:
        return StoredJpeg(raw, False, 1.0, image.width, image.height)
    rgb = image.convert("RGB")
    downscaled = pixels > STORED_MAX_PIXELS
    scale = 1.0
    if downscaled:
        scale = (STORED_MAX_PIXELS / pixels) ** 0.5
        rgb = rgb.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))),
                         Image.Resampling.LANCZOS)
    size = stored_size(rgb.width, rgb.height, short_side)
    if size != rgb.size:
        scale *= min(size) / min(rgb.size)
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=_REENCODE_JPEG_QUALITY)
    return StoredJpeg(buffer.getvalue(), downscaled, scale, rgb.width, rgb.height)


def check_stored_short_side(short_side, image_size: int) -> int:
    """`short_side` if it is 0 (images stored as they are) or an integer of at least `image_size` (the
    training resolution), else a one-line `ConfigError`: smaller copies would enlarge every crop."""
    is_integer = isinstance(short_side, int) and not isinstance(short_side, bool)
    if is_integer and (short_side == 0 or short_side >= image_size):
        return short_side
    raise ConfigError(f"config.data.stored_short_side={short_side!r}: use 0 (images as they are) or a size of at "
                      f"least config.data.image_size={image_size}, e.g. {int(round(image_size * 8 / 7))} "
                      f"(ImageNet's 256 for 224).")


def as_rgb_jpeg_bytes(path: str, max_image_pixels: int | None = None) -> bytes | None:
    """The bytes `load_rgb_jpeg` would store for `path`, or None if it cannot be stored (for any reason)."""
    try:
        return load_rgb_jpeg(path, max_image_pixels).data
    except UnreadableImage:
        return None


def check_max_image_pixels(max_image_pixels: int | None) -> int | None:
    """`max_image_pixels` if it is None or a positive integer, else a one-line ValueError."""
    is_integer = isinstance(max_image_pixels, int) and not isinstance(max_image_pixels, bool)
    if max_image_pixels is None or (is_integer and max_image_pixels > 0):
        return max_image_pixels
    raise ConfigError(f"config.data.max_image_pixels={max_image_pixels!r}: use a positive integer, or None for "
                     f"Pillow's decompression-bomb limit.")


