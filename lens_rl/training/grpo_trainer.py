"""GRPO for the lens decoder on TRL: TRL's loss, clipping, KL, logging, checkpointing and
accelerate integration; the lens replaces only what TRL cannot do for an activation-conditioned
policy.

Overridden surface (everything else is TRL 1.16's ``GRPOTrainer``):

- ``_generate_and_score_completions``: rollouts from activations
  (:func:`~lens_rl.generation.rollouts.lens_rollouts`: HF nondiff generator with the prefix
  encoded once per group, or vLLM with one request of n = group size per activation and the
  decoder prompt as ``prompt_embeds``; a trainable base is synced into the engine after each
  optimizer step); theta_old scores and step diagnostics from one teacher-forced pass and one
  vocabulary sweep, through the wrapped module (the trainer's autocast); rewards through TRL's
  reward-function machinery (the reconstruction reward first; prompts are the activations'
  contexts), group advantages (TRL's ``sum_then_normalize`` rule), TRL's completion log and the
  reward functions' ``log_metric``/``log_extra`` flush; importance weights q_theta_old / q_sampler
  under the SAME sampling policy (fixing the top-p bias of TRL issue #6789); TRL's rule for
  keeping old log-probs; the sampler's log-probs for ``off_policy_mask_threshold``; optional KL
  reference log-probs under the policy's temperature;
- ``_get_per_token_logps_and_entropies``: log q and H(q) from ``Decoder.fwd_tokens`` (the
  shared scorer), plus the encoder's MSE when it co-trains, in ONE call of the wrapped module
  (DDP marks each parameter once);
- ``_compute_loss``: hands the batch's activations to the scorer, lets TRL apply its loss and
  the lens's importance weights, adds the encoder term scaled for gradient accumulation;
- ``evaluate``: the whole val split (FVE, functional KL, explanations), every ``eval_steps``
  (:class:`~lens_rl.training.evaluate.LensEvaluationMixin`, shared with the supervised trainer);
- ``log``: TRL's, plus the completions as TensorBoard text.

Which config fields hold and which are refused: ``lens_rl/training/refusals.py`` and
``LensGRPOConfig``; the loss equals TRL's formulas option by option (``tests/test_grpo_parity.py``).

The policy optimised is the sampling policy q_theta (temperature + truncation), so the PPO
ratio, the importance weights and the entropy all live on the same measure.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate.utils import gather_object
from torch.func import functional_call
from trl import GRPOTrainer
from trl.trainer.utils import nanstd

from lens_rl.data.dataset import ActivationDataset
from lens_rl.generation.rollouts import lens_rollouts
from lens_rl.metrics import functional_kl, reconstruct
from lens_rl.models.families import embed_tokens
from lens_rl.models.lens import ConsistencyLens, LensModule
from lens_rl.models.lora import merged_state_dict  # LoRA deltas merged, HF names
from lens_rl.models.orig import OrigWrapper
from lens_rl.ops.diagnostics import TokenScores, score_tokens
from lens_rl.ops.importance import importance_weights, mismatch_stats, token_log_ratio
from lens_rl.ops.sampling import SamplingPolicy, step_seed
from lens_rl.training.evaluate import LensEvaluationMixin
from lens_rl.training.grpo_config import LensGRPOConfig
from lens_rl.training.guards import NonFiniteGuard
from lens_rl.training.optim import optimizer_on_groups
from lens_rl.training.rewards import (
    best_of_group,
    group_advantages,
    reconstruction_reward,
    zero_std_groups,
)
from lens_rl.training.sharded import ShardedCheckpointMixin, full_tensors, prepare_sharding, whole_weights
from lens_rl.training.trackers import log_completions_text

LOGQ_FLOOR = -1e4  # stands for log q = -inf (a token outside the policy's truncated support)


class LensPolicy(LensModule):
    """What TRL sees as ``model``: the lens (see :class:`~lens_rl.models.lens.LensModule`)."""


def _score(
    lens: ConsistencyLens,
    acts: torch.Tensor,
    tokens: torch.Tensor,
    policy: SamplingPolicy,
    encoder_mse: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The trainer's policy scores, in ONE call of the wrapped module (DDP marks each parameter
    once): log q and H(q) of ``tokens`` (the one scorer, ``Decoder.fwd_tokens``), and, when
    ``encoder_mse = (current_token, feature_var, row_weight)``, the encoder's normalised MSE on
    them, averaged over the rows with weight 1 (``encoder_rollouts``: all, or each group's best)."""
    out = lens.decoder.fwd_tokens(acts, tokens, policy=policy)
    # A token outside the truncated support has log q = -inf and, locally, zero gradient: a
    # constant floor keeps TRL's arithmetic finite (ratio exp(floor - old) = 0, no gradient;
    # masked positions multiply it by 0 instead of producing NaN).
    logq = torch.where(torch.isfinite(out.logprobs), out.logprobs, torch.full_like(out.logprobs, LOGQ_FLOOR))
    mse = None
    if encoder_mse is not None:
        current_token, feature_var, row_weight = encoder_mse
        emb = embed_tokens(lens.decoder.base, tokens).detach()  # what the model embeds (Gemma: scaled)
        a_hat = lens.encoder(emb, current_token_ids=current_token)
        nmse = reconstruct(a_hat, acts, train_var=feature_var, dtype=torch.float32).nmse
        # a micro-batch without a selected row contributes 0 (the graph stays: DDP sees every parameter)
        mse = (nmse * row_weight).sum() / row_weight.sum().clamp(min=1.0)
    return logq, out.entropies, mse


