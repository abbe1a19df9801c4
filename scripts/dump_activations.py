"""Dump activations A at block L over a corpus (one process, or N under `accelerate launch`).

python scripts/dump_activations.py --config configs/dump_quickstart.yaml
accelerate launch --num_processes 2 scripts/dump_activations.py --config ... --model_name_or_path ...
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """Parse the config and run the dump."""
    from lens_rl.config import parse_args
    from lens_rl.data.dump import DumpConfig, run_dump

    (cfg,) = parse_args([DumpConfig], argv)
    for split, path in run_dump(cfg).items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
