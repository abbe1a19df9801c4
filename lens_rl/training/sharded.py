"""Sharded engines in the training stages: DeepSpeed ZeRO-3 and lens_rl's own FSDP2
(``lens_fsdp2``), what the lens needs beyond the Trainer.

**FSDP2** (``lens_fsdp2: true``): :func:`prepare_sharding` applies
:func:`~lens_rl.models.sharding.fully_shard_lens` to the ``LensModule`` over all processes (CPU
over gloo, or GPUs) and marks it prepared, so accelerate hands it to the Trainer as it is (no DDP
around it). Every computation the trainers run as ``model(fn, ...)`` gathers the root unit
(embeddings, LM head, projections) and each block as it is called. Checkpoints hold the whole
lens (``model.safetensors``) and the whole optimizer state (``optimizer.pt``), gathered with
``torch.distributed.checkpoint.state_dict`` on the main process, and resuming scatters them back
(:class:`ShardedCheckpointMixin`). accelerate's own FSDP plugin (``--use_fsdp``) is refused:
on a CPU-only machine it would run DDP instead.

**ZeRO-3** partitions every parameter of the wrapped ``LensModule`` across the processes; a weight
is whole only while a module that owns it runs. The lens reads weights outside their owners
(the generators read the embedding table and the LM head, the projections write into the prompt),
so :func:`prepare_sharding` registers those (the lens's *root* parameters, outside every transformer
block) as external parameters of the ``LensModule``: every computation the trainers run as
``model(fn, ...)`` then has them whole. What runs outside such a call goes through here:

- :func:`save_lens`: the lens folder, written by the main process from weights gathered module
  by module (ZeRO-3) or tensor by tensor (FSDP2);
- :func:`final_lens`: the lens the end-of-run evaluation and report read on the main process:
  under either engine the saved folder loaded back (whole), else the trained lens itself.

Under both, the frozen original model is not sharded: it stays a full replica on every process
(docs/sharding.md). A lens whose frozen base *is* the original model's would be sharded with
it, so such a lens is refused (:func:`prepare_sharding`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers.integrations.deepspeed as hf_deepspeed
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers.utils import SAFE_WEIGHTS_NAME

from lens_rl.config import ConfigError
from lens_rl.models.lens import ConsistencyLens, LensModule, read_lens_weights
from lens_rl.models.orig import OrigWrapper
from lens_rl.models.sharding import (
    detach_empty_parameters,
    full_state_dict,
    fully_shard_lens,
    register_zero3_root_parameters,
)
from lens_rl.utils.files import replace_on_success

OPTIMIZER_NAME, SCHEDULER_NAME = "optimizer.pt", "scheduler.pt"  # the Trainer's file names


@contextmanager
def whole_models() -> Iterator[None]:
    """Inside, ``from_pretrained`` loads whole models even when the run's ``TrainingArguments``
    set up ZeRO-3 (transformers would otherwise build them under ``deepspeed.zero.Init``,
    partitioned at load): the original model stays a replica, and the lens is partitioned once,
    by the engine, after :func:`prepare_sharding` has registered its root parameters."""
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


def fsdp2_enabled(module: nn.Module) -> bool:
    """Whether ``module`` was sharded with FSDP2 (:func:`prepare_sharding`)."""
    return isinstance(module, FSDPModule)


def sharded(accelerator, module: nn.Module) -> bool:
    """Whether the lens is sharded (ZeRO-3 or FSDP2): weights must be gathered outside
    ``model(fn, ...)``."""
    return zero3_enabled(accelerator) or fsdp2_enabled(module)


def _refuse_shared_with_orig(module: LensModule, orig: OrigWrapper, engine: str) -> None:
    theirs = {id(p) for p in orig.model.parameters()}
    shared = [n for n, p in module.named_parameters() if id(p) in theirs]
    if shared:
        raise ConfigError(
            f"{engine} needs lens bases of their own: {len(shared)} lens tensors (e.g. {shared[0]}) "
            f"are the frozen original model's, which {engine} would shard. Train the bases (decoder "
            "and encoder trainable_base: true), or use ZeRO-1/2 or DDP for frozen bases."
        )


def prepare_sharding(accelerator, module: LensModule, orig: OrigWrapper, fsdp2: bool = False) -> None:
    """Shard the lens where the run asks for it (call it in the trainer's ``__init__``, before
    the optimizer exists):

    - DeepSpeed ZeRO-3: register the lens's root parameters with the engine (see the module
      docstring); empty parameters (an empty soft prompt) become plain tensors, since DeepSpeed
      cannot partition them;
    - ``fsdp2``: :func:`~lens_rl.models.sharding.fully_shard_lens` over all processes, the module
      marked as prepared for accelerate (no DDP around it).

    A lens sharing a tensor with the original model (a frozen, shared base) is refused under
    either: it would shard the original model's weights too."""
    if zero3_enabled(accelerator):
        _refuse_shared_with_orig(module, orig, "DeepSpeed ZeRO-3")
        detach_empty_parameters(module)
        n = register_zero3_root_parameters(module)
        accelerator.print(
            f"ZeRO-3: {n} root tensors of the lens (embeddings, LM head, norms, projections, prompts) are "
            "gathered for each model(fn, ...) call; the original model is a replica on every process"
        )
    elif fsdp2:
        if accelerator.num_processes < 2:
            raise ConfigError(
                "lens_fsdp2 shards the lens over the run's processes, and this run has one (nothing to "
                "shard, and no process group to shard over): launch 2 or more (accelerate launch "
                "--multi_gpu --num_processes N), or drop lens_fsdp2."
            )
        _refuse_shared_with_orig(module, orig, "FSDP2")
        detach_empty_parameters(module)  # every trainable tensor a DTensor (clipping, the guard)
        device = accelerator.device
        fully_shard_lens(module, init_device_mesh(device.type, (accelerator.num_processes,)))
        module._is_accelerate_prepared = True  # accelerate.prepare must not wrap it in DDP
        accelerator.print(
            f"FSDP2: the lens is sharded over {accelerator.num_processes} processes (each transformer "
            "block a unit, the rest the root); the original model is a replica on every process"
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


def full_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every FSDP2 shard (a ``DTensor``) gathered into its whole tensor, on every
    process (a collective, one tensor at a time in the dict's order, which is the same on every
    process for a module's state dict); other tensors as they are."""
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}


class ShardedCheckpointMixin:
    """Checkpoints of a lens trainer under a sharded engine (a base before ``Trainer`` /
    ``GRPOTrainer``); elsewhere the Trainer's own.

    - ZeRO-3: ``model.safetensors`` holds the whole lens, gathered module by module whatever
      ``stage3_gather_16bit_weights_on_model_save`` says (the resume check reads it:
      :func:`lens_rl.utils.launch.checkpoint_problem`), beside the engine's partitions, which
      resuming loads.
    - FSDP2: ``model.safetensors`` and ``optimizer.pt`` hold the whole lens and the whole optimizer
      state (``torch.distributed.checkpoint.state_dict``, gathered to the main process), and
      resuming scatters both back onto the shards."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """See the class docstring."""
        output_dir = output_dir or self.args.output_dir
        if zero3_enabled(self.accelerator):
            with whole_weights(self.accelerator, self.model):
                if self.args.should_save:
                    self._save(output_dir)  # LensModule.state_dict(): the lens's own tensors, whole
            self.model_wrapped.save_checkpoint(output_dir)  # the engine's partitions (a collective)
        elif fsdp2_enabled(self.model):
            state = full_state_dict(self.model)  # a collective; the main process gets it
            if self.args.should_save:
                self._save(output_dir, state_dict=state)
        else:
            super().save_model(output_dir, _internal_call)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not fsdp2_enabled(self.model):
            return super()._save_optimizer_and_scheduler(output_dir)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(self.model, self.optimizer, options=options)  # a collective
        if self.args.should_save:  # renamed into place only once both are written
            folder = Path(output_dir)
            with replace_on_success(folder / OPTIMIZER_NAME, folder / SCHEDULER_NAME) as (opt, sched):
                torch.save(state, opt)
                torch.save(self.lr_scheduler.state_dict(), sched)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not fsdp2_enabled(self.model):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        # every process reads the whole lens (checked: readable, finite) and keeps its shards
        state = read_lens_weights(Path(resume_from_checkpoint) / SAFE_WEIGHTS_NAME)
        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True, strict=True))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not fsdp2_enabled(self.model):
            return super()._load_optimizer_and_scheduler(checkpoint)
        folder = Path(checkpoint)
        state = torch.load(folder / OPTIMIZER_NAME, map_location="cpu", weights_only=True)
        set_optimizer_state_dict(
            self.model, self.optimizer, state, options=StateDictOptions(full_state_dict=True)
        )
        self.lr_scheduler.load_state_dict(torch.load(folder / SCHEDULER_NAME, weights_only=True))


def save_lens(trainer, path: str | Path) -> None:
    """``trainer.lens.save_pretrained(path)`` on the main process; under a sharded engine a
    collective (call it on every process) that gathers the weights first."""
    acc, lens = trainer.accelerator, trainer.lens
    if zero3_enabled(acc):
        with whole_weights(acc, lens):
            if acc.is_main_process:
                lens.save_pretrained(path)
    elif fsdp2_enabled(trainer.model):
        state = full_state_dict(trainer.model)  # keys "lens.<name>"
        if acc.is_main_process:
            lens.save_pretrained(path, state_dict={k.removeprefix("lens."): v for k, v in state.items()})
    elif acc.is_main_process:
        lens.save_pretrained(path)
    acc.wait_for_everyone()


def final_lens(trainer, saved: str | Path, orig: OrigWrapper, tokenizer) -> ConsistencyLens:
    """The lens to evaluate and report on, on the main process, after training: under a sharded
    engine the folder ``saved`` (:func:`save_lens`'s) loaded back whole on ``orig``'s model, else
    the trained lens itself."""
    if not sharded(trainer.accelerator, trainer.model):
        return trainer.lens
    with whole_models():
        loaded = ConsistencyLens.from_pretrained(saved, base=orig.model, tokenizer=tokenizer)
    return loaded.to(trainer.accelerator.device)
