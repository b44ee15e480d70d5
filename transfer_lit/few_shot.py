"""The few-shot protocol of ``transfer-lit compare --samples_per_class 1,5,10,40``: :func:`transfer_lit.compare.compare`
at each number of training images per class (a new draw for every seed), with a 95% interval over seeds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transfer_lit.compare import compare

#: Student's t quantile 0.975 for n - 1 degrees of freedom (n seeds), for the 95% interval of a mean.
T975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}


def few_shot(root: str, ks: list[int], strategies: list[str], seeds: int, output_dir: str,
             **kwargs: Any) -> dict[str, Any]:
    """:func:`compare` at each ``samples_per_class`` in ``ks``: held-out accuracy mean and 95% interval per k and
    strategy (``few_shot.json``, ``few_shot.md``, ``few_shot.png``)."""
    out = Path(output_dir)
    curves: dict[str, dict[str, Any]] = {}
    for k in ks:
        summary = compare(root, strategies, seeds, output_dir=str(out / f"k{k}"), samples_per_class=k, **kwargs)
        for name, row in summary["strategies"].items():
            half = T975.get(row["seeds"], 1.96) * row["accuracy_std"] / row["seeds"] ** 0.5 if row["seeds"] > 1 else 0
            curves.setdefault(name, {})[str(k)] = {"accuracy_mean": row["accuracy_mean"], "ci95": [
                round(max(0.0, row["accuracy_mean"] - half), 4), round(min(1.0, row["accuracy_mean"] + half), 4)]}
    result = {"samples_per_class": ks, "seeds": seeds, "strategies": curves}
    (out / "few_shot.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["| strategy | " + " | ".join(f"k={k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{c[str(k)]['accuracy_mean']:.3f} [{c[str(k)]['ci95'][0]:.3f}, "
                                          f"{c[str(k)]['ci95'][1]:.3f}]" for k in ks) + " |"
              for name, c in curves.items()]
    (out / "few_shot.md").write_text("\n".join(lines) + "\n")
    try:
        from transfer_lit.evaluation.plots import subplots
    except ImportError:
        return result
    fig, ax = subplots(figsize=(6, 4))
    for name, c in curves.items():
        means = [c[str(k)]["accuracy_mean"] for k in ks]
        ax.plot(ks, means, marker="o", label=name)
        ax.fill_between(ks, [c[str(k)]["ci95"][0] for k in ks], [c[str(k)]["ci95"][1] for k in ks], alpha=0.2)
    ax.set(xscale="log", xlabel="training images per class", ylabel="held-out accuracy (95% interval)", ylim=(0, 1),
           title=f"few-shot, {seeds} seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "few_shot.png", dpi=110)
    return result
