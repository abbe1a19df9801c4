"""SequenceProcessor: generation, teacher-forced scoring and diagnostics under one policy."""

from lens_rl.processing.sequence_processor import (
    BatchedSequences,
    DiagnosticsResults,
    GenerationConfig,
    LogprobResults,
    PrecisionConfig,
    SequenceProcessor,
    register_prompt_dataset,
)

__all__ = [
    "BatchedSequences",
    "DiagnosticsResults",
    "GenerationConfig",
    "LogprobResults",
    "PrecisionConfig",
    "SequenceProcessor",
    "register_prompt_dataset",
]
