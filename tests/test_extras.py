"""The optional extras stay optional: the image path never imports transformers, tokenizers or timm."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import make_image_folder

# In a fresh interpreter: any import of an optional package *by transfer_lit's own code* fails (Lightning's
# torchmetrics imports transformers itself when it is installed; that is not ours), then an image fit runs.
SCRIPT = r"""
import importlib.abc, sys
PACKAGE = {package!r}
OPTIONAL = ("transformers", "tokenizers", "timm")


def ours(frame):
    while frame is not None and frame.f_code.co_filename.startswith(("<frozen", "<string>")):
        frame = frame.f_back
    return frame is not None and frame.f_code.co_filename.startswith(PACKAGE)


class NoExtras(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in OPTIONAL and ours(sys._getframe(1)):
            raise ImportError(f"transfer_lit imported the optional {{name}}")
        return None


sys.meta_path.insert(0, NoExtras())
import lightning.pytorch  # its torchmetrics imports transformers itself when installed: not ours
for name in OPTIONAL:  # already imported: a later `import` is a cache hit, so guard every attribute read instead
    module = sys.modules.get(name)
    if module is not None:
        class Guarded(type(module)):
            def __getattribute__(self, attr, _name=name):
                if ours(sys._getframe(1)):
                    raise ImportError(f"transfer_lit imported the optional {{_name}} (read .{{attr}})")
                return super().__getattribute__(attr)
        module.__class__ = Guarded
from transfer_lit.cli import main
main(["fit", "--config", {config!r}, "--data.root", {root!r}, "--trainer.default_root_dir", {runs!r}])
print("IMAGE-FIT-DONE")
"""


def test_an_image_fit_imports_no_optional_extra(tmp_path: Path) -> None:
    import transfer_lit

    package = str(Path(transfer_lit.__file__).parent)
    root = make_image_folder(tmp_path / "images", {"train": 4, "val": 2}, size=36)
    config = str(Path(__file__).resolve().parents[1] / "configs" / "debug.yaml")
    script = SCRIPT.format(package=package, config=config, root=str(root), runs=str(tmp_path / "runs"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={"TRANSFER_LIT_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0 and "IMAGE-FIT-DONE" in done.stdout, done.stderr[-3000:]


def test_the_guard_catches_an_import_by_transfer_lit(tmp_path: Path, text_model: Path) -> None:
    """The check above can fail: building a text backbone in the same guarded interpreter is refused."""
    import transfer_lit

    package = str(Path(transfer_lit.__file__).parent)
    script = SCRIPT.split("from transfer_lit.cli")[0].format(package=package, config="", root="", runs="")
    assert "Guarded" in script
    script += f"\nimport transfer_lit\ntransfer_lit.HFTextBackbone({str(text_model)!r})\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={"TRANSFER_LIT_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode != 0 and "transfer_lit imported the optional transformers" in done.stderr
