"""Command-line flags of the training scripts, parsed the way the scripts parse them.

``scripts/sft_lens.py`` and ``scripts/rl_lens.py`` call ``lens_rl.cli.sft`` / ``lens_rl.cli.grpo``,
which parse the argv and hand the config to ``run_sft`` / ``run_rl``; the tests replace those two
(as the subcommand modules see them) with a function that keeps the config, so the README's command lines are parsed for real without
training.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

import lens_rl.cli.grpo
import lens_rl.cli.sft
from lens_rl.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parsed(monkeypatch, stage: str, argv: list[str], tmp_path: Path):
    """The config that ``scripts/<stage>.py`` builds from the README-style ``argv``."""
    seen = []
    if stage == "sft_lens":
        target, name = lens_rl.cli.sft, "run_sft"
        base = ["--config", "configs/sft_quickstart.yaml", "--val_data", str(tmp_path)]
        monkeypatch.setattr(target, name, lambda cfg: seen.append(cfg) or {"final": {}})
    else:
        target, name = lens_rl.cli.grpo, "run_rl"
        base = ["--config", "configs/rl_quickstart.yaml", "--sft_lens", str(tmp_path / "lens")]
        base += ["--rollout_backend", "hf"]
        monkeypatch.setattr(target, name, lambda cfg: seen.append(cfg) or {})
    paths = ["--model_name_or_path", str(tmp_path), "--train_data", str(tmp_path)]
    paths += ["--output_dir", str(tmp_path / "out")]
    _script(stage).main(base + paths + argv)
    (cfg,) = seen
    return cfg


STAGES = ["sft_lens", "rl_lens"]


SEVERAL = [
    ["--report_to", "wandb", "tensorboard"],  # the README's form
    ["--report_to", "wandb,tensorboard"],
    ["--report_to", "wandb, tensorboard"],
    ["--report_to", "wandb", "tensorboard", "--seed", "3"],  # the list ends at the next flag
]


@pytest.mark.parametrize("stage", STAGES)
def test_report_to_takes_several_trackers(monkeypatch, tmp_path, stage):
    """Space- and comma-separated lists give the same list; ``none``, ``all`` and one name keep
    their transformers meaning."""
    from transformers.integrations import get_available_reporting_integrations

    for argv in SEVERAL:
        assert _parsed(monkeypatch, stage, argv, tmp_path).report_to == ["wandb", "tensorboard"], argv
    assert _parsed(monkeypatch, stage, ["--report_to", "none"], tmp_path).report_to == []
    assert _parsed(monkeypatch, stage, ["--report_to", "tensorboard"], tmp_path).report_to == ["tensorboard"]
    everything = get_available_reporting_integrations()
    assert _parsed(monkeypatch, stage, ["--report_to", "all"], tmp_path).report_to == everything


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize(
    "argv, match",
    [
        pytest.param(
            ["--report_to", "wandb", "tensorbord"],
            r"report_to=\['wandb', 'tensorbord'\]: unknown tracker\(s\) \['tensorbord'\]",
            id="misspelt",
        ),
        pytest.param(
            ["--report_to", "wandb,tensorbord"],
            r"report_to=\['wandb,tensorbord'\]: unknown tracker\(s\) \['tensorbord'\]",
            id="misspelt-comma",
        ),
        pytest.param(
            ["--report_to", "none", "wandb"],
            r"report_to=\['none', 'wandb'\]: 'all' and 'none' cannot be combined",
            id="none-and-a-name",
        ),
    ],
)
def test_report_to_refuses_unknown_trackers_when_parsed(monkeypatch, tmp_path, stage, argv, match):
    with pytest.raises(ConfigError, match=match):
        _parsed(monkeypatch, stage, argv, tmp_path)


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_report_to_from_yaml_list_or_comma_string(tmp_path, stage):
    """A YAML ``report_to`` (a list, or comma-separated names) reaches the config as a list."""
    from lens_rl.config import parse_args
    from lens_rl.training.grpo_config import LensGRPOConfig
    from lens_rl.training.sft_config import LensSFTConfig

    cls = LensSFTConfig if stage == "sft" else LensGRPOConfig
    argv = ["--model_name_or_path", str(tmp_path), "--train_data", str(tmp_path)]
    argv += ["--output_dir", str(tmp_path), "--eval_strategy", "no"]
    for text in ("report_to: [wandb, tensorboard]\n", "report_to: wandb,tensorboard\n"):
        (tmp_path / "c.yaml").write_text(text)
        (cfg,) = parse_args([cls], ["--config", str(tmp_path / "c.yaml"), *argv], typecheck=False)
        assert cfg.report_to == ["wandb", "tensorboard"]


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize(
    "old, new",
    [
        ("lm_natural_prefix", "lm_prefix"),
        ("ref_kl_prefix", "lm_prefix"),
        ("num_explanations", "num_completions_to_print"),
    ],
)
def test_renamed_fields_are_refused_naming_the_new_one(monkeypatch, tmp_path, stage, old, new):
    """A renamed field, as a flag, is refused in both stages with the field that replaces it;
    the new name is accepted."""
    value = "3" if new == "num_completions_to_print" else "prefix:"
    with pytest.raises(ConfigError, match=f"{old} was renamed {new}: set {new}="):
        _parsed(monkeypatch, stage, [f"--{old}", value], tmp_path)
    cfg = _parsed(monkeypatch, stage, [f"--{new}", value], tmp_path)
    assert str(getattr(cfg, new)) == value
