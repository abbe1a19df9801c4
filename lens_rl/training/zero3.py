"""DeepSpeed ZeRO-3 in the training stages: what the lens needs beyond the Trainer's engine.

ZeRO-3 partitions every parameter of the wrapped ``LensModule`` across the processes; a weight
is whole only while a module that owns it runs. The lens reads weights outside their owners
(the generators read the embedding table and the LM head, the projections write into the prompt),
so :func:`prepare_zero3` registers those (the lens's *root* parameters, outside every transformer
block) as external parameters of the ``LensModule``: every computation the trainers run as
``model(fn, ...)`` then has them whole. What runs outside such a call goes through here:

- :func:`save_lens`: the lens folder, written by the main process from weights gathered module
  by module (no process ever holds the whole lens);
- :func:`final_lens`: the lens the end-of-run evaluation and report read on the main process:
  under ZeRO-3 the saved folder loaded back (whole), else the trained lens itself.

The frozen original model is not part of the engine: it stays a full replica on every process
(docs/sharding.md). A lens whose frozen base *is* the original model's would be partitioned
under it, so such a lens is refused (:func:`prepare_zero3`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers.integrations.deepspeed as hf_deepspeed
from torch import nn

from lens_rl.config import ConfigError
from lens_rl.models.lens import ConsistencyLens, LensModule
from lens_rl.models.orig import OrigWrapper
from lens_rl.models.sharding import detach_empty_parameters, register_zero3_root_parameters


@contextmanager
def whole_models() -> Iterator[None]:
    """Inside, ``from_pretrained`` loads whole models even when the run's ``TrainingArguments``
    set up ZeRO-3 (transformers would otherwise build them under ``deepspeed.zero.Init``,
    partitioned at load): the original model stays a replica, and the lens is partitioned once,
    by the engine, after :func:`prepare_zero3` has registered its root parameters."""
    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = ref


def zero3_enabled(accelerator) -> bool:
    """Whether ``accelerator`` runs DeepSpeed at ZeRO stage 3."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


def prepare_zero3(accelerator, module: LensModule, orig: OrigWrapper) -> None:
    """Under ZeRO-3, register the lens's root parameters with the engine (see the module
    docstring); elsewhere nothing. Empty parameters (an empty soft prompt) become plain tensors,
    since DeepSpeed cannot partition them (nor FSDP2 reduce them). A lens sharing a tensor with the original model (a frozen,
    shared base) is refused: ZeRO-3 would partition the original model's weights too."""
    if not zero3_enabled(accelerator):
        return
    theirs = {id(p) for p in orig.model.parameters()}
    shared = [n for n, p in module.named_parameters() if id(p) in theirs]
    if shared:
        raise ConfigError(
            f"DeepSpeed ZeRO-3 needs lens bases of their own: {len(shared)} lens tensors (e.g. "
            f"{shared[0]}) are the frozen original model's, which ZeRO-3 would partition. Train the "
            "bases (decoder and encoder trainable_base: true), or use ZeRO-1/2 or DDP for frozen bases."
        )
    detach_empty_parameters(module)
    n = register_zero3_root_parameters(module)
    accelerator.print(
        f"ZeRO-3: {n} root tensors of the lens (embeddings, LM head, norms, projections, prompts) are "
        "gathered for each model(fn, ...) call; the original model is a replica on every process"
    )


@contextmanager
def whole_weights(accelerator, lens: nn.Module, everywhere: bool = False) -> Iterator[None]:
    """Inside: every parameter of ``lens`` is whole on the main process (``everywhere``: on every
    process), a CPU copy set as its ``.data``, restored on leaving. A collective: every process
    gathers module by module (``deepspeed.zero.GatheredParameters``), so at most one module's
    weights are whole on the device at once. Outside ZeRO-3, nothing happens."""
    if not zero3_enabled(accelerator):
        yield
        return
    import deepspeed  # optional dependency: only under ZeRO-3

    keep = accelerator.is_main_process or everywhere  # this process holds the whole copies
    params = {id(p): p for p in lens.parameters()}
    whole: dict[int, torch.Tensor] = {}
    seen: set[int] = set()
    for m in lens.modules():
        own = [p for p in m.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)
        if not own:
            continue
        with deepspeed.zero.GatheredParameters(own, modifier_rank=None):
            if keep:
                whole.update((id(p), p.data.detach().cpu().clone()) for p in own)
    placeholders = {k: params[k].data for k in whole}
    try:
        for k, t in whole.items():
            params[k].data = t
        yield
    finally:
        for k, t in placeholders.items():
            params[k].data = t


class Zero3SaveMixin:
    """``save_model`` for a lens trainer (a base before ``Trainer``/``GRPOTrainer``): under ZeRO-3
    a checkpoint also holds the whole lens as ``model.safetensors`` (gathered module by module,
    whatever ``stage3_gather_16bit_weights_on_model_save`` says), which the resume check reads
    (:func:`lens_rl.utils.launch.checkpoint_problem`: present, readable, finite), beside the
    engine's partitioned state that resuming loads. Elsewhere the Trainer's own."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """See the class docstring."""
        if not zero3_enabled(self.accelerator):
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        with whole_weights(self.accelerator, self.model):
            if self.args.should_save:
                self._save(output_dir)  # LensModule.state_dict(): the lens's own tensors, whole
        self.model_wrapped.save_checkpoint(output_dir)  # the engine's partitions (a collective)


def save_lens(accelerator, lens: ConsistencyLens, path: str | Path) -> None:
    """``lens.save_pretrained(path)`` on the main process; under ZeRO-3 a collective (call it on
    every process) that gathers the partitioned weights first."""
    if not zero3_enabled(accelerator):
        if accelerator.is_main_process:
            lens.save_pretrained(path)
        return
    with whole_weights(accelerator, lens):
        if accelerator.is_main_process:
            lens.save_pretrained(path)
    accelerator.wait_for_everyone()


def final_lens(accelerator, lens: ConsistencyLens, saved: str | Path, orig: OrigWrapper, tokenizer):
    """The lens to evaluate and report on, on the main process, after training: under ZeRO-3 the
    folder ``saved`` (:func:`save_lens`'s) loaded back whole on ``orig``'s model, else ``lens``."""
    if not zero3_enabled(accelerator):
        return lens
    with whole_models():
        loaded = ConsistencyLens.from_pretrained(saved, base=orig.model, tokenizer=tokenizer)
    return loaded.to(accelerator.device)
