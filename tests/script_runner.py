"""Run a project script under the real `accelerate launch` (1 process, or N CPU processes over gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def accelerate_launch(
    script: str,
    args: list[str],
    num_processes: int = 1,
    port: int = 29531,
    timeout: int = 600,
    expect_success: bool = True,
    env: dict[str, str] | None = None,
    deepspeed_zero: int | None = None,
    gradient_accumulation_steps: int = 1,
    config_file: Path | None = None,
) -> subprocess.CompletedProcess:
    """Launch ``scripts/<script>`` and assert it exits 0 (the tail of stderr is the message), or
    with ``expect_success=False`` that it exits non-zero. ``env`` adds environment variables;
    ``deepspeed_zero`` launches under DeepSpeed at that ZeRO stage (accelerate's own flags;
    gradient clipping 1.0 and ``gradient_accumulation_steps`` as the script's must match);
    ``config_file`` launches with that accelerate config (from the repository root, in fp32: the
    flags here override its ``mixed_precision``)."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    if config_file is not None:
        cmd += ["--config_file", str(config_file), "--num_processes", str(num_processes)]
        cmd += ["--main_process_port", str(port)]
    elif deepspeed_zero is not None:  # on a CPU machine DeepSpeed's CPU accelerator runs over gloo
        cmd += ["--use_deepspeed", "--zero_stage", str(deepspeed_zero), "--gradient_clipping", "1.0"]
        cmd += ["--gradient_accumulation_steps", str(gradient_accumulation_steps)]
        cmd += [
            "--offload_optimizer_device",
            "none",
            "--offload_param_device",
            "none",
            "--zero3_init_flag",
            "false",
        ]
        cmd += ["--num_processes", str(num_processes), "--main_process_port", str(port)]
    elif num_processes > 1:  # on a CPU machine lens_rl turns these into one gloo group
        cmd += ["--multi_gpu", "--num_processes", str(num_processes), "--main_process_port", str(port)]
    else:
        cmd += ["--num_processes", "1"]
    env = os.environ | {"OMP_NUM_THREADS": "1"} | (env or {})
    res = subprocess.run(
        [*cmd, str(ROOT / "scripts" / script), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )
    if expect_success:
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    else:
        assert res.returncode != 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res
