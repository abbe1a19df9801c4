"""Output folders of the one-shot commands (``lens-rl explain``, the entropy probe): a folder
that already holds their files is refused before any work, unless overwriting is asked for.

The training stages lock and check their folders themselves
(:func:`lens_rl.training.guards.claim_output_dir`); these commands write a few named files, so
the check is on those names: pointing ``explain`` at a training run's folder would otherwise
replace the run's own ``explanations.html`` without a word.

:func:`lock_output_dir` is the folder lock both take: an exclusive ``flock`` on
``<output_dir>/.lens_rl.lock`` held for the life of the command, so a second command into the
same folder (a training run, ``explain``) is refused instead of mixing or losing outputs. The
OS drops the lock when the process dies, even on kill -9.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterable
from pathlib import Path
from typing import IO

from lens_rl.config import ConfigError

LOCK_FILE = ".lens_rl.lock"


def lock_output_dir(output_dir: str | Path) -> IO:
    """Create ``output_dir`` and lock it for this process; return the lock's file object (keep
    it referenced; ``close()`` releases the lock).

    Raises:
        ConfigError: another process holds the folder (the message names it).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = (out / LOCK_FILE).open("a")
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        lock.close()
        raise ConfigError(f"{out} is in use by another run (it holds {out / LOCK_FILE}).") from e
    return lock


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
