"""Decision thresholds for binary tasks, chosen on validation predictions: the best F1, or a target recall or
precision (``recall>=0.9``: the highest threshold that still keeps recall at 0.9)."""

from __future__ import annotations

import torch

RULES = ("max_f1", "recall>=X", "precision>=X")


def parse_threshold_rule(rule: float | str) -> tuple[str, float]:
    """``0.3`` -> ``("fixed", 0.3)``; ``"max_f1"``; ``"recall>=0.9"`` -> ``("recall", 0.9)``.

    Raises:
        ValueError: naming ``model.threshold``, the value and what is valid.
    """
    valid = f"a probability in (0, 1) or one of {list(RULES)} with X in (0, 1]"
    if isinstance(rule, bool):
        raise ValueError(f"model.threshold must be {valid}, got {rule!r}")
    if isinstance(rule, int | float):
        if not 0.0 < float(rule) < 1.0:
            raise ValueError(f"model.threshold must be {valid}, got {rule!r}")
        return "fixed", float(rule)
    text = str(rule).replace(" ", "")
    if text == "max_f1":
        return "max_f1", 0.0
    for name in ("recall", "precision"):
        if text.startswith(f"{name}>="):
            try:
                target = float(text[len(name) + 2:])
            except ValueError:
                break
            if 0.0 < target <= 1.0:
                return name, target
    raise ValueError(f"model.threshold must be {valid}, got {rule!r}")


def ranked_counts(scores: torch.Tensor, positive: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores from the highest, with the true positives and the count of predicted positives when the top
    ``k + 1`` are called positive, and where a cut may fall (the last of equal scores)."""
    order = scores.argsort(descending=True)
    ranked = scores[order]
    tp = positive[order].double().cumsum(0)
    k = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    last = torch.ones_like(ranked, dtype=torch.bool)
    last[:-1] = ranked[:-1] != ranked[1:]
    return ranked, tp, k, last


def choose_threshold(probs: torch.Tensor, target: torch.Tensor, rule: str, value: float) -> float:
    """The threshold on ``probs`` (probability of class 1) that ``rule`` asks for on these predictions.

    A sample is predicted positive when its probability is ``>=`` the threshold. ``max_f1`` takes the threshold of
    the best F1; ``recall`` the highest threshold whose recall is at least ``value``; ``precision`` the lowest
    threshold whose precision is at least ``value`` (0.5 when no threshold reaches it). Thresholds lie halfway
    between two observed probabilities.
    """
    if rule == "fixed":
        return value
    probs, target = probs.detach().double().cpu().flatten(), target.detach().cpu().flatten().long()
    positives = int(target.sum())
    if positives == 0 or positives == len(target):
        return 0.5
    sorted_probs, tp, k, last = ranked_counts(probs, target == 1)  # only cut between distinct probabilities
    precision, recall = tp / k, tp / positives
    below = torch.cat([sorted_probs[1:], sorted_probs.new_zeros(1)])
    cuts = (sorted_probs + below) / 2  # halfway to the next probability: `p > t` and `p >= t` agree
    if rule == "max_f1":
        f1 = torch.where(last, 2 * precision * recall / (precision + recall).clamp(min=1e-12), -1.0)
        return float(cuts[int(f1.argmax())])
    ok = last & ((recall >= value) if rule == "recall" else (precision >= value))
    if not bool(ok.any()):
        return 0.5
    index = int(ok.nonzero()[0]) if rule == "recall" else int(ok.nonzero()[-1])
    return float(cuts[index])
