#!/usr/bin/env bash
# Create bench/.venv-openclip: a separate venv holding torch 2.14.1 + torchvision 0.29.1
# + open_clip_torch (library `open_clip` and trainer `open_clip_train`, both shipped in
# the same wheel since open_clip_torch 2.24 / 3.x), plus the project's own runtime deps
# (megatron-core etc.) so the project engine can be run on the *same* torch build for an
# apples-to-apples comparison.
#
# Idempotent: if the venv already imports everything, it does nothing (use --force to
# rebuild from scratch).
#
# Usage:  bash bench/setup_openclip_env.sh [--force]
# Env:    PYTHON   base interpreter (default /root/.pyenv/versions/3.11.7/bin/python3)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${HERE}/.venv-openclip"
PYTHON="${PYTHON:-/root/.pyenv/versions/3.11.7/bin/python3}"
OPEN_CLIP_VERSION="${OPEN_CLIP_VERSION:-3.3.0}"

check() {
    [ -x "${VENV}/bin/python" ] || return 1
    "${VENV}/bin/python" - <<'EOF' >/dev/null 2>&1
import torch, torchvision, open_clip, open_clip_train.main, webdataset, pandas
import megatron.core, sentencepiece, yaml, omegaconf, tensorboard, PIL, psutil
assert torch.__version__.startswith("2.14.1"), torch.__version__
EOF
}

if [ "${1:-}" = "--force" ]; then
    rm -rf "${VENV}"
elif check; then
    echo "[setup_openclip_env] ${VENV} already complete; skipping."
    exit 0
fi

start=$(date +%s)
[ -x "${VENV}/bin/python" ] || "${PYTHON}" -m venv "${VENV}"
PIP="${VENV}/bin/python -m pip"

# torch/torchvision come from local disk (/opt/wheels via pip config; CUDA build, runs on CPU).
${PIP} install --no-input \
    "torch==2.14.1" "torchvision==0.29.1" \
    "open_clip_torch==${OPEN_CLIP_VERSION}" \
    "webdataset>=0.2.5,<=0.2.86" braceexpand pandas fsspec \
    "megatron-core>=0.16,<0.17" sentencepiece pyyaml omegaconf tensorboard pillow psutil

if ! check; then
    echo "[setup_openclip_env] ERROR: venv does not import cleanly:" >&2
    "${VENV}/bin/python" -c "import torch, torchvision, open_clip, open_clip_train.main, megatron.core" >&2 || true
    exit 1
fi

end=$(date +%s)
"${VENV}/bin/python" - <<'EOF'
import importlib.metadata as md
for d in ("torch", "torchvision", "open_clip_torch", "webdataset", "megatron-core", "timm"):
    print(f"  {d}=={md.version(d)}")
EOF
echo "[setup_openclip_env] done in $((end - start)) s -> ${VENV}"
