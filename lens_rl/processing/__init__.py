"""SequenceProcessor: generation, teacher-forced scoring and diagnostics under one policy."""

from lens_rl.processing.prompts import register_prompt_dataset
from lens_rl.processing.sequence_processor import (
    BatchedSequences,
    DiagnosticsResults,
    LogprobResults,
    PrecisionConfig,
    SamplingConfig,
    SequenceProcessor,
)

__all__ = [
    "BatchedSequences",
    "DiagnosticsResults",
    "LogprobResults",
    "PrecisionConfig",
    "SamplingConfig",
    "SequenceProcessor",
    "register_prompt_dataset",
]
