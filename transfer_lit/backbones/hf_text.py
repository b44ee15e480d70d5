"""Any Hugging Face ``transformers`` encoder as a :class:`~transfer_lit.backbones.Backbone`; its tokenizer as the
preprocessing.

``transformers`` is an optional extra (``pip install 'transfer-lit[text]'``); the image path never imports it.
What the checkpoint declares is used as it is:

* pooling: a sentence-transformers folder's ``1_Pooling/config.json`` (mean for all-MiniLM-L6-v2), else the
  model's pretrained ``pooler`` (BERT classifiers), else the first token; overridable with ``pooling``;
* ``max_length``: ``sentence_bert_config.json``'s ``max_seq_length``, else the tokenizer's ``model_max_length``
  (at most the model's ``max_position_embeddings``);
* blocks: ``embeddings`` (everything before the first encoder layer), ``layer.0`` ... ``layer.N-1`` (the
  encoder's layer list, found as the model's largest ``ModuleList``), then ``final`` (norms after the last
  layer, if any) and ``pooler`` (if used); every parameter in exactly one block.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn

from transfer_lit.backbones.base import Backbone, BlockSpec
from transfer_lit.backbones.weights import WeightsNotAvailableError
from transfer_lit.hf_files import import_transformers, local_model_source
from transfer_lit.preprocessing.text import TextPreprocessing, tokenizer_fingerprint

Pooling = Literal["auto", "mean", "cls", "pooler", "max"]
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def declared_pooling(folder: Path, model: nn.Module) -> str:
    """The pooling the checkpoint intends: sentence-transformers' Pooling config, else ``pooler``, else ``cls``."""
    modules = json.loads((folder / "modules.json").read_text()) if (folder / "modules.json").is_file() else []
    for module in modules:
        if str(module.get("type", "")).endswith("Pooling"):
            config = _read_json(folder / module.get("path", "") / "config.json")
            for mode, flag in (("mean", "pooling_mode_mean_tokens"), ("cls", "pooling_mode_cls_token"),
                               ("max", "pooling_mode_max_tokens")):
                if config.get(flag):
                    return mode
    return "pooler" if getattr(model, "pooler", None) is not None else "cls"


def declared_max_length(folder: Path, config: Any) -> int:
    """``max_seq_length`` of sentence-transformers, else the tokenizer's ``model_max_length``, within the model's
    position embeddings (512 when nothing says)."""
    limit = int(getattr(config, "max_position_embeddings", 512) or 512)
    sentence = _read_json(folder / "sentence_bert_config.json").get("max_seq_length")
    if sentence:
        return min(int(sentence), limit)
    tokenizer = _read_json(folder / "tokenizer_config.json").get("model_max_length")
    return min(int(tokenizer), limit) if isinstance(tokenizer, int | float) and tokenizer < 1e6 else limit


def layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The encoder's layers: the ``ModuleList`` of ``model`` holding the most parameters, with its name."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no ModuleList of layers; subclass HFTextBackbone and override "
                         f"block_specs")
    return max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))


class HFTextBackbone(Backbone):
    """A Hugging Face encoder (``AutoModel``) pooled to ``(batch, hidden_size)``.

    Args:
        model: hub name (``sentence-transformers/all-MiniLM-L6-v2``) or local folder with the model and tokenizer.
        pretrained: load the checkpoint's weights; ``False`` = random init of the same architecture (a scratch
            baseline).
        pooling: ``auto`` (what the checkpoint declares, see the module doc), ``mean`` (over non-padding tokens),
            ``cls`` (first token), ``pooler`` (the model's pooler output) or ``max``.
        model_kwargs: extra keyword arguments of ``AutoModel.from_pretrained`` / ``from_config``.
    """

    def __init__(self, model: str, pretrained: bool = True, pooling: Pooling = "auto",
                 model_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        if pooling not in get_args(Pooling):
            raise ValueError(f"model.backbone.pooling must be one of {list(get_args(Pooling))}, got {pooling!r}")
        transformers = import_transformers()
        folder = local_model_source(model)
        kwargs = dict(model_kwargs or {})
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        transformers.utils.logging.disable_progress_bar()
        if pretrained:
            if not any((folder / f).is_file() for f in _WEIGHT_FILES) and not list(folder.glob("*.safetensors")):
                raise WeightsNotAvailableError(f"model.backbone.model={model!r}: {folder} has no weights file "
                                               f"({' or '.join(_WEIGHT_FILES)}); use pretrained: false for random init")
            self.model = transformers.AutoModel.from_pretrained(str(folder), local_files_only=True, **kwargs)
        else:
            self.model = transformers.AutoModel.from_config(config, **kwargs)
        self.pooling = declared_pooling(folder, self.model) if pooling == "auto" else pooling
        if self.pooling == "pooler" and getattr(self.model, "pooler", None) is None:
            raise ValueError(f"model.backbone.pooling='pooler' but {type(self.model).__name__} has no pooler; valid "
                             f"here: 'mean', 'cls', 'max'")
        if self.pooling != "pooler" and getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None  # unused: no block that never gets a gradient (DDP would wait for it)
        self.num_features = int(config.hidden_size)
        self.preprocessing = TextPreprocessing(
            tokenizer=str(model), tokenizer_hash=tokenizer_fingerprint(str(folder)) or "",
            max_length=declared_max_length(folder, config))
        self._inputs = set(inspect.signature(self.model.forward).parameters)
        self._specs = self._layer_specs()

    def _layer_specs(self) -> list[BlockSpec]:
        name, layers = layer_list(self.model)
        prefix = f"model.{name}"
        before: list[str] = []
        after: list[str] = []
        pooler: list[str] = []
        in_layers = False
        for pname, _ in self.named_parameters():
            if pname.startswith(prefix + "."):
                in_layers = True
            elif pname.startswith("model.pooler."):
                pooler.append(pname)
            else:
                (after if in_layers else before).append(pname)
        specs: list[BlockSpec] = [("embeddings", tuple(before))] if before else []
        specs += [(f"layer.{i}", (f"{prefix}.{i}",)) for i, layer in enumerate(layers)
                  if any(True for _ in layer.parameters())]
        specs += [("final", tuple(after))] if after else []
        return specs + ([("pooler", ("model.pooler",))] if pooler else [])

    def block_specs(self) -> list[BlockSpec]:
        return self._specs

    def default_preprocessing(self) -> TextPreprocessing:
        """Texts are tokenized by the checkpoint's own tokenizer (there is no modality-wide default)."""
        assert isinstance(self.preprocessing, TextPreprocessing)
        return self.preprocessing

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        mask = inputs["attention_mask"]
        out = self.model(**{k: v for k, v in inputs.items() if k in self._inputs})
        if self.pooling == "pooler":
            return out.pooler_output
        hidden = out.last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "max":
            return hidden.masked_fill(weights == 0, torch.finfo(hidden.dtype).min).amax(dim=1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
