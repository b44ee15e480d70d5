"""Every performance default in one place, decided where it happens and undone where it is process-wide.

* Trainer settings on a GPU (:func:`apply_gpu_defaults`): bf16 autocast where the GPU has it natively,
  cuDNN benchmark mode, TF32 for what stays in float32 (process-wide: :func:`prefer_tf32` returns how
  to undo it).
* The optimizer (:func:`build_optimizer`): the user's factory with the module's groups, made fused on CUDA.
* The backbone (:class:`BackboneSpeed`): ``channels_last`` for convolutional backbones on CUDA and the
  opt-in ``torch.compile``, whose process-wide recompile limit is raised for the run and restored after.
* The process (:func:`keep_freed_memory`): glibc keeps freed memory for reuse (the CLI's process only).
"""

from __future__ import annotations

import ctypes
import inspect
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Adam, AdamW, Optimizer


def native_bf16() -> bool:
    """Whether the GPU computes in bf16 itself (Ampere and later), not through emulation (T4, V100: slow)."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # an older torch without the including_emulation argument
        return torch.cuda.is_bf16_supported()


def apply_gpu_defaults(trainer: dict[str, Any], cuda: bool, bf16: bool) -> None:
    """Fill in the ``trainer`` settings a GPU run wants and the user left unset (nothing without CUDA).

    bf16 autocast (free accuracy-wise for fine-tuning, ~2x faster where the GPU has it); cuDNN benchmark mode
    (every batch has the checkpoint's crop size, so cuDNN times its kernels once and keeps the fastest).
    """
    if not cuda:
        return
    if trainer.get("precision") is None and bf16:
        trainer["precision"] = "bf16-mixed"
    if trainer.get("benchmark") is None and not trainer.get("deterministic"):
        trainer["benchmark"] = True


def prefer_tf32(cuda: bool) -> Callable[[], None]:
    """TF32 for float32 matmuls (a ``32-true`` run, the loss) on CUDA, as Lightning advises, unless the user chose
    a precision; returns the function that restores the previous process-wide setting."""
    previous = torch.get_float32_matmul_precision()
    if cuda and previous == "highest":
        torch.set_float32_matmul_precision("high")
    return lambda: torch.set_float32_matmul_precision(previous)


def keep_freed_memory() -> None:
    """Stop glibc from handing large freed blocks back to the OS (this process only; the CLI owns it).

    glibc serves every allocation over 32 MB with a fresh ``mmap`` and unmaps it on free, so on CPU each
    batch page-faults its activations in again: a MobileNetV2 forward pass at batch 50 took 0.9M page
    faults and 3.5 s of system time (next to 3.8 s of compute) on a 2-core box; kept in the heap, freed
    memory is reused (0.4M faults, 1.2 s), like a GPU caching allocator reuses its blocks. The price is a
    higher peak RSS (1.4 -> 1.9 GB there), as the heap fragments. A no-op outside glibc.
    """
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: no mmap-served blocks
        libc.mallopt(-1, 1 << 40)  # M_TRIM_THRESHOLD: never trim the heap top
    except (OSError, AttributeError):  # musl or another libc: leave it alone
        pass


def build_optimizer(factory: Callable[[Iterable[dict[str, Any]]], Optimizer], groups: list[dict[str, Any]],
                    device: torch.device, allow_fused: bool = True) -> Optimizer:
    """The user's optimizer over ``groups``; on CUDA an Adam / AdamW with no implementation chosen becomes the
    fused one (:func:`prefer_fused`). ``allow_fused=False`` (sharded strategies) keeps it as built."""
    optimizer = factory(groups)
    if device.type == "cuda" and allow_fused:
        optimizer = prefer_fused(optimizer)
    return optimizer


def prefer_fused(optimizer: Optimizer, devices: tuple[str, ...] = ("cuda",)) -> Optimizer:
    """The same Adam / AdamW, same groups, with ``fused=True`` when the user chose no implementation and every
    parameter is a float on one of ``devices``: one kernel per group and step instead of a dozen, with the step
    counters on the device (``foreach`` keeps them on the host). Anything else is returned as it is.

    The fused optimizer takes part in mixed precision like any other: gradients are unscaled (fp16) before
    hooks and clipping see them, which Lightning requires to clip (it refuses optimizers that unscale
    internally). Loading a state dict saved without ``fused`` keeps it fused.

    Args:
        optimizer: the optimizer built by the user's factory, with the groups it made.
        devices: device types where the fused implementation is preferred.
    """
    defaults = optimizer.defaults
    chosen = defaults.get("fused") is not None or defaults.get("foreach") is not None
    chosen = chosen or bool(defaults.get("capturable")) or bool(defaults.get("differentiable"))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    on_devices = all(p.device.type in devices and p.is_floating_point() for p in params)
    if type(optimizer) not in (AdamW, Adam) or chosen or not on_devices:
        return optimizer
    accepted = inspect.signature(type(optimizer)).parameters  # AdamW's defaults hold Adam's decoupled_weight_decay
    kwargs = {k: v for k, v in defaults.items() if k in accepted}
    groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in optimizer.param_groups]
    fused = type(optimizer)(groups, **{**kwargs, "fused": True, "foreach": None})
    fused._step_supports_amp_scaling = False  # type: ignore[attr-defined]  # GradScaler unscales first, as usual

    def keep_fused(opt: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        # load_state_dict replaces the groups, flags included: a checkpoint of a foreach run would undo fused.
        state_dict["param_groups"] = [{**g, "fused": True, "foreach": None} for g in state_dict["param_groups"]]
        return state_dict

    fused.register_load_state_dict_pre_hook(keep_fused)
    return fused

def is_convolutional(backbone: nn.Module) -> bool:
    """True when most of the backbone's parameters are in 2-D convolutions (ResNet, MobileNet; not ViT)."""
    conv = sum(p.numel() for m in backbone.modules() if isinstance(m, nn.Conv2d) for p in m.parameters(False))
    return conv * 2 > sum(p.numel() for p in backbone.parameters())


class BackboneSpeed:
    """The backbone's memory format and compilation for one module; :meth:`apply` in ``setup``, :meth:`restore`
    in ``teardown`` (which puts back the process-wide recompile limit).

    Args:
        compile: ``torch.compile`` the backbone in place (checkpoint keys are unchanged).
    """

    def __init__(self, compile: bool = False) -> None:
        self.compile = compile
        self.channels_last = False
        self.compiled = False
        self._previous_limit: int | None = None

    def apply(self, backbone: nn.Module, device: torch.device, num_blocks: int) -> None:
        """``channels_last`` for a convolutional backbone on CUDA (what cuDNN's fastest kernels want: the default
        memory format cost ResNet-50 44% on an H100); compile once, with room for one graph per phase."""
        if device.type == "cuda" and not self.channels_last and is_convolutional(backbone):
            backbone.to(memory_format=torch.channels_last)
            self.channels_last = True
        if not self.compile:
            return
        if self._previous_limit is None:  # one graph per (frozen blocks, train/eval): room for a recompile per thaw
            config = torch._dynamo.config
            self._previous_limit = config.cache_size_limit
            config.cache_size_limit = max(config.cache_size_limit, 2 * num_blocks + 8)
        if not self.compiled:
            backbone.compile(dynamic=False)
            self.compiled = True

    def prepare_inputs(self, inputs: Any) -> Any:
        """Inputs in the backbone's memory format (4-D image batches when ``channels_last``)."""
        if self.channels_last and isinstance(inputs, torch.Tensor) and inputs.ndim == 4:
            return inputs.contiguous(memory_format=torch.channels_last)
        return inputs

    def restore(self) -> None:
        """Put back the process-wide recompile limit raised by :meth:`apply` (the compiled backbone stays)."""
        if self._previous_limit is not None:
            torch._dynamo.config.cache_size_limit = self._previous_limit
            self._previous_limit = None
