"""What both training stages (``run_sft``, ``run_rl``) do around their trainer.

- :func:`claimed_stage`: resolve the checkpoint to resume, start the process state, claim
  ``output_dir`` (the main process first; a refusal is raised on every process), and run the
  stage as one tracker run; the folder lock is released on leaving;
- :func:`load_stage_inputs`: the tokenizer, the original model and the activation splits
  (dumps checked against the model, or ``on_the_fly`` windows with live activations) with the
  layer and the training statistics (:class:`StageInputs`);
- :func:`stage_lens`: the lens, loaded from ``sft_lens`` (its :class:`LensConfig` brought up to
  this stage) or built fresh with a new sidecar (:func:`lens_meta`);
- :func:`checkpoint_step`: the optimizer step a resumed checkpoint reached.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lens_rl.config import parse_args
from lens_rl.data.dataset import ActivationDataset, OnTheFlyDataset
from lens_rl.data.dump import DumpConfig, dump_windows
from lens_rl.models.configuration import LensConfig
from lens_rl.models.hooks import resolve_layer
from lens_rl.models.lens import ConsistencyLens, base_record
from lens_rl.models.orig import OrigWrapper
from lens_rl.training.guards import claim_output_dir, main_then_all
from lens_rl.training.sharded import whole_models
from lens_rl.training.trackers import stage_run
from lens_rl.utils.launch import resolve_resume


@contextmanager
def claimed_stage(cfg, make_state: Callable[[], Any]) -> Iterator[tuple[Any, str | None]]:
    """Yield ``(state, resume)``: the process state ``make_state`` starts (after the checkpoint
    to resume is resolved, before the folder is claimed) and the checkpoint folder to resume
    (None: a fresh run). ``output_dir`` is this run's until the block returns (or fails), then
    free for a resume in-process; the block is one tracker run."""
    resume = resolve_resume(cfg.resume_from_checkpoint, cfg.output_dir)
    state = make_state()
    lock = main_then_all(
        lambda: claim_output_dir(cfg.output_dir, resume is not None, cfg.overwrite_output_dir), state
    )
    try:
        with stage_run():  # one stage, one tracker run
            yield state, resume
    finally:
        if lock is not None:
            lock.close()


def checkpoint_step(resume: str) -> int:
    """The optimizer step the checkpoint folder ``resume`` was saved at."""
    return json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"]


@dataclass
class StageInputs:
    """The loaded inputs of a stage (see :func:`load_stage_inputs`)."""

    tokenizer: Any
    orig: OrigWrapper
    train: ActivationDataset | OnTheFlyDataset
    val: ActivationDataset | OnTheFlyDataset | None
    layer: int  # the block the activations are read at (non-negative)
    train_mean: torch.Tensor  # (d_model,) per-feature mean of the training activations
    train_var: torch.Tensor  # (d_model,) per-feature variance (biased) of the same


def _on_the_fly_data(cfg, orig: OrigWrapper, tokenizer):
    """The windows of the dump YAML ``cfg.on_the_fly`` (activations computed live), the layer,
    and normalisation statistics from (up to) 512 training windows."""
    (dcfg,) = parse_args(
        [DumpConfig], ["--config", cfg.on_the_fly, "--model_name_or_path", cfg.model_name_or_path]
    )
    splits = dump_windows(dcfg, tokenizer)
    layer = resolve_layer(dcfg.layer, orig.n_layers, "layer", cfg.on_the_fly)
    train = OnTheFlyDataset(splits["train"], layer)
    val = OnTheFlyDataset(splits["val"], layer) if len(splits["val"]) else None
    w = splits["train"]
    acts = torch.cat(
        [
            orig.capture(w.input_ids[c].to(orig.model.device), layer, w.token_pos[c]).cpu()
            for c in torch.arange(min(512, len(train))).split(64)
        ]
    ).double()
    return train, val, layer, acts.mean(0).float(), acts.var(0, unbiased=False).float()


def load_stage_inputs(cfg, device: torch.device | str | None = None) -> StageInputs:
    """Load the tokenizer (``tokenizer_name_or_path`` where the config has one, else the model
    folder), the original model (moved to ``device`` when given) and the data: the
    ``train_data``/``val_data`` dumps, each checked against the model and the training layer,
    or (supervised stage) the ``on_the_fly`` windows. Local folders only: a mistyped path is
    refused before any Hub lookup."""
    from transformers import AutoTokenizer

    cfg.check_model_folders()
    tokenizer = AutoTokenizer.from_pretrained(
        getattr(cfg, "tokenizer_name_or_path", None) or cfg.model_name_or_path
    )
    with whole_models():  # under ZeRO-3 too: the original model is a replica on every process
        orig = OrigWrapper.from_pretrained(cfg.model_name_or_path, **cfg.load_kwargs())
    if device is not None:
        orig = orig.to(device)
    if getattr(cfg, "on_the_fly", None):
        train, val, layer, train_mean, train_var = _on_the_fly_data(cfg, orig, tokenizer)
        return StageInputs(tokenizer, orig, train, val, layer, train_mean, train_var)
    vocab, d_model = orig.model.get_input_embeddings().weight.shape
    train = ActivationDataset(cfg.train_data)
    layer = resolve_layer(train.layer, orig.n_layers, "layer", cfg.train_data)
    val = ActivationDataset(cfg.val_data) if cfg.val_data else None
    for ds in (train, val):
        if ds is not None:
            ds.check_compatible(d_model, train.layer, vocab, model=orig.model)
    return StageInputs(tokenizer, orig, train, val, layer, train.mean, train.var)


def lens_meta(cfg, inputs: StageInputs) -> LensConfig:
    """The :class:`~lens_rl.models.configuration.LensConfig` of a fresh lens: the model's record,
    the tokenizer, the layer, the explanation length, the dtype and the training statistics
    (what explaining with it needs)."""
    return LensConfig.from_dict(
        {
            **base_record(inputs.orig.model, cfg.model_name_or_path),
            "tokenizer_name_or_path": getattr(cfg, "tokenizer_name_or_path", None) or cfg.model_name_or_path,
            "layer": inputs.layer,
            "t_text": cfg.t_text,
            "model_dtype": cfg.model_dtype,
            "train_mean": inputs.train_mean.tolist(),
            "train_var": inputs.train_var.tolist(),
        },
        "lens_meta",
    )


def stage_lens(cfg, inputs: StageInputs) -> ConsistencyLens:
    """The lens ``cfg.sft_lens`` (RL stage) or ``cfg.init_lens`` (a warm-started supervised
    stage) names, or a fresh one from ``decoder_config`` /
    ``encoder_config`` (with ``share_base`` where the config has one, else shared).

    A loaded lens must be of the data's layer; its sidecar records this stage's ``t_text``, and
    this stage's statistics when it has none (an older lens); ``peft_config`` adds LoRA adapters.
    """
    orig, tok = inputs.orig, inputs.tokenizer
    sft_lens = getattr(cfg, "sft_lens", None) or getattr(cfg, "init_lens", None)
    if not sft_lens:
        return ConsistencyLens.build(
            orig.model,
            tok,
            cfg.decoder_config,
            cfg.encoder_config,
            getattr(cfg, "share_base", True),
            lens_meta(cfg, inputs),
        )
    with whole_models():  # ZeRO-3: the engine partitions the lens later
        lens = ConsistencyLens.from_pretrained(sft_lens, base=orig.model, tokenizer=tok)
    lc = lens.lens_config
    if lc.layer not in (None, inputs.layer):
        raise ValueError(f"{sft_lens} was trained at layer {lc.layer}, the data is layer {inputs.layer}.")
    lc.t_text = cfg.t_text  # the sidecar records the length this stage trained
    if lc.train_mean is None and lc.train_var is None:
        # an older lens without statistics: record this stage's (what explaining it needs)
        lc.train_mean, lc.train_var = inputs.train_mean.tolist(), inputs.train_var.tolist()
    if cfg.peft_config is not None:  # LoRA adapters on a loaded lens
        lens.add_lora(cfg.decoder_config.lora, cfg.encoder_config.lora)
    return lens
