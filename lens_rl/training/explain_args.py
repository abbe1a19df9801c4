"""End-of-run explanations, shared by both training configs (a base of ``LensSFTConfig`` and
``LensGRPOConfig``): how many held-out windows are explained at every position and how many
explanations are sampled per position (:func:`lens_rl.training.reports.report_samples`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lens_rl.config import ConfigError


@dataclass
class ExplainArguments:
    """``explain_texts`` / ``explain_samples`` (see the module docstring)."""

    explain_texts: int = field(
        default=4,
        metadata={
            "help": "Held-out windows explained at every position (best of explain_samples) at the end: "
            "a table, explanations.html and explanations_val.jsonl in output_dir; 0 disables."
        },
    )
    explain_samples: int = field(
        default=4, metadata={"help": "Explanations sampled per position for explain_texts (best-of-k)."}
    )

    def check_explain(self) -> None:
        """Refuse impossible values, naming the field."""
        cls = type(self).__name__
        if self.explain_samples < 1:
            raise ConfigError(f"{cls}.explain_samples must be >= 1, got {self.explain_samples}.")
        if self.explain_texts < 0:
            raise ConfigError(f"{cls}.explain_texts must be >= 0, got {self.explain_texts}.")
