"""``lens-rl``: one command, one subcommand per stage.

    lens-rl dump    --config dump_quickstart.yaml --model_name_or_path MODEL_DIR --output_dir OUT
    lens-rl sft     --config sft_quickstart.yaml  --model_name_or_path MODEL_DIR --train_data ... --output_dir OUT
    lens-rl grpo    --config rl_quickstart.yaml   --model_name_or_path MODEL_DIR --sft_lens OUT/lens ...
    lens-rl probe   --config probe_quickstart.yaml --output_dir OUT
    lens-rl explain --lens OUT/lens --text "..." --output_dir OUT/explain
    lens-rl demo    (the quickstart: pretrain a small base, dump, SFT, GRPO, explanations page)

The training subcommands work under ``accelerate launch`` through the module form::

    accelerate launch -m lens_rl.cli sft --config sft_quickstart.yaml ...
    accelerate launch --multi_gpu --num_processes 2 -m lens_rl.cli grpo ...

(``accelerate launch scripts/sft_lens.py ...`` runs the same code.) ``--config NAME.yaml``
that is not a file in the working directory is looked up among the configs shipped with the
package (``lens_rl/configs``, the repository's ``configs/``), so the README's commands work
from an installed wheel too. ``lens-rl SUBCOMMAND --help`` lists a subcommand's flags.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROG = "lens-rl"


def packaged_config(name: str) -> Path:
    """The path of a config shipped with the package (``lens_rl/configs/<name>``)."""
    from importlib.resources import files

    return Path(str(files("lens_rl") / "configs" / name))


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


def dump(argv: list[str]) -> dict[str, Path]:
    """Dump activations (``DumpConfig``); returns the split folders."""
    from lens_rl.config import parse_args
    from lens_rl.data.dump import DumpConfig, run_dump

    (cfg,) = parse_args([DumpConfig], resolve_config(argv))
    splits = run_dump(cfg)
    for split, path in splits.items():
        print(f"{split}: {path}")  # noqa: T201 - the command's output
    return splits


def sft(argv: list[str]) -> dict[str, float]:
    """Supervised lens training (``LensSFTConfig``); returns the final evaluation."""
    from lens_rl.config import parse_args
    from lens_rl.training.sft_config import LensSFTConfig
    from lens_rl.training.sft_trainer import run_sft

    (cfg,) = parse_args([LensSFTConfig], resolve_config(argv), typecheck=False)
    return run_sft(cfg)["final"]


def grpo(argv: list[str]) -> dict[str, Any]:
    """GRPO fine-tuning on TRL (``LensGRPOConfig``); returns metrics before and after."""
    from lens_rl.config import parse_args
    from lens_rl.training.grpo_config import LensGRPOConfig
    from lens_rl.training.rl_stage import run_rl

    (cfg,) = parse_args([LensGRPOConfig], resolve_config(argv), typecheck=False)
    return run_rl(cfg)


def probe(argv: list[str]) -> dict[str, Any]:
    """The entropy probe (``EntropyProbeConfig``); returns its results."""
    from lens_rl.config import parse_args
    from lens_rl.probe.config import EntropyProbeConfig
    from lens_rl.probe.runner import run_entropy_probe

    (cfg,) = parse_args([EntropyProbeConfig], resolve_config(argv))
    return run_entropy_probe(cfg)


def explain(argv: list[str]) -> Any:
    """Explain text with a saved lens (JSONL, table, HTML page)."""
    from lens_rl.explanations import main

    return main(argv)


def demo(argv: list[str]) -> int:
    """The quickstart (``make demo``)."""
    from lens_rl.quickstart import main

    return main(argv)


COMMANDS: dict[str, tuple[Callable[[list[str]], Any], str]] = {
    "dump": (dump, "dump activations A after block L over a corpus (resumable; N processes)"),
    "sft": (sft, "train a lens supervised on transformers.Trainer (accelerate launch -m lens_rl.cli sft)"),
    "grpo": (grpo, "fine-tune a lens with GRPO on TRL (accelerate launch -m lens_rl.cli grpo)"),
    "probe": (probe, "entropy probe: predicted vs measured entropy change of one GRPO update"),
    "explain": (explain, "explain text with a saved lens: explanations.jsonl, a table, explanations.html"),
    "demo": (demo, "the quickstart, offline on CPU: base model, dump, SFT, GRPO, explanations"),
}


def usage() -> str:
    """The top-level help: the subcommands and how to launch them."""
    width = max(map(len, COMMANDS))
    lines = [
        f"usage: {PROG} {{{','.join(COMMANDS)}}} [flags]   ({PROG} SUBCOMMAND --help for its flags)",
        "",
        "Consistency lenses (activation -> text -> activation), trained supervised then with RL on TRL.",
        "",
        "subcommands:",
        *(f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()),
        "",
        "Training under N processes: accelerate launch [--multi_gpu --num_processes N] -m lens_rl.cli sft ...",
        "A --config that is not a file here is looked up among the shipped configs (e.g. sft_quickstart.yaml).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``argv[0]`` to its subcommand; 0 on success."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())  # noqa: T201
        return 0
    if argv[0] in ("-V", "--version"):
        from lens_rl import __version__

        print(f"{PROG} {__version__}")  # noqa: T201
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"{PROG}: unknown subcommand {name!r}; choose one of {', '.join(COMMANDS)}.\n", file=sys.stderr)  # noqa: T201
        print(usage(), file=sys.stderr)  # noqa: T201
        return 2
    prog, sys.argv[0] = sys.argv[0], f"{PROG} {name}"  # what the subcommand's --help and errors say
    try:
        result = COMMANDS[name][0](rest)
    finally:
        sys.argv[0] = prog
    return int(result) if name == "demo" and isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
