"""Launch-time checks shared by the training stages: world size, and which checkpoint to resume.

``accelerate launch --num_processes 2 script.py`` on a machine without GPUs starts ONE process
(accelerate's simple launcher; N CPU processes need ``--multi_gpu`` or a config file with
``distributed_type: MULTI_GPU``, which lens_rl turns into one gloo group). Nothing in the child
says that two were asked for, so :func:`check_world_size` reads the launcher's command line
from ``/proc`` (Linux) and refuses the mismatch instead of training on a silently smaller
world.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch.distributed as dist

from lens_rl.config import ConfigError

_LATEST = {"true", "latest", "last", "yes", "1"}


def _requested_processes(cmdline: list[str]) -> int | None:
    """``--num_processes N`` from an ``accelerate launch`` command line, else None.

    Only the launcher's own options are read (those before the training script or ``-m module``).
    """
    start = next(
        (
            i + 1
            for i, part in enumerate(cmdline[:5])
            if part.endswith("accelerate.commands.launch")
            or (part == "launch" and i > 0 and cmdline[i - 1].endswith("accelerate"))
        ),
        None,
    )
    if start is None:
        return None
    for i in range(start, len(cmdline)):
        part = cmdline[i]
        if (part.endswith(".py") and not part.startswith("-")) or part in ("-m", "--module"):
            break  # the script (or `-m module`) and its own arguments follow
        m = re.fullmatch(r"--num[_-]processes(?:=(\d+))?", part)
        if m:
            value = m.group(1) or (cmdline[i + 1] if i + 1 < len(cmdline) else "")
            return int(value) if value.isdigit() else None
    return None


def check_world_size(world_size: int) -> None:
    """Refuse a run whose launcher asked for more processes than the job has.

    Raises:
        ConfigError: naming both numbers and the flag that fixes it.
    """
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return
    requested = _requested_processes([p.decode(errors="replace") for p in raw.split(b"\0") if p])
    if requested is not None and requested > world_size:
        raise ConfigError(
            f"`accelerate launch --num_processes {requested}` started a job of world size {world_size}: "
            "without GPUs accelerate's plain launcher runs one process. Add --multi_gpu (lens_rl runs "
            "the processes on the CPU over gloo), or use --config_file configs/accelerate/ddp.yaml."
        )


def _deepspeed_problem(path: Path) -> str | None:
    """Why a DeepSpeed checkpoint's engine state is incomplete (None when it is not): the folder
    that ``latest`` names must hold the model states and every rank's optimizer states, none
    empty. (DeepSpeed writes these instead of ``optimizer.pt``.)"""
    tag = (path / "latest").read_text().strip()
    engine = path / tag
    if not tag or not engine.is_dir():
        return f"latest names {tag!r}, which is not a folder"
    for pattern in ("*model_states.pt", "*optim_states.pt"):
        files = sorted(engine.glob(pattern))
        if not files or any(f.stat().st_size == 0 for f in files):
            return f"{tag}/{pattern} is missing or empty"
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete Trainer checkpoint (None when it is): a file missing,
    empty, or (the weights, the trainer state) unreadable, as a kill mid-save leaves it, or
    weights holding NaN/inf (a run that diverged before the save: resuming it would only
    diverge again). A DeepSpeed checkpoint (a ``latest`` file) holds its optimizer in the
    engine's folder."""
    import json

    import torch
    from safetensors import safe_open

    deepspeed = (path / "latest").is_file()
    names = ("trainer_state.json", "model.safetensors", "scheduler.pt")
    for name in names if deepspeed else (*names, "optimizer.pt"):
        f = path / name
        if not f.is_file() or f.stat().st_size == 0:
            return f"{name} is missing or empty"
    if deepspeed and (problem := _deepspeed_problem(path)) is not None:
        return problem
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as e:
        return f"trainer_state.json cannot be read ({e})"
    nonfinite = []
    try:
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)  # one tensor in memory at a time
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    nonfinite.append(key)
    except Exception as e:  # safetensors raises its own error types on truncated files
        return f"model.safetensors cannot be read ({e})"
    if nonfinite:
        more = f" and {len(nonfinite) - 3} more" if len(nonfinite) > 3 else ""
        return (
            f"model.safetensors holds NaN/inf weights (tensor {', '.join(nonfinite[:3])}{more}): the run "
            "had diverged when it was saved"
        )
    return None


def resolve_resume(value: str | bool | None, output_dir: str | Path) -> str | None:
    """The checkpoint folder ``resume_from_checkpoint`` names.

    ``None``/``false``: a fresh run. ``true``/``latest``/``last``: the newest *complete*
    ``checkpoint-N`` under ``output_dir`` (a newer one a kill left half-written, or one whose
    weights hold NaN/inf, is skipped, with a warning naming it and why; an error when there is
    none). Anything else: that folder, which must exist and be complete (see
    :func:`checkpoint_problem`).
    """
    import logging

    if value is None or value is False or (isinstance(value, str) and value.lower() in {"", "false", "no"}):
        return None
    if value is True or (isinstance(value, str) and value.lower() in _LATEST):
        out = Path(output_dir)
        found = sorted(
            (p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()),
            key=lambda p: int(p.name.split("-", 1)[1]),
        )
        for path in reversed(found):
            problem = checkpoint_problem(path)
            if problem is None:
                return str(path)
            logging.getLogger(__name__).warning("skipping incomplete checkpoint %s: %s", path, problem)
        raise ConfigError(
            f"resume_from_checkpoint={value!r}: no complete checkpoint-N folder under {output_dir}"
            + (f" ({len(found)} incomplete)." if found else ".")
        )
    path = Path(value)
    if not path.is_dir():
        raise ConfigError(f"resume_from_checkpoint={value!r} is not a folder.")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ConfigError(f"resume_from_checkpoint={value!r} is not a complete checkpoint: {problem}.")
    return str(path)


def end_process_group() -> None:
    """At the end of a launched job: wait for every rank, then tear the process group down.

    Left to interpreter exit, one rank's gloo teardown can race the other's last collectives
    and abort the process ("terminate called without an active exception", SIGABRT), after the
    job's work is done and saved: seen once in a 2-process supervised run here. A no-op without
    a process group (one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
