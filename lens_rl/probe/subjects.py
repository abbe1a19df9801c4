"""The policy under probe (:class:`ProbeSubject`): a plain causal LM on text prompts
(:func:`lm_subject`) or a lens's decoder on activations (:func:`lens_subject`), the parameters a
step moves, and how to shift them along the update direction (:func:`shifted_parameters`);
:func:`load_trl_checkpoint` loads an RL run's checkpoint into a lens for "the step this run would
take next"."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from lens_rl.probe.config import EntropyProbeConfig
from lens_rl.processing.prompts import PROMPT_DATASETS
from lens_rl.processing.sequence_processor import (
    BatchedSequences,
    PrecisionConfig,
    SamplingConfig,
    SequenceProcessor,
)
from lens_rl.training.grpo_trainer import LensPolicy
from lens_rl.training.rewards import reconstruction_reward
from lens_rl.utils.files import decode_utf8


@dataclass
class ProbeSubject:
    """What the probe needs from a policy: the module v moves, a SequenceProcessor over it, a
    prompt pool, and rewards for ``(B, G)`` responses to pool entries ``idx``. The optimizer is
    built on ``optimizer_module`` (default ``module``) with the trainer's parameter groups, so a
    trainer's saved optimizer state loads into it; parameters outside ``module`` get no
    gradient from the policy loss and do not move."""

    module: nn.Module
    sp: SequenceProcessor
    pool_size: int
    prompts: Callable[[torch.Tensor], Any]
    rewards: Callable[[BatchedSequences, torch.Tensor], torch.Tensor]
    optimizer_module: nn.Module | None = None  # what the trainer's optimizer was built on


def _text_reward(name: str) -> Callable[..., list[float]]:
    """Built-in text rewards, or ``'module:function'`` with TRL's reward signature."""
    if name == "distinct_tokens":
        return lambda prompts, completions, completion_ids, **kw: [
            len(set(ids)) / max(len(ids), 1) for ids in completion_ids
        ]
    if name == "length":
        return lambda prompts, completions, completion_ids, **kw: [float(len(ids)) for ids in completion_ids]
    if ":" in name:
        mod, fn = name.split(":", 1)
        return getattr(importlib.import_module(mod), fn)
    raise ValueError(f"Unknown reward {name!r}: use distinct_tokens, length or 'module:function'.")


def _sampling_config(cfg: EntropyProbeConfig) -> SamplingConfig:
    return SamplingConfig(
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        min_p=cfg.min_p,
        max_new_tokens=cfg.max_new_tokens,
        num_return_sequences=cfg.num_generations,
        gen_batch_size=cfg.gen_batch_size,
        tf_batch_size=cfg.tf_batch_size,
        seed=cfg.seed,
    )


def lm_subject(
    model: nn.Module, tokenizer, cfg: EntropyProbeConfig, pool: list[str] | None = None
) -> ProbeSubject:
    """A causal LM with text prompts (``pool`` or the registered ``prompt_dataset``)."""
    if pool is None and cfg.prompts_file:
        text = decode_utf8(Path(cfg.prompts_file).read_bytes(), cfg.prompts_file)
        pool = [line for line in text.splitlines() if line.strip()]
        if not pool:
            raise ValueError(f"{cfg.prompts_file} holds no prompts.")
    if pool is None:
        if cfg.prompt_dataset not in PROMPT_DATASETS:
            raise ValueError(
                f"Unknown prompt_dataset {cfg.prompt_dataset!r}; known: {sorted(PROMPT_DATASETS)}."
            )
        pool = PROMPT_DATASETS[cfg.prompt_dataset](cfg.prompt_split)
    pool = pool[: cfg.pool_size] if cfg.pool_size else pool
    sp = SequenceProcessor(
        model, tokenizer, _sampling_config(cfg), PrecisionConfig(entropy_fp64=cfg.entropy_fp64)
    )
    reward_fn = _text_reward(cfg.reward)

    def rewards(seqs: BatchedSequences, idx: torch.Tensor) -> torch.Tensor:
        b, g = seqs.gen_lens.shape
        toks = seqs.gen_tokens()
        ids = [toks[i, j, : int(seqs.gen_lens[i, j])].tolist() for i in range(b) for j in range(g)]
        prompts = [pool[int(i)] for i in idx for _ in range(g)]
        texts = [t for row in seqs.responses_text for t in row]
        return torch.tensor(reward_fn(prompts, texts, completion_ids=ids), dtype=torch.float64).view(b, g)

    return ProbeSubject(model, sp, len(pool), lambda idx: [pool[int(i)] for i in idx], rewards)


def lens_subject(lens, tokenizer, store, cfg: EntropyProbeConfig) -> ProbeSubject:
    """A lens decoder with activation prompts from a dump; reward = reconstruction."""
    dec = lens.decoder
    sp = SequenceProcessor(
        dec, tokenizer, _sampling_config(cfg), PrecisionConfig(entropy_fp64=cfg.entropy_fp64)
    )
    n = min(len(store), cfg.pool_size) if cfg.pool_size else len(store)
    var_mean = float(store.var.double().mean())

    def prompts(idx: torch.Tensor) -> torch.Tensor:
        return store.A[idx].float().to(sp.device)

    def rewards(seqs: BatchedSequences, idx: torch.Tensor) -> torch.Tensor:
        b, g = seqs.gen_lens.shape
        rows = idx.repeat_interleave(g)
        cur = store.input_ids[rows, store.token_pos[rows]].long().to(sp.device)
        r, _ = reconstruction_reward(lens, prompts(rows), seqs.gen_tokens().reshape(b * g, -1), cur, var_mean)
        return r.double().cpu().view(b, g)

    return ProbeSubject(dec, sp, n, prompts, rewards)


@contextlib.contextmanager
def shifted_parameters(module: nn.Module, v_named: dict[str, torch.Tensor], eta: float) -> Iterator[None]:
    """Temporarily set ``theta + eta v`` in place (for samplers that read the live module);
    the original values are restored from copies, bit for bit."""
    params = dict(module.named_parameters())
    saved = {k: params[k].detach().clone() for k in v_named}
    try:
        with torch.no_grad():
            for k, v in v_named.items():
                params[k].add_(eta * v.to(params[k].device, params[k].dtype))
        yield
    finally:
        with torch.no_grad():
            for k, val in saved.items():
                params[k].copy_(val)


def load_trl_checkpoint(lens, checkpoint: str | Path) -> nn.Module:
    """Load a ``scripts/rl_lens.py`` checkpoint's weights into ``lens``; return the module the
    trainer's optimizer was built on (``LensPolicy(lens)``: decoder and encoder), so that its
    ``optimizer.pt`` loads into :func:`~lens_rl.probe.update_vector.build_optimizer`'s groups."""
    path = Path(checkpoint) / "model.safetensors"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: trl_checkpoint must be a checkpoint-N folder of rl_lens.py."
        )
    policy = LensPolicy(lens)
    policy.load_state_dict(load_file(str(path)))
    return policy
