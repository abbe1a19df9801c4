"""GRPO for the lens decoder on TRL: TRL's loss, clipping, KL, logging, checkpointing and
accelerate integration; the lens replaces only what TRL cannot do for an activation-conditioned
policy.

Overridden surface (everything else is TRL 1.16's ``GRPOTrainer``):

- ``_generate_and_score_completions``: rollouts from activations (HF nondiff generator with the
  prefix encoded once per group, or vLLM with the decoder prompt as ``prompt_embeds`` and a
  trainable base synced into the engine after each optimizer step), rewards through TRL's reward-function machinery
  (the reconstruction reward first), group advantages (TRL's ``sum_then_normalize`` rule),
  importance weights q_theta_old / q_sampler under the SAME sampling policy (fixing the top-p
  bias of TRL issue #6789), RB-entropy diagnostics, optional KL reference log-probs;
- ``_get_per_token_logps_and_entropies``: log q and entropies from ``Decoder.fwd_tokens`` under
  the sampling policy, through the wrapper's forward (so DDP sees the computation);
- ``_compute_loss``: hands the batch's activations to the scorer and lets TRL multiply its loss
  by the lens's importance weights.

The policy optimised is the sampling policy q_theta (temperature + truncation), so the PPO
ratio, the importance weights and the entropy all live on the same measure.
"""

from __future__ import annotations

from typing import Any

import torch
from trl import GRPOTrainer
from trl.trainer.utils import nanstd

from lens_rl.data.dataset import ActivationDataset
from lens_rl.models.families import embed_tokens
from lens_rl.models.lens import ConsistencyLens, LensModule
from lens_rl.models.orig import OrigWrapper
from lens_rl.ops.diagnostics import DistributionDiagnostics
from lens_rl.ops.importance import importance_weights, mismatch_stats, token_log_ratio
from lens_rl.ops.sampling import step_seed
from lens_rl.training.grpo_config import LensGRPOConfig
from lens_rl.training.guards import NonFiniteGuard
from lens_rl.training.losses import normalized_mse
from lens_rl.training.rewards import group_advantages, reconstruction_reward


class LensPolicy(LensModule):
    """What TRL sees as ``model``: the lens (see :class:`~lens_rl.models.lens.LensModule`)."""


def _score(
    lens: ConsistencyLens, acts: torch.Tensor, tokens: torch.Tensor, policy
) -> tuple[torch.Tensor, ...]:
    out = lens.decoder.fwd_tokens(acts, tokens, policy=policy)
    return out.logprobs, out.entropies


def _encoder_mse(lens: ConsistencyLens, acts, ids, current_token, feature_var: torch.Tensor) -> torch.Tensor:
    emb = embed_tokens(lens.decoder.base, ids).detach()  # what the model embeds (Gemma: scaled)
    return normalized_mse(lens.encoder(emb, current_token_ids=current_token), acts, feature_var)


def _group_size(idx: torch.Tensor) -> int:
    """The length of the runs of repeated indices if ``idx`` is made of equal-length runs of one
    index each (TRL's ``RepeatSampler`` layout), else 1."""
    n = idx.numel()
    if n == 0:
        return 1
    change = torch.nonzero(idx[1:] != idx[:-1]).flatten()
    g = int(change[0]) + 1 if change.numel() else n
    if g > 1 and n % g == 0 and bool((idx.view(-1, g) == idx.view(-1, g)[:, :1]).all()):
        return g
    return 1