def _reference_logq(
    lens: ConsistencyLens, acts: torch.Tensor, tokens: torch.Tensor, policy: SamplingPolicy
) -> torch.Tensor:
    """log q of ``tokens`` under the decoder whose parameters the caller swapped in (the
    ``initial_policy`` KL reference, through ``functional_call``): the one scorer, floored like
    the policy's own."""
    logq = lens.decoder.fwd_tokens(acts, tokens, policy=policy).logprobs
    return torch.where(torch.isfinite(logq), logq, torch.full_like(logq, LOGQ_FLOOR))


def _sample(
    lens: ConsistencyLens,
    acts: torch.Tensor,
    group: int,
    t_text: int,
    policy: SamplingPolicy,
    seed: int,
    vllm_backend,
):
    """The rollouts (:func:`lens_rollouts`), run as ``model(_sample, ...)`` like every other read
    of the lens's weights."""
    return lens_rollouts(
        lens.decoder, acts, group, t_text, policy=policy, seed=seed, vllm_backend=vllm_backend
    )


def _score_rollouts(
    lens: ConsistencyLens,
    acts: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    policy: SamplingPolicy,
    eos_token_id: int | None,
) -> TokenScores:
    """Scores of sampled tokens under the current parameters (theta_old) and the step
    diagnostics, from one teacher-forced pass and one sweep over the vocabulary."""
    logits = lens.decoder.fwd_tokens(acts, tokens, scores=False).logits
    return score_tokens(logits, tokens, policy, diagnostics=True, mask=mask, eos_token_id=eos_token_id)


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


def _activation_index(n: int):
    """TRL's train set: one int64 ``index`` column (8 bytes per record, no prompt strings: the
    activations stay in the store, and the prompts that rewards and logs see are built from
    their contexts per batch)."""
    import datasets
    import numpy as np

    return datasets.Dataset.from_dict({"index": np.arange(n, dtype=np.int64)})


