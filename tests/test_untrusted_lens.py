"""A lens folder, a checkpoint and a model path are untrusted input (issue 24).

Every file is checked on load and every refusal names the file and the field or tensor:
non-finite or truncated lens weights, sidecar fields of the wrong type, activation statistics
that cannot normalise anything (and a lens without them is refused for explaining, never scored
against the explained text's own mean), a checkpoint whose weights diverged (skipped on resume),
a model path that is not a folder (no Hub lookup). The base fingerprint is the same for an fp32,
bf16 or fp16 load; an exact resume warns about nothing and says where it resumed from.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lens_rl.config import ConfigError
from lens_rl.models.families import load_causal_lm
from lens_rl.models.fingerprint import base_fingerprint, base_fingerprints
from lens_rl.models.lens import LENS_CONFIG, LENS_WEIGHTS, ConsistencyLens, LensFileError
from lens_rl.reading import explain
from lens_rl.testing.configs import tiny_grpo_config, tiny_sft_config
from lens_rl.training.sft_trainer import build_sft, run_sft
from lens_rl.utils.launch import resolve_resume

TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def lens_dir(tiny_model_dir, tiny_dump, tmp_path_factory):
    """An untrained lens saved by the supervised stage's own code (read-only: tests copy it)."""
    out = tmp_path_factory.mktemp("untrusted-lens")
    build_sft(tiny_sft_config(tiny_model_dir, tiny_dump, out / "run")).lens.save_pretrained(out / "lens")
    return out / "lens"


def _copy(lens_dir, tmp_path):
    dst = tmp_path / "lens"
    shutil.copytree(lens_dir, dst)
    return dst


def _edit_meta(lens, **fields):
    cfg = json.loads((lens / LENS_CONFIG).read_text())
    for k, v in fields.items():
        if v is None:
            cfg["meta"].pop(k, None)
        else:
            cfg["meta"][k] = v
    (lens / LENS_CONFIG).write_text(json.dumps(cfg))


@pytest.mark.parametrize(("part", "value"), [("decoder", float("nan")), ("encoder", float("inf"))])
def test_nonfinite_lens_weights_are_refused_naming_the_tensor(lens_dir, tmp_path, part, value):
    lens = _copy(lens_dir, tmp_path)
    sd = load_file(str(lens / LENS_WEIGHTS))
    key = next(k for k in sorted(sd) if k.startswith(f"{part}.") and sd[k].is_floating_point())
    sd[key].view(-1)[0] = value
    save_file(sd, str(lens / LENS_WEIGHTS))
    with pytest.raises(LensFileError, match=rf"{lens / LENS_WEIGHTS}: .*NaN/inf.*{key} \(1 of"):
        ConsistencyLens.from_pretrained(lens)


def test_truncated_lens_weights_are_named(lens_dir, tmp_path):
    lens = _copy(lens_dir, tmp_path)
    data = (lens / LENS_WEIGHTS).read_bytes()
    (lens / LENS_WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(
        LensFileError, match=rf"{lens / LENS_WEIGHTS} cannot be read: it is truncated or corrupt"
    ):
        ConsistencyLens.from_pretrained(lens)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda cfg: "{not json", "is not valid JSON"),
        (lambda cfg: cfg | {"meta": [1, 2]}, "field 'meta' must be an object, got list"),
        (
            lambda cfg: cfg | {"meta": cfg["meta"] | {"layer": "1"}},
            "field 'meta.layer' must be an integer >= 0, got str",
        ),
        (
            lambda cfg: cfg | {"meta": cfg["meta"] | {"t_text": 0}},
            "field 'meta.t_text' must be an integer >= 1",
        ),
        (
            lambda cfg: cfg | {"meta": cfg["meta"] | {"model_dtype": "float64"}},
            "field 'meta.model_dtype' must be one of",
        ),
        (
            lambda cfg: cfg | {"meta": cfg["meta"] | {"model_dtype": 16}},
            "field 'meta.model_dtype' must be a string",
        ),
        (
            lambda cfg: cfg | {"meta": cfg["meta"] | {"model_name_or_path": ["m"]}},
            "'meta.model_name_or_path' must be a string",
        ),
        (
            lambda cfg: cfg | {"decoder": ["prompt"]},
            "field 'decoder' must be an object of DecoderConfig options, got list",
        ),
        (
            lambda cfg: cfg | {"encoder": cfg["encoder"] | {"depth": 3}},
            r"field 'encoder' has unknown option\(s\) \['depth'\]",
        ),
        (
            lambda cfg: cfg | {"decoder": cfg["decoder"] | {"trainable_base": "yes"}},
            "field 'decoder': DecoderConfig.trainable_base",
        ),
        (lambda cfg: cfg | {"format_version": 99}, "format_version 99 was written by a newer lens_rl"),
    ],
    ids=[
        "json",
        "meta-list",
        "layer-str",
        "t_text-0",
        "dtype-unknown",
        "dtype-int",
        "path-list",
        "decoder-list",
        "encoder-unknown-key",
        "decoder-bad-type",
        "newer-format",
    ],
)
def test_sidecar_fields_are_checked_naming_file_and_field(lens_dir, tmp_path, edit, match):
    lens = _copy(lens_dir, tmp_path)
    cfg = edit(json.loads((lens / LENS_CONFIG).read_text()))
    (lens / LENS_CONFIG).write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    with pytest.raises(LensFileError, match=match) as e:
        ConsistencyLens.from_pretrained(lens)
    assert str(lens / LENS_CONFIG) in str(e.value)


