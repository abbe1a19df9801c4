"""Output folders of the one-shot commands (``lens-rl explain``, the entropy probe): a folder
that already holds their files is refused before any work, unless overwriting is asked for.

The training stages lock and check their folders themselves
(:func:`lens_rl.training.guards.claim_output_dir`); these commands write a few named files, so
the check is on those names: pointing ``explain`` at a training run's folder would otherwise
replace the run's own ``explanations.html`` without a word.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from lens_rl.config import ConfigError


def refuse_existing_outputs(output_dir: str | Path, names: Iterable[str], overwrite: bool, flag: str) -> None:
    """Raise :class:`ConfigError` naming the files of ``names`` that ``output_dir`` already holds,
    unless ``overwrite`` (then they are replaced when the command writes them)."""
    out = Path(output_dir)
    found = [name for name in names if (out / name).exists()]
    if found and not overwrite:
        raise ConfigError(
            f"{out} already holds {', '.join(found)}. Choose another output folder, or pass {flag} "
            "to replace them."
        )