class LensGRPOTrainer(ShardedCheckpointMixin, LensEvaluationMixin, GRPOTrainer):
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
        val_store: ActivationDataset | None = None,
    ) -> None:
        self.lens = lens
        self.orig = orig
        self.store = train_store
        self.layer, self.train_mean, self.train_var = train_store.layer, train_store.mean, train_store.var
        self.val_store = val_store
        self.lens_args = args
        # The encoder's trainable parameters as the run starts (the sft_lens's, also on resume:
        # a checkpoint loads later): evaluations also score with them (eval_fve_frozen_encoder).
        # Empty when the encoder does not train: the live encoder is the starting one.
        self.frozen_encoder = (
            {n: p.detach().clone() for n, p in lens.encoder.named_parameters() if p.requires_grad}
            if args.encoder_mse_weight > 0
            else {}
        )
        # The decoder's trainable parameters as the run starts: the initial_policy KL reference.
        self.initial_decoder = (
            {
                f"lens.decoder.{n}": p.detach().clone()
                for n, p in lens.decoder.named_parameters()
                if p.requires_grad
            }
            if args.beta > 0 and args.beta_reference == "initial_policy"
            else {}
        )
        self.var_mean = float(train_store.var.double().mean())
        self.vllm_backend = vllm_backend
        self._rollout_calls = 0
        self.last_samples: list[dict[str, Any]] = []
        rewards = [self._reconstruction_reward_fn(), *(reward_funcs or [])]
        ds = _activation_index(len(train_store))  # O(1) memory, whatever the dump's size
        # Trainer requires an eval_dataset when eval_strategy is set; the lens's evaluate() reads
        # the val store itself (whole split), so this only stands for it.
        eval_ds = None
        if val_store is not None:
            eval_ds = _activation_index(1)
        elif args.eval_strategy != "no":
            raise ValueError("eval_strategy needs the val split (val_data).")
        beta = args.beta
        args.beta = 0.0  # TRL would build a reference model from a hub path; the lens supplies its own
        try:
            super().__init__(
                model=LensPolicy(lens),
                reward_funcs=rewards,
                args=args,
                train_dataset=ds,
                eval_dataset=eval_ds,
                processing_class=tokenizer,
            )
        finally:
            args.beta = beta
        self.beta = beta
        prepare_sharding(self.accelerator, self.model, orig, fsdp2=args.lens_fsdp2)  # ZeRO-3, FSDP2
        self.add_callback(NonFiniteGuard(args))
        self.prefix_ids = torch.tensor(
            [tokenizer(args.lm_prefix, add_special_tokens=False)["input_ids"]], dtype=torch.long
        )

    # ------------------------------------------------------------------ rewards
    def _reconstruction_reward_fn(self):
        trainer = self

        def reconstruction(prompts, completions, completion_ids, index, **kwargs) -> list[float]:
            """The reconstruction reward (``reward_type``; default -||Â - A||^2 / (d * mean train
            variance): 0 is perfect, -1 is the mean predictor)."""
            device = trainer.accelerator.device
            idx = torch.tensor(index)
            a = trainer.store.A[idx].float().to(device)
            ids = torch.tensor(completion_ids, device=device)
            cur = trainer.store.input_ids[idx, trainer.store.token_pos[idx]].long().to(device)
            with torch.no_grad():  # through the module's forward, as every weight read (FSDP2)
                reward, a_hat = trainer.model(
                    reconstruction_reward,
                    a,
                    ids,
                    cur,
                    trainer.var_mean,
                    train_mean=trainer.train_mean.to(device),
                    reward_type=trainer.lens_args.reward_type,
                )
                w_kl = trainer.lens_args.functional_kl_reward
                if w_kl > 0:
                    batch = {
                        "input_ids": trainer.store.input_ids[idx].long().to(device),
                        "token_pos": trainer.store.token_pos[idx].to(device),
                    }
                    reward = reward - w_kl * functional_kl(trainer.orig, batch, trainer.store.layer, a_hat)
            return reward.tolist()

        return reconstruction

    def _contexts(self, idx: torch.Tensor, width: int = 12) -> list[str]:
        """The text around each activation, ``"...context [[token]]"`` (what the prompts of the
        logged completions and of custom reward functions show)."""
        ids, pos = self.store.input_ids[idx], self.store.token_pos[idx]
        dec = self.processing_class.decode
        return [
            f"{dec(ids[b, max(0, int(p) - width) : int(p)])}[[{dec(ids[b, int(p) : int(p) + 1])}]]"
            for b, p in enumerate(pos.tolist())
        ]

    # ------------------------------------------------------------------ rollouts
    def _rollouts(
        self, acts: torch.Tensor, seed: int, idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``(N, t_text)`` and the sampler's own log q of each (:func:`lens_rollouts`).

        TRL's sampler hands over each activation num_generations times in a row: the rollouts get
        one row per group and sample the group from it (HF: the prefix encoded once and the KV
        cache expanded over the group; vLLM: one request with n = group size)."""
        args = self.lens_args
        if self.vllm_backend is not None:
            self._sync_vllm_weights()
        g = _group_size(idx)
        with torch.no_grad():  # through the module's forward, as every weight read (FSDP2 gathers there)
            out = self.model(_sample, acts[::g], g, args.t_text, args.policy, seed, self.vllm_backend)
        return out.token_ids, out.sampler_logqs

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

        with whole_weights(self.accelerator, base, everywhere=True):  # ZeRO-3: gathered first
            state = full_tensors(merged_state_dict(base))  # FSDP2: the shards gathered, every process
            seconds = self.vllm_backend.sync_weights(state.items())
        self._vllm_synced_step = step
        self._vllm_sync_seconds = seconds

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        device = self.accelerator.device
        mode = "train" if self.model.training else "eval"
        args = self.lens_args
        idx = torch.tensor([x["index"] for x in inputs])
        acts = self.store.A[idx].float().to(device)
        prompts = self._contexts(idx)
        # Seeded from the optimizer step (restored on resume), not from global RNG state.
        step = self.state.global_step
        self._rollout_calls = self._rollout_calls + 1 if getattr(self, "_rollout_step", None) == step else 0
        self._rollout_step = step
        seed = step_seed(args.seed, step, self._rollout_calls, self.accelerator.process_index)
        ids, sampler_lp = self._rollouts(acts, seed, idx)
        mask = torch.ones_like(ids, dtype=torch.long)

        # Scores of the sampled tokens under the current parameters (theta_old), same policy, through
        # the wrapped module: under the trainer's autocast, so bf16 training measures (and corrects)
        # its own mismatch to the sampler.
        with torch.no_grad():
            scores = self.model(
                _score_rollouts, acts, ids, mask, args.policy, self.processing_class.eos_token_id
            )
        pack = scores.diagnostics
        logq_old = scores.logq.float()
        # A sampled token outside the trainer's own support (q_theta_old = 0: a tie at the nucleus
        # edge resolved differently by the sampler's numerics) is one the policy cannot produce:
        # it is left out of the loss (TRL's completion mask), and counted.
        outside = ~torch.isfinite(logq_old)
        mask = mask.masked_fill(outside, 0)
        logq_old = logq_old.masked_fill(outside, LOGQ_FLOOR)

        # Rewards (TRL's machinery: our reconstruction reward first, then any custom ones).
        completions = self.processing_class.batch_decode(ids)
        rewards_per_func = self._calculate_rewards(inputs, prompts, completions, ids.tolist())
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        unscorable = torch.isnan(rewards_per_func).all(dim=1)
        rewards = (rewards_per_func * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
        rewards[unscorable] = torch.nan
        all_advantages, std = group_advantages(rewards.view(-1, num_generations), self.scale_rewards)
        all_advantages, std = all_advantages.flatten(), std.flatten()
        local = slice(
            self.accelerator.process_index * len(prompts), (self.accelerator.process_index + 1) * len(prompts)
        )
        advantages = all_advantages[local]
        flat_groups = zero_std_groups(std.view(-1, num_generations), rewards.view(-1, num_generations))
        if args.filter_zero_std_groups:  # no policy gradient in them: out of the loss and its normaliser
            mask = mask * (~flat_groups.flatten()[local]).to(device).unsqueeze(1)

        metrics = self._metrics[mode]
        for i, name in enumerate(self.reward_func_names):
            metrics[f"rewards/{name}/mean"].append(torch.nanmean(rewards_per_func[:, i]).item())
            metrics[f"rewards/{name}/std"].append(nanstd(rewards_per_func[:, i]).item())
        metrics["reward"].append(torch.nanmean(rewards).item())
        metrics["reward_std"].append(nanstd(rewards).item())
        metrics["frac_reward_zero_std"].append(float(flat_groups.float().mean()))
        self._log_completions_and_reward_logs(prompts, completions, rewards_per_func, all_advantages, mode)
        st = pack.step
        for key, val in (
            ("rb_entropy", st.rb_entropy),
            ("head_mass", st.head_mass),
            ("top1_prob", st.top1_prob),
            ("eff_support", st.eff_support),
        ):
            metrics[f"lens/{key}"].append(self.accelerator.gather(val.float().mean()).mean().item())
        metrics["sampling/outside_trainer_support"].append(
            float(self.accelerator.gather(outside.sum()).sum())
        )
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
            # the rows the co-trained encoder learns from (encoder_rollouts: all, or each group's best)
            "encoder_rows": (
                best_of_group(rewards.view(-1, num_generations)).flatten()[local].to(device)
                if args.encoder_rollouts == "best"
                else torch.ones(len(prompts), device=device)
            ),
            # the sampler's own log q: TRL's off_policy_mask_threshold reads it
            "sampling_per_token_logps": sampler_lp,
        }
        # TRL's rule: old log-probs are needed when the batch is reused after an update (the
        # generation and optimisation steps are misaligned) or to correct the sampler mismatch.
        generate_every = args.steps_per_generation * self.num_iterations
        if args.gradient_accumulation_steps % generate_every != 0 or args.lens_importance_sampling:
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
            if args.vllm_importance_sampling_mode.startswith("sequence"):
                w = w[:, :1]  # one weight per sequence, (N, 1), as TRL hands it to the loss
            out["importance_sampling_ratio"] = w.float()
            unclipped = importance_weights(
                lr, mode=args.vllm_importance_sampling_mode, clip_max=None, mask=mask
            )
            for k, v in mismatch_stats(lr, mask, w.expand_as(lr), unclipped).items():
                metrics[f"sampling/lens_is/{k}"].append(v)
            # TRL's ratio against the untruncated tempered softmax (the issue-6789 bias), for
            # comparison: the kernel's log softmax(z/T)_y, from the same vocabulary sweep.
            full_lp = scores.logp_temp.float()
            metrics["sampling/full_softmax_ratio_mean"].append(
                float(token_log_ratio(full_lp, sampler_lp, mask).exp().mean())
            )
        if self.beta != 0.0:
            out["ref_per_token_logps"] = self._reference_logps(acts, ids)
        return out

    @torch.no_grad()
    def _reference_logps(self, acts: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """log q of the rollouts under the beta-KL reference, with the policy's temperature
        (truncation with beta > 0 is refused by the config: the KL is infinite):
        ``base_lm``, the frozen LM after the fixed text ``lm_prefix``; ``initial_policy``, the
        decoder with the parameters it started from (a copy of its trainable tensors, swapped in by
        ``functional_call``: no second model)."""
        args = self.lens_args
        if args.beta_reference == "initial_policy":
            module = self.accelerator.unwrap_model(self.model)
            params = {k: v.to(acts.device) for k, v in self.initial_decoder.items()}
            return functional_call(module, params, (_reference_logq, acts, ids, args.policy)).float()
        prefix = self.prefix_ids.to(acts.device).expand(len(ids), -1)
        ref_logits = self.orig.logits(torch.cat([prefix, ids], dim=1))[:, prefix.shape[1] - 1 : -1]
        return score_tokens(ref_logits, ids, args.policy).logq.float()

    def _log_completions_and_reward_logs(
        self,
        prompts: list[str],
        completions: list[str],
        rewards_per_func: torch.Tensor,
        all_advantages: torch.Tensor,
        mode: str,
    ) -> None:
        """TRL's bookkeeping after the rewards: the completion log that ``log_completions``
        prints and writes (activation context as the prompt, the explanation as the
        completion, each reward and the advantage), and the flush of the reward functions'
        ``log_extra`` columns and ``log_metric`` scalars (gathered over processes)."""
        device = self.accelerator.device
        self._logs["prompt"].extend(gather_object(prompts))
        self._logs["completion"].extend(gather_object(completions))
        for i, name in enumerate(self.reward_func_names):
            self._logs["rewards"][name].extend(rewards_per_func[:, i].tolist())
        self._logs["advantages"].extend(all_advantages.tolist())
        for column in sorted(set(gather_object(list(self._pending_extra_logs)))):
            values = self._pending_extra_logs.get(column, [None] * len(prompts))
            self._logs["extra"][column].extend(gather_object(values))
        self._pending_extra_logs.clear()
        for name in sorted(set(gather_object(list(self._pending_metrics)))):
            values = self._pending_metrics.get(name, [])
            local_stats = torch.tensor([sum(values), len(values)], dtype=torch.float32, device=device)
            total, count = self.accelerator.gather(local_stats).view(-1, 2).sum(dim=0).tolist()
            self._metrics[mode][name].append(total / max(count, 1))
        self._pending_metrics.clear()

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
        logps, ents, mse = model(
            _score, self._current_activation, tokens, self.lens_args.policy, self._encoder_mse_inputs
        )
        self._encoder_mse = mse
        return logps, (ents if compute_entropy else None), None

    def _compute_loss(self, model, inputs):
        self._current_activation = inputs["activation"]
        w = self.lens_args.encoder_mse_weight
        self._encoder_mse_inputs = (
            (inputs["current_token"], self.store.var.to(inputs["activation"].device), inputs["encoder_rows"])
            if w > 0
            else None
        )
        use_vllm = self.use_vllm
        self.use_vllm = "importance_sampling_ratio" in inputs  # lets TRL apply our weights
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self.use_vllm = use_vllm
        if w > 0:  # the encoder keeps learning to read the explanations the policy now writes
            mse = self._encoder_mse
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["lens/encoder_mse"].append(float(mse.detach()))
            # scaled for gradient accumulation like TRL's own terms (HF's auto-scaling is off)
            normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + w * mse / normalizer
        return loss

    # ------------------------------------------------------------------ optimisation
    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """TRL's optimizer, or with ``encoder_learning_rate`` set, the optimizer ``optim`` names on
        four groups: decoder and encoder parameters (the encoder's at its own rate), each split as
        the Trainer splits them for weight decay. The schedule scales every group alike."""
        lr_enc = self.lens_args.encoder_learning_rate
        if self.optimizer is not None or lr_enc is None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        encoder = {id(p) for p in self.lens.encoder.parameters()}
        groups = []
        for owner, lr in (("decoder", self.args.learning_rate), ("encoder", lr_enc)):
            for in_decay, wd in ((True, self.args.weight_decay), (False, 0.0)):
                params = [
                    p
                    for n, p in opt_model.named_parameters()
                    if p.requires_grad
                    and (id(p) in encoder) == (owner == "encoder")
                    and (n in decay) == in_decay
                ]
                if params:
                    groups.append({"params": params, "lr": lr, "weight_decay": wd})
        self.optimizer = optimizer_on_groups(self, opt_model, groups, "encoder_learning_rate")
        return self.optimizer

    # ------------------------------------------------------------------ evaluation and logs
    def eval_split(self, eval_dataset=None) -> ActivationDataset:
        """The val store (TRL's ``eval_dataset`` only stands for it)."""
        if self.val_store is None:
            raise ValueError("evaluate() needs the val split (val_data).")
        return self.val_store

    def num_eval_explanations(self) -> int:
        """``num_completions_to_print``; unset (TRL: every completion) or 0: 8."""
        return self.args.num_completions_to_print or 8

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """TRL's log (metrics, the completions table, parquet, W&B) plus the completions as
        TensorBoard text when ``log_completions`` and TensorBoard are on."""
        if self.log_completions and self._logs["prompt"]:
            rows = list(
                zip(self._logs["prompt"], self._logs["completion"], self._logs["advantages"], strict=False)
            )
            log_completions_text(self, rows[: self.num_completions_to_print or 8], self.state.global_step)
        super().log(logs, start_time)
