"""Reading image files into 8-bit RGB, and finding the files that cannot be read.

Every image reaches the model through :func:`load_image`: it decodes the whole file (so a truncated
JPEG fails here, not silently in a dataloader worker), applies the EXIF orientation, and converts
every Pillow mode to 8-bit RGB without the classic mistakes (garbage colors under transparent
pixels, 16-bit images clipped to white). :func:`scan_images` checks a whole dataset up front and
reports every bad file at once; :class:`ImageDataset` serves ``(image, label)`` samples through it.

Truncated files are detected through Pillow's default ``ImageFile.LOAD_TRUNCATED_IMAGES = False``;
this module never changes that flag (nor ``Image.MAX_IMAGE_PIXELS``), so if your own code sets it
to True, truncated files are padded with gray by Pillow and pass. A JPEG whose image data stop early
(an end-of-image marker mid-scan: Pillow decodes the rest as flat gray without a word) or hold
undecodable entropy-coded data is refused: YCbCr and grayscale JPEGs are decoded by libjpeg-turbo with
its warnings as errors, to the pixels Pillow gives (:mod:`transfer_lit.data.jpeg`); other JPEGs are
decoded by Pillow and checked that way.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, get_args

import torch
from PIL import Image, ImageOps, TiffImagePlugin, UnidentifiedImageError
from torch.utils.data import Dataset

from transfer_lit.data.jpeg import JPEGDamage, decode_jpeg, draft_factor, draft_size, jpeg_damage
from transfer_lit.data.order import seeded

__all__ = [
    "BAD_IMAGE_POLICIES",
    "IMAGE_EXTENSIONS",
    "BadImageError",
    "BadImagePolicy",
    "ImageDataset",
    "Sample",
    "collate_skipping_bad",
    "jpeg_damage",
    "load_image",
    "scan_images",
]

# Same set as torchvision's ImageFolder (IMG_EXTENSIONS). ".gif" is left out, as ImageFolder does,
# although load_image can read a GIF's first frame.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

# What a dataset does with a file load_image rejects: raise at once, or leave it out (and log it).
BadImagePolicy = Literal["error", "skip"]
BAD_IMAGE_POLICIES: tuple[BadImagePolicy, ...] = get_args(BadImagePolicy)

# Equal to 2 * Pillow's default Image.MAX_IMAGE_PIXELS, the size at which Image.open itself refuses.
DEFAULT_MAX_PIXELS = 178_956_970

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose applies it).
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}
_PHOTOMETRIC = {0: "WhiteIsZero", 1: "BlackIsZero", 2: "RGB", 3: "palette", 4: "mask", 5: "CMYK", 6: "YCbCr",
                8: "CIELab", 9: "ICCLab", 10: "ITULab", 32844: "LogL", 32845: "LogLuv"}
_16BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# What Pillow raises for damaged files: decoders raise OSError/SyntaxError/ValueError, some
# plugins also EOFError or struct.error on short headers. UnidentifiedImageError is an OSError.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)


class BadImageError(ValueError):
    """A file that cannot be read as an image.

    Args:
        path: The file.
        reason: Why it cannot be read, in words.
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"cannot read image '{self.path}': {reason}")

    def __reduce__(self) -> tuple[type[BadImageError], tuple[str, str]]:
        # The default pickling would call BadImageError(message) and fail; keep path and reason.
        return type(self), (self.path, self.reason)


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None
               ) -> Image.Image:
    """Open and fully decode an image file, apply its EXIF orientation and convert it to 8-bit RGB.

    Transparent pixels (RGBA, LA, palette or grayscale with a transparent color) are composited onto
    white; 16-bit grayscale is scaled to 8 bit (divided by 257), float images are clipped to [0, 255].

    Args:
        path: The image file.
        max_pixels: Largest width * height accepted, checked from the header before decoding.
        min_side: decode a JPEG at reduced size: the smallest of libjpeg's DCT scales (1/2, 1/4, 1/8) that
            still leaves its shorter side >= ``min_side`` (``None``: full size; other formats: always full).

    Returns:
        A decoded RGB image, independent of the file.

    Raises:
        BadImageError: The file is missing, not an image, truncated or corrupt, or larger than max_pixels.
    """
    _check_max_pixels(max_pixels)
    with warnings.catch_warnings():
        # We enforce max_pixels ourselves; Pillow would warn for every image above MAX_IMAGE_PIXELS.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return _load(os.fspath(path), max_pixels, min_side)


def scan_images(
    paths: Sequence[str | os.PathLike], max_pixels: int = DEFAULT_MAX_PIXELS, num_workers: int = 0
) -> list[BadImageError]:
    """Try to decode every file and return all failures at once.

    Args:
        paths: The files to check.
        max_pixels: Passed to :func:`load_image`.
        num_workers: Threads decoding in parallel (Pillow releases the GIL while decoding); 0 decodes
            in the calling thread.

    Returns:
        One BadImageError per unreadable file, in the order of ``paths``; empty if all are readable.
    """
    _check_max_pixels(max_pixels)
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0 (0 = no threads), got {num_workers}")

    def check(path: str | os.PathLike) -> BadImageError | None:
        try:
            _load(os.fspath(path), max_pixels)
        except BadImageError as error:
            return error
        return None

    # One filter for the whole scan, set in this thread: catch_warnings inside worker threads would race.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if num_workers == 0:
            results = [check(path) for path in paths]
        else:
            with ThreadPoolExecutor(max_workers=num_workers) as pool:
                results = list(pool.map(check, paths))
    return [error for error in results if error is not None]


def _check_max_pixels(max_pixels: int) -> None:
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive number of pixels, got {max_pixels}")


