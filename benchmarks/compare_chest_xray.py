"""``transfer-lit compare`` under a strong domain shift: pediatric chest X-rays (../shared/data/chest_xray_pneumonia).

    python benchmarks/compare_chest_xray.py [--seeds 3] [--epochs 4] [--output_dir outputs/compare_chest_xray]
        [--strategies linear_probe,finetune,progressive] [--backbone_lr_mults 0.01,0.1,1] [--patience N] [--all_train]

As ``benchmarks/compare_hymenoptera.py`` (the shipped recipes, ImageNet MobileNetV2 at a 160 px crop, the backbone
LR multiplier searched over {0.01, 0.1, 1} on seed 0 and judged on the selection half), on NORMAL vs PNEUMONIA:
150 radiographs per class drawn from the 1,825 of train/ (``data.samples_per_class``: the few hundred labelled
images the mission is about, and what this 2-core machine can compare 13 times in half an hour); the official test
split (624, majority class 0.625) cut in a selection half and a held-out half.
The question the issue asks: do fine-tune / progressive beat the linear probe here, and does the
pick match the best strategy found by hand? ``--all_train``: train on all 1,825. The last line is the compare
summary (held-out numbers).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_hymenoptera import REPO, main

if __name__ == "__main__":
    every_image = "--all_train" in sys.argv
    main([a for a in sys.argv[1:] if a != "--all_train"], data=REPO.parent / "shared" / "data" / "chest_xray_pneumonia",
         name="compare_chest_xray", epochs=4, doc=__doc__,
         extra=() if every_image else ("--data.samples_per_class", "150"))