def test_statistics_and_layer_are_checked_against_the_base(lens_dir, tmp_path):
    """Wrong length (another model's: once broadcast), NaN, all-zero or negative variances
    (NMSE nan/inf/negative), one statistic without the other, a layer past the base's blocks."""
    lens = _copy(lens_dir, tmp_path)
    meta = json.loads((lens / LENS_CONFIG).read_text())["meta"]
    d = len(meta["train_var"])
    nan = float("nan")
    cases = [
        ({"train_mean": meta["train_mean"][:64]}, r"'meta.train_mean' has shape \(64,\).*hidden size is 128"),
        ({"train_var": [1.0]}, r"'meta.train_var' has shape \(1,\)"),
        ({"train_var": [nan] + meta["train_var"][1:]}, "'meta.train_var' holds 1 NaN/inf"),
        ({"train_var": [0.0] * d}, r"'meta.train_var' must be variances .* mean 0"),
        ({"train_var": [-1.0] + meta["train_var"][1:]}, "'meta.train_var' must be variances .* 1 negative"),
        ({"train_var": None}, "'meta.train_mean' is recorded but 'meta.train_var' is not"),
        ({"train_mean": ["a"] * d}, "'meta.train_mean' must be a list of numbers"),
        ({"layer": 2}, r"'meta.layer' is 2, but the base has 2 blocks"),
    ]
    for fields, match in cases:
        _edit_meta(lens, **meta)
        _edit_meta(lens, **fields)
        with pytest.raises(LensFileError, match=match) as e:
            ConsistencyLens.from_pretrained(lens)
        assert str(lens / LENS_CONFIG) in str(e.value)


def test_a_lens_without_statistics_is_refused_for_explaining(lens_dir, tmp_path):
    """No fallback normaliser: its FVE (-6.8e14 on a real lens) depended on which positions
    were asked. The refusal names the sidecar, the fields and how to record them."""
    lens_path = _copy(lens_dir, tmp_path)
    _edit_meta(lens_path, train_mean=None, train_var=None)
    lens = ConsistencyLens.from_pretrained(lens_path)  # loads (for inspection)
    with pytest.raises(ValueError, match=rf"{lens_path / LENS_CONFIG} records no activation statistics"):
        explain(lens, TEXT, positions="last", k=1)
    good = ConsistencyLens.from_pretrained(lens_dir)
    assert explain(good, TEXT, positions="last", k=1)[0]["normaliser"] == "train_mean"


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "gemma2", "gpt_neox"])
def test_fingerprint_is_the_same_in_fp32_bf16_and_fp16(tiny_model_factory, arch):
    """fp32 -> fp16 -> bf16 rounds twice (one bf16 step off at fp16 ties, ~1 value in 16) and
    fp16 loses bits below 2**-14: the fp16 values it cannot settle are read from the files.
    Another seed (same shapes) stays distinct; the older fp16 fingerprint is still accepted."""
    path = tiny_model_factory(arch, n_layers=2, seed=0).name_or_path_on_disk
    loads = {dt: load_causal_lm(path, dtype=dt) for dt in (torch.float32, torch.bfloat16, torch.float16)}
    fps = {dt: base_fingerprint(m) for dt, m in loads.items()}
    assert len(set(fps.values())) == 1, fps
    legacy = base_fingerprint(loads[torch.float16], resolve_fp16=False)
    assert legacy != fps[torch.float32]  # the double rounding this fixes
    assert base_fingerprints(loads[torch.float16]) == (fps[torch.float32], legacy)
    other = tiny_model_factory(arch, n_layers=2, seed=1).name_or_path_on_disk
    assert base_fingerprint(load_causal_lm(other, dtype=torch.float16)) != fps[torch.float32]


def test_fp16_training_accepts_the_fp32_dump_of_the_same_model(
    tiny_model_dir, tiny_dump, tiny_model_other_weights_dir
):
    """`--model_dtype float16` on the same model's dump is not "another model's activations"."""
    from lens_rl.data.dataset import ActivationDataset, DumpError

    train = ActivationDataset(tiny_dump["train"])
    fp16 = load_causal_lm(tiny_model_dir, dtype=torch.float16)
    train.check_compatible(fp16.get_input_embeddings().weight.shape[1], model=fp16)
    other = load_causal_lm(tiny_model_other_weights_dir, dtype=torch.float16)
    with pytest.raises(DumpError, match="not from the model given"):
        train.check_compatible(other.get_input_embeddings().weight.shape[1], model=other)


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir, tiny_dump, tmp_path_factory):
    """A 2-step supervised run with checkpoint-1 and checkpoint-2 (read-only: tests copy it)."""
    out = tmp_path_factory.mktemp("sft-run") / "o"
    run_sft(tiny_sft_config(tiny_model_dir, tiny_dump, out, save_strategy="steps", save_steps=1))
    return out


