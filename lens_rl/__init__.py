"""lens_rl: consistency lenses trained supervised, then fine-tuned with RL on TRL.

A consistency lens maps a hidden activation ``A`` of a frozen LM to a short text (the
decoder) and back to ``Â`` (the encoder). See README.md and docs/ for the stages and commands.

The public API is importable from the package root; the names are resolved lazily (on first
use), so ``import lens_rl`` stays cheap and does not import torch, transformers or TRL::

    from lens_rl import ConsistencyLens, explain
    lens = ConsistencyLens.from_pretrained("outputs/quickstart/sft/lens")
    rows = explain(lens, ["def main():\\n    return 0"], positions="last", k=8)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lens_rl.version import __version__

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # the lens and its parts
    "ConsistencyLens": "lens_rl.models.lens",
    "Decoder": "lens_rl.models.decoder",
    "DecoderConfig": "lens_rl.models.decoder",
    "Encoder": "lens_rl.models.encoder",
    "EncoderConfig": "lens_rl.models.encoder",
    "OrigWrapper": "lens_rl.models.orig",
    # sampling and scoring
    "SamplingPolicy": "lens_rl.ops.sampling",
    "SequenceProcessor": "lens_rl.processing.sequence_processor",
    "SamplingConfig": "lens_rl.processing.sequence_processor",
    # data
    "DumpConfig": "lens_rl.data.dump",
    "run_dump": "lens_rl.data.dump",
    "ActivationDataset": "lens_rl.data.dataset",
    # training
    "LensSFTConfig": "lens_rl.training.sft_config",
    "LensSFTTrainer": "lens_rl.training.sft_trainer",
    "run_sft": "lens_rl.training.sft_trainer",
    "LensGRPOConfig": "lens_rl.training.grpo_config",
    "LensGRPOTrainer": "lens_rl.training.grpo_trainer",
    "run_rl": "lens_rl.training.rl_stage",
    # reading a lens
    "explain": "lens_rl.reading.explain",
    "Explanations": "lens_rl.reading.results",
    "report_samples": "lens_rl.training.reports",
    "write_html": "lens_rl.reading.page",
    # the entropy probe
    "EntropyProbeConfig": "lens_rl.probe.config",
    "run_entropy_probe": "lens_rl.probe.runner",
}

__all__ = [
    "__version__",
    "ConsistencyLens",
    "Decoder",
    "DecoderConfig",
    "Encoder",
    "EncoderConfig",
    "OrigWrapper",
    "SamplingPolicy",
    "SequenceProcessor",
    "SamplingConfig",
    "DumpConfig",
    "run_dump",
    "ActivationDataset",
    "LensSFTConfig",
    "LensSFTTrainer",
    "run_sft",
    "LensGRPOConfig",
    "LensGRPOTrainer",
    "run_rl",
    "explain",
    "Explanations",
    "report_samples",
    "write_html",
    "EntropyProbeConfig",
    "run_entropy_probe",
]


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lens_rl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # static tools see the real names
    from lens_rl.data.dataset import ActivationDataset
    from lens_rl.data.dump import DumpConfig, run_dump
    from lens_rl.models.decoder import Decoder, DecoderConfig
    from lens_rl.models.encoder import Encoder, EncoderConfig
    from lens_rl.models.lens import ConsistencyLens
    from lens_rl.models.orig import OrigWrapper
    from lens_rl.ops.sampling import SamplingPolicy
    from lens_rl.probe.config import EntropyProbeConfig
    from lens_rl.probe.runner import run_entropy_probe
    from lens_rl.processing.sequence_processor import SamplingConfig, SequenceProcessor
    from lens_rl.reading.explain import explain
    from lens_rl.reading.page import write_html
    from lens_rl.reading.results import Explanations
    from lens_rl.training.grpo_config import LensGRPOConfig
    from lens_rl.training.grpo_trainer import LensGRPOTrainer
    from lens_rl.training.reports import report_samples
    from lens_rl.training.rl_stage import run_rl
    from lens_rl.training.sft_config import LensSFTConfig
    from lens_rl.training.sft_trainer import LensSFTTrainer, run_sft
