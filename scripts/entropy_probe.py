"""Entropy probe: predict how one GRPO update changes the policy's entropy and check the
prediction against an importance-sampled ground truth.

    python scripts/entropy_probe.py --config configs/probe_quickstart.yaml \
        --model_name_or_path .cache/lens_rl/base-llama-d128 --output_dir outputs/probe

Writes results.json, config.json and probe.png to --output_dir and prints a summary table.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> dict:
    """Parse the config and run the probe; returns the results. (``lens-rl probe`` runs the same function.)"""
    from lens_rl.cli.probe import main as probe

    return probe(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main(sys.argv[1:])
