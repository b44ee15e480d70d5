"""JPEG image data that Pillow decodes without a word although they are damaged.

An end-of-image marker in the middle of the scan data (a download or copy cut short, then "repaired"), or
zeroed / overwritten scan data: Pillow's decoder fills what is missing with flat gray (or noise) and raises
nothing, so the picture would be trained on. libjpeg-turbo reports these as warnings; simplejpeg turns
them into errors. :func:`decode_jpeg` decodes YCbCr and grayscale JPEGs once that way, to exactly the pixels
Pillow gives (the same library, integer IDCT and fancy upsampling, the same 1/2, 1/4, 1/8 DCT scales of
``draft``); :func:`jpeg_damage` checks any JPEG (CMYK included) at 1/8 scale.
"""

from __future__ import annotations

import math
import re

import simplejpeg
from PIL import Image

__all__ = ["JPEGDamage", "decode_jpeg", "draft_factor", "draft_size", "jpeg_damage"]

# libjpeg warnings that mean image data are missing or undecodable (the decoder filled blocks with gray or
# garbage); others (unknown JFIF revision, a few padding bytes before a marker) leave the pixels intact.
_DAMAGED = ("premature end", "bad huffman code", "bad arithmetic code", "instead of rst")
# "N extraneous bytes before marker": encoders pad with a byte or two; garbled (zeroed, overwritten) scan data
# instead decode to the last block long before the data end, leaving hundreds or thousands of bytes unread.
_EXTRANEOUS = re.compile(r"(\d+) extraneous bytes")
_MOST_PADDING = 64


class JPEGDamage(ValueError):
    """libjpeg's warning about damaged image data (the message is libjpeg's own)."""


def jpeg_damage(data: bytes) -> str | None:
    """What libjpeg-turbo reports about damaged image data in a JPEG file's bytes, or ``None``.

    Args:
        data: the file's bytes.

    Returns:
        libjpeg's warning when data are missing or undecodable ("Corrupt JPEG data: premature end of data
        segment"; more than 64 "extraneous bytes before marker": the scan data decoded to the last block long
        before their end), else ``None`` (harmless warnings included).
    """
    try:
        colorspace = "CMYK" if simplejpeg.decode_jpeg_header(data)[2] in ("CMYK", "YCCK") else "GRAY"
        simplejpeg.decode_jpeg(data, colorspace=colorspace, min_factor=8, min_height=1, min_width=1, strict=True)
    except ValueError as warning:
        return _damage(str(warning))
    return None


def decode_jpeg(data: bytes, factor: int = 1) -> Image.Image | None:
    """A YCbCr or grayscale JPEG decoded into RGB at 1 / ``factor`` scale, with libjpeg's warnings as errors.

    Args:
        data: the file's bytes.
        factor: DCT scale divisor, 1, 2, 4 or 8 (see :func:`draft_factor`).

    Returns:
        The RGB image, or ``None`` to leave the file to Pillow: other color spaces (CMYK, YCCK, RGB), errors
        Pillow reports in its own words, harmless warnings.

    Raises:
        JPEGDamage: the image data are damaged (libjpeg's message).
    """
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace not in ("YCbCr", "Gray"):
        return None
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True, min_factor=factor,
                                        min_width=-(-width // factor), min_height=-(-height // factor))
    except ValueError as warning:
        damage = _damage(str(warning))
        if damage is not None:
            raise JPEGDamage(damage) from None
        return None
    return Image.fromarray(pixels, "RGB")


def draft_size(width: int, height: int, min_side: int | None) -> tuple[int, int] | None:
    """The size to ask Pillow's ``draft`` for so that the shorter side stays >= ``min_side`` (None: full size)."""
    if min_side is None or min(width, height) < 2 * min_side:
        return None
    scale = min_side / min(width, height)
    return math.ceil(width * scale), math.ceil(height * scale)


def draft_factor(width: int, height: int, size: tuple[int, int] | None) -> int:
    """The DCT scale divisor (1, 2, 4, 8) Pillow's ``draft`` picks for ``size``: the largest within both ratios."""
    if size is None:
        return 1
    ratio = min(width // size[0], height // size[1])
    return next(factor for factor in (8, 4, 2, 1) if ratio >= factor)


def _damage(message: str) -> str | None:
    """libjpeg's message if it means damaged image data, else ``None``."""
    extraneous = _EXTRANEOUS.search(message)
    if extraneous is not None:
        return message if int(extraneous.group(1)) > _MOST_PADDING else None
    return message if any(sign in message.lower() for sign in _DAMAGED) else None