def _load(path: str, max_pixels: int, min_side: int | None = None) -> Image.Image:
    try:
        with open(path, "rb") as file:
            data = file.read()
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise BadImageError(
                    path,
                    f"{width}x{height} = {width * height} pixels is more than the limit of {max_pixels}; "
                    "pass a larger max_pixels to read it",
                )
            # Pillow picks the smallest DCT scale whose size is >= the one asked for, in both dimensions.
            draft = draft_size(width, height, min_side) if img.format == "JPEG" else None
            decoded = decode_jpeg(data, draft_factor(width, height, draft)) if img.format in ("JPEG", "MPO") else None
            if decoded is None:
                if draft is not None:
                    img.draft(img.mode, draft)
                img.load()
                damage = jpeg_damage(data) if img.format in ("JPEG", "MPO") else None
                if damage is not None:
                    raise JPEGDamage(damage)
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
            if decoded is not None:
                return decoded.transpose(_TRANSPOSE[orientation]) if orientation in _TRANSPOSE else decoded
            if orientation != 1:  # exif_transpose copies the image even when upright
                img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except UnidentifiedImageError:
        raise BadImageError(path, _unidentified(data)) from None
    except Image.DecompressionBombError as error:
        # Raised by Image.open itself, before max_pixels can be checked, above 2 * Image.MAX_IMAGE_PIXELS.
        raise BadImageError(
            path,
            f"{error} To read it, raise max_pixels and also PIL.Image.MAX_IMAGE_PIXELS (Pillow refuses above twice it)",
        ) from error
    except BadImageError:
        raise
    except JPEGDamage as damage:
        raise BadImageError(path, f"damaged JPEG data ({damage}): part of the picture would be decoded as flat gray "
                                  "or noise") from None
    except _DECODE_ERRORS as error:
        raise BadImageError(path, f"{type(error).__name__}: {error}") from error


def _unidentified(data: bytes) -> str:
    """Why Pillow opened no format: a TIFF whose pixel layout it cannot decode is named as such."""
    if data[:4] not in (b"II*\x00", b"MM\x00*"):
        return "not an image file (Pillow cannot identify its format)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's "Corrupt EXIF data" for a short file
            directory = TiffImagePlugin.ImageFileDirectory_v2(data[:8])  # struct.error under 8 bytes
            (file := io.BytesIO(data)).seek(directory.next)
            directory.load(file)
            tags: dict[int, Any] = dict(directory)
    except _DECODE_ERRORS:
        tags = {}
    photometric, bits = tags.get(262), tags.get(258)
    if photometric is None or bits is None:
        return "a TIFF whose header is cut short or damaged (Pillow cannot read its pixel layout)"
    depth = f"{bits[0]}" if len(set(bits)) == 1 else "/".join(map(str, bits))
    layout = f"photometric {photometric} ({_PHOTOMETRIC.get(photometric, 'unknown')}), {depth} bits per sample"
    return (f"a TIFF whose pixel layout Pillow cannot decode ({layout}); save it as 8-bit RGB, 8- or 16-bit "
            "grayscale, or CMYK")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        # Color values under alpha 0 are arbitrary; dropping alpha would show them.
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode in _16BIT_MODES:
        # convert("L") would clip 16-bit values to 255 (a white image); scale instead.
        return img.convert("I").point(lambda value: value / 257).convert("L").convert("RGB")
    if img.mode == "F":
        return img.convert("L").convert("RGB")  # Pillow's F -> L clips to [0, 255]
    if img.mode != "RGB":
        return img.convert("RGB")  # L, 1, P, CMYK (Adobe inversion handled by the JPEG plugin), YCbCr
    return img


Sample = tuple[str, int]


class ImageDataset(Dataset):
    """``(path, label)`` samples decoded with :func:`~transfer_lit.data.decode.load_image`.

    Args:
        samples: file paths and integer labels (label -1 for unlabelled prediction inputs).
        transform: applied to the RGB PIL image.
        bad_images: ``error`` raises naming the file; ``skip`` returns ``None`` (dropped by the collate) and
            marks the sample in ``skipped``, a flag per sample in shared memory that loader workers write to.
        return_path: yield the path instead of the label (for ``predict``).
        loader: reads a path into an RGB image, PIL or a uint8 ``(3, H, W)`` tensor (default :func:`load_image`).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable[[Any], torch.Tensor],
        bad_images: BadImagePolicy = "error",
        return_path: bool = False,
        loader: Callable[[str], Image.Image | torch.Tensor] = load_image,
    ) -> None:
        self.samples = list(samples)
        self.loader = loader
        self.transform = transform
        self.bad_images = bad_images
        self.return_path = return_path
        self.skipped = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()

    def skipped_paths(self) -> list[str]:
        """Files the ``skip`` policy left out so far (in this process and its loader workers)."""
        return [self.samples[i][0] for i in self.skipped.nonzero().flatten().tolist()]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, Any] | None:
        """Sample ``index``; given ``(index, seed)`` (:class:`~transfer_lit.data.order.EpochShuffle`), its random
        transform runs under torch's, Python's and NumPy's RNGs seeded with ``seed``."""
        index, seed = index if isinstance(index, tuple) else (index, None)
        path, label = self.samples[index]
        try:
            image = self.loader(path)
        except BadImageError:
            if self.bad_images == "skip":
                self.skipped[index] = True
                return None
            raise
        with seeded(seed):
            return self.transform(image), (path if self.return_path else label)


def collate_skipping_bad(batch: list[Any]) -> Any:
    """Default collate after dropping samples the ``skip`` policy replaced by ``None``."""
    kept = [item for item in batch if item is not None]
    if not kept:
        return None
    return torch.utils.data.default_collate(kept)
