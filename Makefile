# The two commands a newcomer needs:  `make demo`  and  `make test`.
# Each builds the virtual environment (.venv) first when it is missing or stale.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lens_rl-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export VLLM_CPU_KVCACHE_SPACE ?= 1

.PHONY: setup demo test test-slow test-all lint format bench gpu-check clean

$(STAMP): pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)
	touch $(STAMP)

setup: $(STAMP)

## Main job on the embedded default (CPU, offline).
demo: $(STAMP)
	$(PY) scripts/quickstart.py

## Default test suite (everything but `slow`), the alignment checks again under a second CPU
## capability (AVX-512 machines: avx2; others: the scalar `default`), then the import layers
## (lint-imports, pyproject.toml) and lint. bf16 and some fp32
## results depend on the CPU's kernels: an assertion that holds on one ISA only fails here on every
## machine, not in CI on some.
test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q
	ATEN_CPU_CAPABILITY=$$($(PY) scripts/second_cpu_capability.py) $(PY) -m pytest -m "alignment and not slow" -q
	$(VENV)/bin/lint-imports
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test-slow: $(STAMP)
	$(PY) -m pytest -m slow -q

test-all: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench: $(STAMP)
	$(PY) benchmarks/bench_generation.py --out benchmarks/results/generation.json
	$(PY) benchmarks/bench_sft.py --out benchmarks/results/sft.json
	$(PY) benchmarks/bench_scoring.py --model_dir .cache/lens_rl/base-llama-d128 --out benchmarks/results/scoring.json
	$(PY) benchmarks/bench_rl.py --out benchmarks/results/rl.json
	$(PY) benchmarks/bench_probe.py --model_dir .cache/lens_rl/base-llama-d128 --out benchmarks/results/probe.json

## GPU tests and GPU figures (scripts/gpu_check.py). Without an NVIDIA GPU: says so, runs nothing, exits 0.
gpu-check:
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(MAKE) --no-print-directory setup && $(PY) scripts/gpu_check.py; \
	else \
		echo "gpu-check: no NVIDIA GPU here (nvidia-smi finds none). Nothing was run."; \
		echo "On a machine with an NVIDIA GPU, \`make gpu-check\` builds ~1B-parameter random models locally,"; \
		echo "runs the \`gpu\` tests and the GPU benchmarks, and writes benchmarks/results/gpu_check.json."; \
	fi

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
