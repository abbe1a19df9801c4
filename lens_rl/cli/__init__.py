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

One module per subcommand (``lens_rl/cli/<name>.py``, each with ``main(argv)``); the quickstart
(``demo``) and its base model's pretraining recipe (``pretrain``) live here too.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from lens_rl.cli.common import PROG
from lens_rl.config import InputError
from lens_rl.version import __version__

# subcommand -> (its module, one line of help). A subcommand's module is imported only when it
# runs, so `lens-rl --help` imports no torch.
COMMANDS: dict[str, tuple[str, str]] = {
    "dump": ("lens_rl.cli.dump", "dump activations A after block L over a corpus (resumable; N processes)"),
    "sft": (
        "lens_rl.cli.sft",
        "train a lens supervised on transformers.Trainer (accelerate launch -m lens_rl.cli sft)",
    ),
    "grpo": ("lens_rl.cli.grpo", "fine-tune a lens with GRPO on TRL (accelerate launch -m lens_rl.cli grpo)"),
    "probe": ("lens_rl.cli.probe", "entropy probe: predicted vs measured entropy change of one GRPO update"),
    "explain": (
        "lens_rl.cli.explain",
        "explain text with a saved lens: explanations.jsonl, a table, explanations.html",
    ),
    "demo": ("lens_rl.cli.demo", "the quickstart, offline on CPU: base model, dump, SFT, GRPO, explanations"),
}


def run(name: str, argv: list[str]) -> Any:
    """Run subcommand ``name`` on ``argv`` (its module's ``main``); returns what it returns."""
    return importlib.import_module(COMMANDS[name][0]).main(argv)


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
        print(f"{PROG} {__version__}")  # noqa: T201
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"{PROG}: unknown subcommand {name!r}; choose one of {', '.join(COMMANDS)}.\n", file=sys.stderr)  # noqa: T201
        print(usage(), file=sys.stderr)  # noqa: T201
        return 2
    prog, sys.argv[0] = sys.argv[0], f"{PROG} {name}"  # what the subcommand's --help and errors say
    try:
        result = run(name, rest)
    except (InputError, FileNotFoundError) as e:  # a bad flag, value or file: the message names it
        print(f"{PROG} {name}: error: {e}", file=sys.stderr)  # noqa: T201
        return 2
    finally:
        sys.argv[0] = prog
    return int(result) if name == "demo" and isinstance(result, int) else 0