class LensGRPOTrainer(GRPOTrainer):
    """GRPO on TRL for a consistency-lens decoder (see the module docstring)."""

    def __init__(
        self,
        args: LensGRPOConfig,
        lens: ConsistencyLens,
        orig: OrigWrapper,
        tokenizer,
        train_store: ActivationDataset,
        reward_funcs: list | None = None,
        vllm_backend=None,
    ) -> None:
        import datasets

        self.lens = lens
        self.orig = orig
        self.store = train_store
        self.lens_args = args
        self.var_mean = float(train_store.var.double().mean())
        self.vllm_backend = vllm_backend
        self.diagnostics = DistributionDiagnostics(args.policy, tokenizer.eos_token_id)
        self._rollout_calls = 0
        rewards = [self._reconstruction_reward_fn(), *(reward_funcs or [])]
        ds = datasets.Dataset.from_dict(
            {
                "prompt": [f"activation {i}" for i in range(len(train_store))],
                "index": list(range(len(train_store))),
            }
        )
        beta = args.beta
        args.beta = 0.0  # TRL would build a reference model from a hub path; the lens supplies its own
        try:
            super().__init__(
                model=LensPolicy(lens),
                reward_funcs=rewards,
                args=args,
                train_dataset=ds,
                processing_class=tokenizer,
            )
        finally:
            args.beta = beta
        self.beta = beta
        self.add_callback(NonFiniteGuard(args))
        self.prefix_ids = torch.tensor(
            [tokenizer(args.ref_kl_prefix, add_special_tokens=False)["input_ids"]], dtype=torch.long
        )

    # ------------------------------------------------------------------ rewards
    def _reconstruction_reward_fn(self):
        trainer = self

        def reconstruction(prompts, completions, completion_ids, index, **kwargs) -> list[float]:
            """-||Â - A||^2 / (d * mean train variance): 0 is perfect, -1 is the mean predictor."""
            lens = trainer.lens
            device = trainer.accelerator.device
            idx = torch.tensor(index)
            a = trainer.store.A[idx].float().to(device)
            ids = torch.tensor(completion_ids, device=device)
            cur = trainer.store.input_ids[idx, trainer.store.token_pos[idx]].long().to(device)
            with torch.no_grad():
                reward, a_hat = reconstruction_reward(lens, a, ids, cur, trainer.var_mean)
                w_kl = trainer.lens_args.functional_kl_reward
                if w_kl > 0:
                    from lens_rl.training.sft_losses import functional_kl

                    batch = {
                        "input_ids": trainer.store.input_ids[idx].long().to(device),
                        "token_pos": trainer.store.token_pos[idx].to(device),
                    }
                    reward = reward - w_kl * functional_kl(trainer.orig, batch, trainer.store.layer, a_hat)
            return reward.tolist()

        return reconstruction

    # ------------------------------------------------------------------ rollouts
    def _rollouts(
        self, acts: torch.Tensor, seed: int, idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        args = self.lens_args
        dec = self.lens.decoder
        if self.vllm_backend is None:
            # TRL's sampler hands over each activation num_generations times in a row: encode
            # the prefix once per group and expand the KV cache over the group.
            g = _group_size(idx)
            gen = dec.generate_soft_kv_cached_nondiff(
                acts[::g],
                args.t_text,
                generator=torch.Generator(acts.device).manual_seed(seed),
                policy=args.policy,
                return_logits=False,
                num_samples=g,
            )
            return gen.hard_token_ids, gen.logprobs
        self._sync_vllm_weights()
        with torch.no_grad():
            embeds = dec.prompt_embeds(acts)
        out = self.vllm_backend.generate(
            policy=args.policy,
            n=1,
            max_new_tokens=args.t_text,
            seed=seed,
            prompt_embeds=list(embeds),
            ignore_eos=True,
        )
        ids = torch.tensor([r[0] for r in out.token_ids], device=acts.device)
        lp = torch.tensor([r[0] for r in out.logprobs], device=acts.device, dtype=torch.float32)
        return ids, lp

    def _sync_vllm_weights(self) -> None:
        """Push the decoder base into the vLLM engine once per optimizer step, when it trains
        (or differs from the engine's checkpoint: the first rollout always syncs a trainable
        base, which a supervised stage may already have changed). A frozen base is never sent:
        the projections and soft prompt reach vLLM through ``prompt_embeds``."""
        base = self.lens.decoder.base
        if not any(p.requires_grad for p in base.parameters()):
            return
        step = self.state.global_step
        if getattr(self, "_vllm_synced_step", None) == step:
            return
        from lens_rl.models.lora import merged_state_dict  # issue 17: LoRA deltas merged, HF names

        seconds = self.vllm_backend.sync_weights(merged_state_dict(base).items())
        self._vllm_synced_step = step
        self._vllm_sync_seconds = seconds

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        device = self.accelerator.device
        mode = "train" if self.model.training else "eval"
        args = self.lens_args
        prompts = [x["prompt"] for x in inputs]
        idx = torch.tensor([x["index"] for x in inputs])
        acts = self.store.A[idx].float().to(device)
        # Seeded from the optimizer step (restored on resume), not from global RNG state.
        step = self.state.global_step
        self._rollout_calls = self._rollout_calls + 1 if getattr(self, "_rollout_step", None) == step else 0
        self._rollout_step = step
        seed = step_seed(args.seed, step, self._rollout_calls, self.accelerator.process_index)
        ids, sampler_lp = self._rollouts(acts, seed, idx)
        mask = torch.ones_like(ids, dtype=torch.long)

        # Scores of the sampled tokens under the current parameters (theta_old), same policy.
        with torch.no_grad():
            logits = self.lens.decoder.fwd_tokens(acts, ids).logits
            scores, pack = self.diagnostics.score_and_diagnose(logits, ids, mask)
            logq_old = scores["logq"].float()
            full_softmax_lp = torch.log_softmax(logits.float() / args.temperature, -1).gather(
                -1, ids[..., None]
            )[..., 0]

        # Rewards (TRL's machinery: our reconstruction reward first, then any custom ones).
        completions = self.processing_class.batch_decode(ids)
        rewards_per_func = self._calculate_rewards(inputs, prompts, completions, ids.tolist())
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        unscorable = torch.isnan(rewards_per_func).all(dim=1)
        rewards = (rewards_per_func * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
        rewards[unscorable] = torch.nan
        advantages, std = group_advantages(rewards.view(-1, num_generations), self.scale_rewards)
        advantages, std = advantages.flatten(), std.flatten()
        local = slice(
            self.accelerator.process_index * len(prompts), (self.accelerator.process_index + 1) * len(prompts)
        )
        advantages = advantages[local]

        metrics = self._metrics[mode]
        for i, name in enumerate(self.reward_func_names):
            metrics[f"rewards/{name}/mean"].append(torch.nanmean(rewards_per_func[:, i]).item())
        metrics["reward"].append(torch.nanmean(rewards).item())
        metrics["reward_std"].append(nanstd(rewards).item())
        metrics["frac_reward_zero_std"].append(
            float(torch.isclose(std, torch.zeros_like(std)).float().mean())
        )
        step = pack.step
        for key, val in (
            ("rb_entropy", step.rb_entropy),
            ("head_mass", step.head_mass),
            ("top1_prob", step.top1_prob),
            ("eff_support", step.eff_support),
        ):
            metrics[f"lens/{key}"].append(self.accelerator.gather(val.float().mean()).mean().item())
        if getattr(self, "_vllm_sync_seconds", None) is not None:
            metrics["sampling/vllm_sync_seconds"].append(self._vllm_sync_seconds)

        out: dict[str, Any] = {
            "prompt_ids": torch.zeros(len(prompts), 0, dtype=torch.long, device=device),
            "prompt_mask": torch.zeros(len(prompts), 0, dtype=torch.long, device=device),
            "completion_ids": ids,
            "completion_mask": mask,
            "advantages": advantages,
            "num_items_in_batch": self.accelerator.gather(mask.sum()).sum(),
            "activation": acts,
            "current_token": self.store.input_ids[idx, self.store.token_pos[idx]].long().to(device),
        }
        if self.num_iterations > 1 or args.steps_per_generation > args.gradient_accumulation_steps:
            out["old_per_token_logps"] = logq_old
        if args.lens_importance_sampling:
            lr = token_log_ratio(logq_old, sampler_lp, mask)
            w = importance_weights(
                lr,
                mode=args.vllm_importance_sampling_mode,
                clip_max=args.vllm_importance_sampling_clip_max,
                clip_min=args.vllm_importance_sampling_clip_min,
                mask=mask,
            )
            out["importance_sampling_ratio"] = w.float()
            unclipped = importance_weights(
                lr, mode=args.vllm_importance_sampling_mode, clip_max=None, mask=mask
            )
            for k, v in mismatch_stats(lr, mask, w, unclipped).items():
                metrics[f"sampling/lens_is/{k}"].append(v)
            trl_lr = token_log_ratio(full_softmax_lp, sampler_lp, mask)
            metrics["sampling/full_softmax_ratio_mean"].append(float(trl_lr.exp().mean()))
        if self.beta != 0.0:
            prefix = self.prefix_ids.to(device).expand(len(prompts), -1)
            with torch.no_grad():
                ref_logits = self.orig.logits(torch.cat([prefix, ids], dim=1))[:, prefix.shape[1] - 1 : -1]
                out["ref_per_token_logps"] = torch.log_softmax(ref_logits.float(), -1).gather(
                    -1, ids[..., None]
                )[..., 0]
        return out

    # ------------------------------------------------------------------ scoring and loss
    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **kwargs,
    ):
        tokens = input_ids[:, -logits_to_keep:]
        logps, ents = model(_score, self._current_activation, tokens, self.lens_args.policy)
        return logps, (ents if compute_entropy else None), None

    def _compute_loss(self, model, inputs):
        self._current_activation = inputs["activation"]
        use_vllm = self.use_vllm
        self.use_vllm = "importance_sampling_ratio" in inputs  # lets TRL apply our weights
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self.use_vllm = use_vllm
        w = self.lens_args.encoder_mse_weight
        if w > 0:  # the encoder keeps learning to read the explanations the policy now writes
            mse = model(
                _encoder_mse,
                inputs["activation"],
                inputs["completion_ids"],
                inputs["current_token"],
                self.store.var.to(inputs["activation"].device),
            )
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["lens/encoder_mse"].append(float(mse.detach()))
            loss = loss + w * mse
        return loss
