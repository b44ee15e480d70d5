"""How loader workers read an image file: at reduced size when the checkpoint wants far fewer pixels than the
file holds, and optionally through a cache of images resized once.

* **Reduced-size decoding** (default): a JPEG whose shorter side is at least 4 x the checkpoint's resize size is
  decoded at libjpeg's smallest DCT scale (1/2, 1/4, 1/8) that still leaves the shorter side >= 2 x the resize
  size, so the exact resize that follows always shrinks by 2x or more. On the large photos of
  ``hymenoptera_data`` this changes the eval crop by at most 2-5 levels of 255 (mean 0.17-0.28) against a full
  decode, and a 2592 x 1944 photo decodes in 38 ms instead of 55 (``benchmarks/RESULTS.md``). Asking for
  the shorter side >= 1 x the resize size would save more but changed pixels by up to 88 levels (mean up to 5.9).
* **Resized cache** (``cache_dir``): each image is stored once, resized as the eval transform's first step does
  (shorter side to the resize size; ``squash``: both sides), as raw uint8 pixels; later epochs read those instead
  of decoding the file. The eval transform gives the same pixels as without the cache (its resize is then the
  identity); training crops are taken from the resized image, so small random crops have less detail than from
  a full-size original (``squash`` checkpoints: from the squashed image, as their evaluation sees it). Entries are
  keyed by the file (path, size, modification time) and the resize settings:
  any change is a miss. Size: ``resize x resize x aspect x 3`` bytes per image (256 px, 4:3: 262 KB).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from transfer_lit.data.decode import BadImageError, load_image
from transfer_lit.preprocessing.images import ImagePreprocessing, build_resize

_FORMAT_VERSION = 1


@dataclass(frozen=True)
class ImageReader:
    """Reads a path into an RGB image, as :func:`~transfer_lit.data.decode.load_image` does (picklable, for workers).

    Args:
        preprocessing: the checkpoint's preprocessing (its resize size sets both the decode size and the cache).
        reduced_decode: decode large JPEGs at a reduced DCT scale (see the module docstring).
        cache_dir: folder of the resized cache; ``None`` reads every file every time.
    """

    preprocessing: ImagePreprocessing
    reduced_decode: bool = True
    cache_dir: str | None = None

    @property
    def min_side(self) -> int | None:
        """The shorter side a reduced decode keeps at least (``None``: full decode)."""
        return 2 * self.preprocessing.resize_size if self.reduced_decode else None

    def describe(self) -> str:
        """What decides the pixels it returns, for cache keys (``full``, ``reduced>=512``, ``+resized256...``)."""
        decode = "full" if self.min_side is None else f"reduced>={self.min_side}"
        p = self.preprocessing
        return decode + ("" if self.cache_dir is None else f"+resized{p.resize_size}-{p.interpolation}-{p.crop_mode}")

    def __call__(self, path: str) -> Image.Image | torch.Tensor:
        """The image: a PIL image read from the file, or (``cache_dir``) a uint8 ``(3, H, W)`` tensor of its resize,
        on which torchvision's transforms run their uint8 tensor kernels (2x faster than PIL for the training crop
        here; the eval crop is the same either way, as its resize is then the identity)."""
        if self.cache_dir is None:
            return load_image(path, min_side=self.min_side)
        file = self.entry(path)
        try:
            pixels = np.load(file, allow_pickle=False)
        except (FileNotFoundError, ValueError, OSError, EOFError):  # a miss, or a damaged entry: write it again
            pixels = np.array(build_resize(self.preprocessing)(load_image(path, min_side=self.min_side)))
            file.parent.mkdir(parents=True, exist_ok=True)
            handle, temp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
            with os.fdopen(handle, "wb") as f:
                np.save(f, pixels, allow_pickle=False)
            os.replace(temp, file)  # atomic: writers of the same entry (workers, nodes) never leave half of one
        return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)

    def entry(self, path: str) -> Path:
        """Where the resized image of ``path`` is cached (:class:`BadImageError` when the file is gone)."""
        try:
            stat = os.stat(path)
        except OSError as error:  # what load_image says of it, so that bad_images='skip' still skips it
            raise BadImageError(path, f"{type(error).__name__}: {error.strerror}") from error
        p = self.preprocessing
        identity = (f"{_FORMAT_VERSION}\0{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\0{p.resize_size}"
                    f"\0{p.interpolation}\0{p.crop_mode}\0{self.min_side}")
        key = hashlib.sha256(identity.encode()).hexdigest()
        assert self.cache_dir is not None
        return Path(self.cache_dir).expanduser() / key[:2] / f"{key[2:34]}.npy"


def default_num_workers(devices: int = 1, cuda: bool | None = None) -> int:
    """Loader workers per training process: its share of the cores, keeping one for the process itself.

    At most 8 when training runs on the CPU (workers take cores from the model), 16 with CUDA: decoding
    and cropping a photo takes a core ~6 ms (150-175 images/s per worker measured on full-size JPEGs,
    ``benchmarks/input_pipeline.py``), so one GPU training at thousands of images/s needs every core it has.

    Args:
        devices: training processes on this machine (``trainer.num_devices``).
        cuda: whether training runs on CUDA (default: whether CUDA is available).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cap = 16 if (torch.cuda.is_available() if cuda is None else cuda) else 8
    return max(0, min(cap, cores // max(1, devices) - 1))
