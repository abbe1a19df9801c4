"""Files a user hands to lens_rl are data, never code.

``lens-rl probe --trl_checkpoint DIR`` reads a run's pickles (``training_args.bin``,
``scheduler.pt``). A crafted pickle (an object whose ``__reduce__`` returns ``os.system``) must
be refused with an error naming the file, and its command must not run.
"""

from __future__ import annotations

import ast
import builtins
import json
import os
import re
from pathlib import Path

import pytest
import torch

from lens_rl.config import parse_args
from lens_rl.probe.from_run import RUN_ARGS_GLOBALS, load_untrusted, next_step_learning_rates, read_run
from lens_rl.training.grpo_config import LensGRPOConfig

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [
    p for folder in ("lens_rl", "scripts", "benchmarks") for p in sorted((ROOT / folder).rglob("*.py"))
]


class Payload:
    """Unpickles as ``func(*args)``: what a crafted checkpoint file would run."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payloads(marker: Path) -> dict[str, Payload]:
    """Ways a pickle could run code; each creates ``marker`` when it runs."""
    return {
        "os.system": Payload(os.system, f"touch '{marker}'"),
        "builtins.exec": Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
    }


def genuine_args(tmp_path: Path) -> LensGRPOConfig:
    """A lens GRPO run's arguments, parsed as scripts/rl_lens.py parses them."""
    argv = {
        "model_name_or_path": tmp_path,
        "train_data": tmp_path,
        "output_dir": tmp_path / "rl",
        "max_steps": 2,
        "lr_scheduler_type": "linear",
        "t_text": 4,
        "num_generations": 4,
        "per_device_train_batch_size": 8,
        "rollout_backend": "hf",
        "report_to": "none",
    }
    (cfg,) = parse_args(
        [LensGRPOConfig], [x for k, v in argv.items() for x in (f"--{k}", str(v))], typecheck=False
    )
    return cfg


def checkpoint(tmp_path: Path, training_args, scheduler) -> Path:
    """A ``checkpoint-1`` folder with the given pickles and dummy other files."""
    ckpt = tmp_path / "run" / "checkpoint-1"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 1, "max_steps": 2}))
    (ckpt / "model.safetensors").write_bytes(b"dummy")
    torch.save({"state": {}, "param_groups": []}, ckpt / "optimizer.pt")
    torch.save(training_args, ckpt / "training_args.bin")
    torch.save(scheduler, ckpt / "scheduler.pt")
    return ckpt


SCHEDULER = {"base_lrs": [1e-2], "last_epoch": 1, "_step_count": 2, "_last_lr": [5e-3], "lr_lambdas": [None]}


