"""Dump activations A at block L over a corpus (one process, or N under `accelerate launch`).

python scripts/dump_activations.py --config configs/dump_quickstart.yaml
accelerate launch --num_processes 2 scripts/dump_activations.py --config ... --model_name_or_path ...
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """Parse the config and run the dump. (``lens-rl dump`` runs the same function.)"""
    from lens_rl.cli.dump import main as dump

    dump(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main(sys.argv[1:])
