"""``transfer-lit compare`` on ants vs bees (``../shared/data/hymenoptera_256``), 3 seeds, on this 2-core CPU.

    python benchmarks/compare_hymenoptera.py [--seeds 3] [--epochs 3] [--output_dir outputs/compare_hymenoptera]

The shipped recipes (linear probe with cached features, fine-tune, progressive; ImageNet MobileNetV2) at a 160 px
crop (the checkpoint's statistics and resize ratio) to keep it under 20 minutes; the official ``val/`` is cut in a
selection half and a held-out half; the backbone LR multiplier is searched over {0.01, 0.1, 1} on seed 0 for
fine-tune and progressive. The last line is the compare summary (held-out numbers):
``{"pick": ..., "strategies": {"<strategy>": {"accuracy_mean", "accuracy_std", "f1_mean", "auroc_mean",
"ece_mean", "wall_s", ...}}}``; a rerun gives the same JSON but for the wall times.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from transfer_lit.compare import compare  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "hymenoptera_256"


def main(argv: list[str] | None = None, data: Path = DATA, name: str = "compare_hymenoptera", epochs: int = 3,
         doc: str | None = __doc__, extra: tuple[str, ...] = ()) -> dict:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--crop", type=int, default=160)
    parser.add_argument("--strategies", default="linear_probe,finetune,progressive")
    parser.add_argument("--backbone_lr_mults", default="0.01,0.1,1", help="searched on seed 0 (one value: no search)")
    parser.add_argument("--patience", type=int, default=None, help="early stopping on the selection accuracy")
    parser.add_argument("--output_dir", default=f"outputs/{name}")
    args = parser.parse_args(argv)
    if not data.is_dir():
        parser.error(f"{data} not found (the ../shared data folder)")
    resize = round(args.crop * 256 / 224)
    start = time.perf_counter()
    summary = compare(str(data), args.strategies.split(","), seeds=args.seeds, epochs=args.epochs,
                      output_dir=args.output_dir, patience=args.patience,
                      backbone_lr_mults=tuple(float(m) for m in args.backbone_lr_mults.split(",")),
                      extra=["--model.preprocessing", f"{{crop_size: {args.crop}, resize_size: {resize}}}",
                             "--trainer.enable_model_summary", "false", *extra])
    print((Path(args.output_dir) / "compare.md").read_text())
    print(f"{name}: {time.perf_counter() - start:.0f} s in all")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