def test_a_checkpoint_with_nonfinite_weights_is_skipped_on_resume(sft_run, tmp_path, caplog):
    """A NaN checkpoint-2 is not taken as complete (resuming it would diverge at once, blamed on
    the learning rate): `true` falls back to checkpoint-1 naming checkpoint-2 and the tensor;
    naming checkpoint-2 explicitly is an error naming both."""
    out = tmp_path / "o"
    shutil.copytree(sft_run, out)
    weights = out / "checkpoint-2" / "model.safetensors"
    sd = load_file(str(weights))
    key = sorted(sd)[0]
    sd[key].view(-1)[0] = float("nan")
    save_file(sd, str(weights), metadata={"format": "pt"})
    with caplog.at_level("WARNING"):
        assert resolve_resume("true", out) == str(out / "checkpoint-1")
    assert "checkpoint-2" in caplog.text and f"NaN/inf weights (tensor {key})" in caplog.text
    with pytest.raises(ConfigError, match=rf"checkpoint-2.*NaN/inf weights \(tensor {key}\)"):
        resolve_resume(str(out / "checkpoint-2"), out)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _transformers_warnings():
    """Collects the warnings of transformers' loggers (which do not propagate to the root)."""
    handler = _Records()
    logging.getLogger("transformers").addHandler(handler)
    return handler


def test_sft_resume_is_exact_without_a_missing_keys_warning(
    sft_run, tiny_model_dir, tiny_dump, tmp_path, capsys
):
    out = tmp_path / "o"
    shutil.copytree(sft_run, out)
    shutil.rmtree(out / "checkpoint-2")
    capsys.readouterr()
    handler = _transformers_warnings()
    try:
        cfg = tiny_sft_config(
            tiny_model_dir, tiny_dump, out, save_strategy="steps", save_steps=1, resume_from_checkpoint="true"
        )
        assert run_sft(cfg)["trainer"].state.global_step == 2
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert f"resuming from {out / 'checkpoint-1'} (step 1)" in capsys.readouterr().out
    assert not [m for m in handler.messages if "missing keys" in m], handler.messages


def test_grpo_resume_says_where_and_warns_about_nothing(tiny_model_dir, tiny_dump, tmp_path, capsys):
    from lens_rl.training.rl_stage import run_rl

    def cfg(**kw):
        return tiny_grpo_config(
            tiny_model_dir,
            tiny_dump,
            tmp_path / "rl",
            t_text=3,
            logging_steps=10,
            save_strategy="steps",
            save_steps=1,
            explain_texts=0,
            seed=42,
            **kw,
        )

    run_rl(cfg(max_steps=1))
    capsys.readouterr()
    handler = _transformers_warnings()
    try:
        res = run_rl(cfg(max_steps=2, resume_from_checkpoint="true"))
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert max(h.get("step", 0) for h in res["log_history"]) == 2
    assert f"resuming from {tmp_path / 'rl' / 'checkpoint-1'} (step 1)" in capsys.readouterr().out
    assert not [m for m in handler.messages if "missing keys" in m], handler.messages


def test_a_model_path_that_is_not_a_folder_is_an_error_without_hub_lookup(tiny_dump, tmp_path, monkeypatch):
    """`models/my-base` (missing) fails naming it before any from_pretrained (which would ask the
    Hub), in load_causal_lm, the supervised stage and the dump; a lens recording a Hub-like base
    id names it too."""
    import transformers

    from lens_rl.data.dump import DumpConfig, run_dump

    def no_hub(*args, **kwargs):
        raise AssertionError(f"from_pretrained called: {args}")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_hub)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_hub)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_hub)
    monkeypatch.chdir(tmp_path)
    match = r"model_name_or_path 'models/my-base' is not an existing folder.*makes no Hub downloads"
    with pytest.raises(FileNotFoundError, match=match):
        load_causal_lm("models/my-base")
    with pytest.raises(FileNotFoundError, match=match):
        build_sft(tiny_sft_config("models/my-base", tiny_dump, tmp_path / "o"))
    cfg = DumpConfig(model_name_or_path="models/my-base", corpus="pydoc", output_dir=str(tmp_path / "d"))
    with pytest.raises(FileNotFoundError, match=match):
        run_dump(cfg)
    (tmp_path / "lens").mkdir()
    (tmp_path / "lens" / LENS_CONFIG).write_text(
        json.dumps({"decoder": {}, "encoder": {}, "meta": {"model_name_or_path": "org/model"}})
    )
    save_file({}, str(tmp_path / "lens" / LENS_WEIGHTS))
    with pytest.raises(FileNotFoundError, match="base model folder org/model, which does not exist here"):
        ConsistencyLens.from_pretrained(tmp_path / "lens")
