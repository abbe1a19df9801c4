"""The supervised lens objective on one batch (runs inside the lens wrapper's forward)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lens_rl.metrics import FVEAccumulator, functional_kl, reconstruct
from lens_rl.models.lens import ConsistencyLens
from lens_rl.models.orig import OrigWrapper
from lens_rl.ops.distributions import entropy_from_logits, kl_from_logits


@dataclass
class StepWeights:
    """Scheduled values at the current optimizer step."""

    mse: float
    lm: float
    kl: float
    entropy: float
    tau: float


def round_trip(
    lens: ConsistencyLens,
    batch: dict[str, torch.Tensor],
    t_text: int,
    tau: float,
    generator: torch.Generator,
    resample_ablation: bool,
    differentiable: bool = True,
):
    """Decode A (and A' when ablating), encode back; return (gen, Â, A_train)."""
    dec, enc = lens.decoder, lens.encoder
    a = batch["A"]
    cur = batch["input_ids"][torch.arange(a.shape[0], device=a.device), batch["token_pos"]]
    gen_fn = dec.generate_soft_kv_cached if differentiable else dec.generate_soft_kv_cached_nondiff
    kwargs = {"gumbel_tau": tau} if differentiable else {}
    gen = gen_fn(a, t_text, generator=generator, **kwargs)
    a_hat = enc(gen.generated_text_embeddings, current_token_ids=cur)
    a_train = a_hat
    if resample_ablation:
        cur_p = batch["prime_input_ids"][torch.arange(a.shape[0], device=a.device), batch["prime_token_pos"]]
        gen_p = gen_fn(batch["A_prime"], t_text, generator=generator, **kwargs)
        a_hat_p = enc(gen_p.generated_text_embeddings, current_token_ids=cur_p)
        a_train = a_hat + (batch["A_prime"] - a_hat_p).detach()
    return gen, a_hat, a_train


def lm_kl(orig: OrigWrapper, prefix_ids: torch.Tensor, hard_ids: torch.Tensor, dec_logits: torch.Tensor):
    """KL(P_orig || P_dec) per (row, token): the orig model reads ``prefix + explanation``."""
    b, t = hard_ids.shape
    ids = torch.cat([prefix_ids.to(hard_ids.device).expand(b, -1), hard_ids], dim=1)
    with torch.no_grad():
        orig_logits = orig.logits(ids)[:, prefix_ids.shape[-1] - 1 : prefix_ids.shape[-1] - 1 + t]
    return kl_from_logits(orig_logits, dec_logits)  # (B, T)


def sft_losses(
    lens: ConsistencyLens,
    orig: OrigWrapper,
    batch: dict[str, torch.Tensor],
    *,
    weights: StepWeights,
    layer: int,
    t_text: int,
    feature_var: torch.Tensor,
    prefix_ids: torch.Tensor,
    generator: torch.Generator,
    resample_ablation: bool,
) -> dict[str, torch.Tensor]:
    """Total loss and its parts. Terms with weight 0 are not computed (they cost forward passes)."""
    gen, a_hat, a_train = round_trip(lens, batch, t_text, weights.tau, generator, resample_ablation)
    a = batch["A"]
    out: dict[str, torch.Tensor] = {}
    out["mse"] = reconstruct(a_train, a, train_var=feature_var, dtype=torch.float32).nmse.mean()
    total = weights.mse * out["mse"]
    if weights.lm > 0:
        out["lm"] = lm_kl(orig, prefix_ids, gen.hard_token_ids, gen.raw_lm_logits).mean()
        total = total + weights.lm * out["lm"]
    if weights.kl > 0:
        out["kl"] = functional_kl(orig, batch, layer, a_train).mean()
        total = total + weights.kl * out["kl"]
    out["entropy"] = entropy_from_logits(gen.raw_lm_logits).mean()
    if weights.entropy != 0:
        total = total - weights.entropy * out["entropy"]
    with torch.no_grad():
        batch_fve = FVEAccumulator(a.shape[-1], a.device)
        batch_fve.update(a_train, a)
        out["fve_batch"] = batch_fve.fve()
    out["loss"] = total
    return out
