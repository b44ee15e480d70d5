"""Head factories: ``(in_features, num_outputs) -> nn.Module``.

The module calls the factory with the backbone's feature width, so the width is never written
by hand. In YAML a head is chosen with ``class_path`` and its remaining arguments::

    head:
      class_path: transfer_lit.MLPHead
      init_args: {hidden: 512, dropout: 0.2}
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

HeadFactory = Callable[[int, int], nn.Module]


class LinearHead(nn.Sequential):
    """Optional dropout then one linear layer.

    Args:
        in_features: backbone feature width (passed by the module).
        num_outputs: number of logits (passed by the module).
        dropout: dropout probability applied to the features.
    """

    def __init__(self, in_features: int, num_outputs: int, dropout: float = 0.0) -> None:
        layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout > 0 else []
        super().__init__(*layers, nn.Linear(in_features, num_outputs))


class MLPHead(nn.Sequential):
    """Linear -> GELU -> dropout -> linear.

    Args:
        in_features: backbone feature width (passed by the module).
        num_outputs: number of logits (passed by the module).
        hidden: width of the hidden layer.
        dropout: dropout probability after the hidden layer.
    """

    def __init__(self, in_features: int, num_outputs: int, hidden: int = 512, dropout: float = 0.2) -> None:
        if hidden <= 0:
            raise ValueError(f"model.head.hidden must be positive, got {hidden}")
        super().__init__(
            nn.Linear(in_features, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, num_outputs)
        )