def test_no_unsafe_deserialisation_in_the_sources():
    """No ``weights_only=False`` and no pickle module in lens_rl/, scripts/, benchmarks/; every
    ``torch.load`` passes ``weights_only=True`` explicitly."""
    assert SOURCES, "no sources found"
    banned = re.compile(
        r"weights_only\s*=\s*False|\bimport\s+pickle\b|\bfrom\s+pickle\s+import\b|\bpickle\.load"
    )
    found = [
        f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
        for p in SOURCES
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if banned.search(line)
    ]
    for p in SOURCES:
        for node in ast.walk(ast.parse(p.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                flag = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    found.append(f"{p.relative_to(ROOT)}:{node.lineno}: torch.load without weights_only=True")
    assert not found, "unsafe deserialisation:\n" + "\n".join(found)


@pytest.mark.parametrize("how", ["os.system", "builtins.exec"])
def test_crafted_training_args_bin_is_refused_and_does_not_run(tmp_path, how):
    marker = tmp_path / "pwned"
    ckpt = checkpoint(tmp_path, payloads(marker)[how], SCHEDULER)
    with pytest.raises(ValueError) as err:
        read_run(ckpt.parent)
    assert not marker.exists(), f"the {how} payload in training_args.bin ran"
    err.match(rf"^{re.escape(str(ckpt / 'training_args.bin'))}: refused to load it \(it refers to ")
    assert "weights_only` set to `False`" not in str(err.value)  # torch's advice is not passed on


def test_payload_inside_a_genuine_config_is_refused(tmp_path):
    """Allowlisted outer classes do not let a nested payload through."""
    marker = tmp_path / "pwned"
    args = genuine_args(tmp_path)
    args.decoder = payloads(marker)["os.system"]
    ckpt = checkpoint(tmp_path, args, SCHEDULER)
    with pytest.raises(ValueError) as err:
        read_run(ckpt)
    assert not marker.exists(), "the payload in the config's decoder field ran"
    err.match(r"training_args\.bin: refused to load it \(it refers to posix\.system, which is not allowed\)")


@pytest.mark.parametrize("how", ["os.system", "builtins.exec"])
def test_crafted_scheduler_pt_is_refused_and_does_not_run(tmp_path, how):
    marker = tmp_path / "pwned"
    args = genuine_args(tmp_path)
    ckpt = checkpoint(tmp_path, args, payloads(marker)[how])
    for call in (lambda: read_run(ckpt), lambda: next_step_learning_rates(ckpt, args, 1, 2)):
        with pytest.raises(ValueError) as err:
            call()
        assert not marker.exists(), f"the {how} payload in scheduler.pt ran"
        err.match(rf"^{re.escape(str(ckpt / 'scheduler.pt'))}: refused to load it \(it refers to ")


def test_malformed_files_are_refused_naming_the_file(tmp_path):
    (tmp_path / "training_args.bin").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"training_args\.bin: refused to load it"):
        load_untrusted(tmp_path / "training_args.bin", RUN_ARGS_GLOBALS)
    ckpt = checkpoint(tmp_path, {"t_text": 4}, SCHEDULER)
    with pytest.raises(ValueError, match=r"training_args\.bin is a dict, not a lens GRPO run's config"):
        read_run(ckpt)


def test_the_allowlist_is_exactly_what_a_run_s_arguments_hold(tmp_path):
    """``RUN_ARGS_GLOBALS`` names exactly the globals of a pickled ``LensGRPOConfig``, which
    loads back with its values (``accelerate``'s process state as a plain stand-in)."""
    args = genuine_args(tmp_path)
    torch.save(args, tmp_path / "training_args.bin")
    written = set(torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "training_args.bin"))
    allowed = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in RUN_ARGS_GLOBALS}
    legacy = {"lens_rl.models.decoder.DecoderConfig", "lens_rl.models.encoder.EncoderConfig"}
    assert written == allowed - legacy
    loaded = load_untrusted(tmp_path / "training_args.bin", RUN_ARGS_GLOBALS)
    assert isinstance(loaded, LensGRPOConfig)
    assert (loaded.t_text, loaded.lr_scheduler_type, loaded.num_generations) == (4, args.lr_scheduler_type, 4)
    assert loaded.decoder_config == args.decoder_config and loaded.policy == args.policy
    assert loaded.get_warmup_steps(2) == args.get_warmup_steps(2)
    assert loaded.distributed_state.num_processes == 1


def test_a_checkpoint_written_before_the_configs_moved_loads(tmp_path, monkeypatch):
    """Runs saved when DecoderConfig/EncoderConfig lived in lens_rl.models.decoder/encoder name
    those paths in their training_args.bin; the allowlist accepts them (and only them)."""
    from lens_rl.models.configuration import DecoderConfig, EncoderConfig

    args = genuine_args(tmp_path)
    monkeypatch.setattr(DecoderConfig, "__module__", "lens_rl.models.decoder")
    monkeypatch.setattr(EncoderConfig, "__module__", "lens_rl.models.encoder")
    torch.save(args, tmp_path / "training_args.bin")
    monkeypatch.undo()
    written = set(torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "training_args.bin"))
    assert {"lens_rl.models.decoder.DecoderConfig", "lens_rl.models.encoder.EncoderConfig"} <= written
    loaded = load_untrusted(tmp_path / "training_args.bin", RUN_ARGS_GLOBALS)
    assert loaded.decoder_config == args.decoder_config
