"""Text preprocessing: the tokenizer a language-model checkpoint was trained with, and its limits.

For text, the checkpoint-matched preprocessing is the tokenizer: :class:`TextPreprocessing` names it (a
Hugging Face hub name or a local folder), pins it by a hash of its files, and says how texts become
token ids (``max_length``, the truncation side, the padding rule). It is resolved by the same precedence
rule as images (:func:`~transfer_lit.preprocessing.resolve_preprocessing`), logged, and saved in the
checkpoint, so ``predict`` after a reload tokenizes exactly as training did: :func:`load_tokenizer`
refuses tokenizer files whose hash differs from the pinned one.

``transformers`` is imported only inside :func:`load_tokenizer` (the optional ``[text]`` extra), through
:mod:`transfer_lit.hf_files`, which finds the tokenizer's folder.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

from transfer_lit.hf_files import cached_folder, import_transformers, local_model_source
from transfer_lit.preprocessing.base import Preprocessing, register_preprocessing

TruncationSide = Literal["right", "left"]
Padding = Literal["longest", "max_length"]
#: The files that define a tokenizer (whichever of them a checkpoint folder has): their bytes make its hash.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")


@register_preprocessing
@dataclass(frozen=True)
class TextPreprocessing(Preprocessing):
    """What a text checkpoint expects of its inputs.

    Args:
        tokenizer: Hugging Face hub name or local folder of the tokenizer.
        tokenizer_hash: sha256 of the tokenizer's files (:func:`tokenizer_fingerprint`); ``""`` = not pinned.
        max_length: texts are truncated to this many tokens (special tokens included).
        truncation_side: which end of a long text is cut: ``right`` (keep the start) or ``left`` (keep the end).
        padding: ``longest`` pads each batch to its longest text (dynamic padding); ``max_length`` pads every
            batch to ``max_length``.
    """

    modality: ClassVar[str] = "text"

    tokenizer: str
    tokenizer_hash: str = ""
    max_length: int = 128
    truncation_side: TruncationSide = "right"
    padding: Padding = "longest"

    def __post_init__(self) -> None:
        if not isinstance(self.max_length, int) or isinstance(self.max_length, bool) or self.max_length < 2:
            raise ValueError(f"preprocessing.max_length must be an integer >= 2, got {self.max_length!r}")
        for key, valid in (("truncation_side", get_args(TruncationSide)), ("padding", get_args(Padding))):
            if getattr(self, key) not in valid:
                raise ValueError(f"preprocessing.{key} must be one of {list(valid)}, got {getattr(self, key)!r}")
        if not self.tokenizer:
            raise ValueError("preprocessing.tokenizer is empty: give a Hugging Face hub name or a local folder")

    def merged(self, override: Mapping[str, Any]) -> Preprocessing:
        """A tokenizer named by the override is no longer the one the hash pins: the hash is then recomputed
        from its files (or left unpinned when they cannot be found)."""
        values = {**self.to_dict(), **override}
        if override.get("tokenizer") not in (None, self.tokenizer) and "tokenizer_hash" not in override:
            values["tokenizer_hash"] = tokenizer_fingerprint(str(override["tokenizer"])) or ""
        return type(self).from_dict(values)

    def check_checkpoint(self, trained_with: Preprocessing) -> None:
        """Refuse a configured tokenizer that is not the one the checkpoint was trained with."""
        if not isinstance(trained_with, TextPreprocessing) or not trained_with.tokenizer_hash:
            return
        if self.tokenizer_hash and self.tokenizer_hash != trained_with.tokenizer_hash:
            raise ValueError(
                f"model.preprocessing.tokenizer={self.tokenizer!r} (files hash {self.tokenizer_hash[:12]}) is not "
                f"the tokenizer this checkpoint was trained with: {trained_with.tokenizer!r} (hash "
                f"{trained_with.tokenizer_hash[:12]}); drop the override to use the checkpoint's own")

    def check_inputs(self, inputs: Any) -> None:
        if not isinstance(inputs, Mapping) or "input_ids" not in inputs:
            raise TypeError(f"the backbone takes tokenized text (a mapping with input_ids and attention_mask), got "
                            f"{type(inputs).__name__}; use transfer_lit.TextDataModule as the data")


def tokenizer_fingerprint(name: str) -> str | None:
    """sha256 over the names and bytes of the tokenizer files (:data:`TOKENIZER_FILES`) of ``name``'s folder."""
    folder = cached_folder(name)
    if folder is None:
        return None
    digest = hashlib.sha256()
    found = False
    for file in TOKENIZER_FILES:
        path = folder / file
        if path.is_file():
            found = True
            digest.update(file.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest() if found else None


def load_tokenizer(preprocessing: TextPreprocessing) -> Any:
    """The Hugging Face tokenizer of ``preprocessing``, checked against its pinned hash, with its truncation side.

    Raises:
        ValueError: when the tokenizer's files hash differently from ``preprocessing.tokenizer_hash``.
        FileNotFoundError: when the tokenizer is neither a local folder nor in the local cache, offline.
    """
    transformers = import_transformers()
    source = local_model_source(preprocessing.tokenizer, "model.preprocessing.tokenizer")
    actual = tokenizer_fingerprint(str(source))
    if preprocessing.tokenizer_hash and actual is not None and actual != preprocessing.tokenizer_hash:
        raise ValueError(
            f"the tokenizer files of {preprocessing.tokenizer!r} (hash {actual[:12]}) are not the ones this model "
            f"was trained with (hash {preprocessing.tokenizer_hash[:12]}): they changed since, so texts would be "
            f"tokenized differently; restore the original files or retrain")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    tokenizer.truncation_side = preprocessing.truncation_side
    if tokenizer.pad_token_id is None:
        raise ValueError(f"the tokenizer of {preprocessing.tokenizer!r} has no padding token; batches of texts of "
                         f"different lengths need one (set tokenizer.pad_token in a subclass of HFTextBackbone)")
    return tokenizer
