"""What every subcommand shares: the program name and the ``--config`` lookup among the shipped
configs."""

from __future__ import annotations

from pathlib import Path

from lens_rl.config import packaged_config

PROG = "lens-rl"


def resolve_config(argv: list[str]) -> list[str]:
    """``argv`` with a ``--config`` that names no file here replaced by the shipped config of
    that name (``configs/sft_quickstart.yaml`` or ``sft_quickstart.yaml``), when there is one."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            j, value = i + 1, argv[i + 1]
        elif arg.startswith("--config="):
            j, value = i, arg.split("=", 1)[1]
        else:
            continue
        if not Path(value).exists():
            shipped = packaged_config(Path(value).as_posix().removeprefix("configs/"))
            if shipped.is_file():
                argv[j] = str(shipped) if j == i + 1 else f"--config={shipped}"
        break
    return argv
