"""Hugging Face model and tokenizer folders on this machine, shared by the text backbone
(:class:`~transfer_lit.backbones.HFTextBackbone`) and its preprocessing (:func:`~transfer_lit.preprocessing.text.
load_tokenizer`): a local folder, its snapshot in the Hugging Face cache, or (online only) a download.

``transformers`` and ``huggingface_hub`` are imported inside the functions (the optional ``[text]`` extra).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from transfer_lit.backbones.weights import WeightsNotAvailableError, online


def import_transformers() -> ModuleType:
    """``transformers``, or an ``ImportError`` that says how to install it."""
    try:
        import transformers
    except ImportError as error:  # pragma: no cover - exercised without the extra
        raise ImportError("text models need transformers: pip install 'transfer-lit[text]'") from error
    return transformers


def cached_folder(name: str) -> Path | None:
    """The folder ``name`` itself, or its snapshot in the Hugging Face cache; ``None`` when neither is here (never
    uses the network)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not cached, not a valid repo id, or huggingface_hub missing: nothing local
        return None


def local_model_source(name: str, key: str = "model.backbone.model") -> Path:
    """The local folder of model ``name`` (:func:`cached_folder`), or (online) a fresh download. Offline and not
    cached: an immediate :class:`WeightsNotAvailableError` saying what to copy where; ``key`` is the config key
    named in the errors."""
    folder = cached_folder(name)
    if folder is not None:
        return folder
    if Path(name).expanduser().is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"{key}={name!r}: no such folder (give a local model folder or a Hugging Face hub "
                                f"name such as 'sentence-transformers/all-MiniLM-L6-v2')")
    from huggingface_hub import constants, snapshot_download

    if not online("https://huggingface.co"):
        raise WeightsNotAvailableError(
            f"{key}={name!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and the network is "
            f"unreachable. On a machine with internet run `huggingface-cli download {name}` (or save the model and "
            f"tokenizer with save_pretrained), copy the folder here (config.json, model.safetensors or "
            f"pytorch_model.bin, and the tokenizer files: tokenizer.json or vocab.txt, tokenizer_config.json) and pass "
            f"its path as {key}")
    return Path(snapshot_download(name, etag_timeout=30))
