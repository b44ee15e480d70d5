"""Pretrained weight files: where they are cached, whether the network can fetch them, and the error when
neither holds. Offline, a missing file fails at once with its name and where to put it (never a hang)."""

from __future__ import annotations

import difflib
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

OFFLINE_ENV = ("TRANSFER_LIT_OFFLINE", "HF_HUB_OFFLINE")


class WeightsNotAvailableError(FileNotFoundError):
    """A pretrained weight file is neither in the local cache nor downloadable."""


def online(url: str, timeout: float = 3.0) -> bool:
    """Whether ``url``'s host answers on port 443 within ``timeout`` seconds (False when an offline variable is set)."""
    if any(os.environ.get(var, "") not in ("", "0") for var in OFFLINE_ENV):
        return False
    host = urlparse(url).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def is_path(weights: str) -> bool:
    """Whether a ``weights`` config value names a local file rather than a weight set."""
    suffixes = (".pth", ".pt", ".th", ".ckpt", ".bin", ".safetensors", ".npz")
    return os.sep in weights or weights.endswith(suffixes) or os.path.exists(weights)


def local_file(weights: str, key: str = "model.backbone.weights") -> Path:
    """``weights`` as an existing file, else ``FileNotFoundError`` naming ``key``."""
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{key}={weights!r}: no such file")
    return path


def suggest(value: str, valid: list[str]) -> str:
    """`` Did you mean 'x'?`` for the closest of ``valid`` to a mistyped ``value``, else an empty string."""
    close = difflib.get_close_matches(value, valid, n=3, cutoff=0.5)
    return f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
