"""The lens GRPO trainer computes TRL's objective on the lens policy, option by option.

For every TRL loss type x importance-sampling level x {num_iterations 1, 2} x {GA 1, 2} (and
the misaligned steps_per_generation=3, GA=4 case), with the lens's importance weights off,
token-level or sequence-level: the trainer's loss and gradient on a fixed batch equal an
independent computation written here from TRL 1.16's formulas, on log q recomputed by a
different code path (``SamplingPolicy.log_probs`` on the decoder's logits, not the fused
scorer). The parameters are moved after the rollout, so ratios differ from 1 wherever TRL keeps
old log-probs. Also: every refused inherited field is refused naming itself.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from lens_rl.config import ConfigError
from lens_rl.models.lens import ConsistencyLens
from lens_rl.testing.configs import tiny_grpo_config
from lens_rl.training.grpo_config import LensGRPOConfig
from lens_rl.training.grpo_trainer import LOGQ_FLOOR, LensGRPOTrainer
from lens_rl.training.refusals import GRPO_REFUSED, TRAINING_ARGS_REFUSED

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]
T_TEXT = 4
# Measured over the 230 checked cases: max |loss - ref| 7.7e-7 (losses up to 1.0) and max
# gradient error 9.4e-7 of the largest gradient entry (fp32). The bounds leave 6-10x margin, while
# a missing 1/GA (factor 2) or a t_text/512 normaliser would exceed them by orders of magnitude.
LOSS_ATOL, GRAD_RTOL = 5e-6, 1e-5


ZERO3 = {"zero_optimization": {"stage": 3}}
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def _config(tmp_path, model_dir, data, **kw) -> LensGRPOConfig:
    """The tiny GRPO config sampling at top-p 0.9 and temperature 1.3. Nothing here trains:
    max_steps, logging_steps and disable_tqdm keep LensGRPOConfig's defaults."""
    fixed = dict(t_text=T_TEXT, top_p=0.9, temperature=1.3, max_steps=-1, logging_steps=10, disable_tqdm=None)
    return tiny_grpo_config(model_dir, {"train": data}, tmp_path, **(fixed | kw))


def _trainer(grpo_parts, cfg) -> LensGRPOTrainer:
    tok, orig, store = grpo_parts
    torch.manual_seed(0)  # the fresh lens's initialisation only
    lens = ConsistencyLens.build(orig.model, tok, cfg.decoder_config, cfg.encoder_config, share_base=True)
    return LensGRPOTrainer(cfg, lens, orig, tok, store)


def _rollout(trainer: LensGRPOTrainer, rows: int) -> dict:
    """One generation batch (rows = per-device batch x steps_per_generation, groups of 4) and
    its first micro-batch, as TRL's _prepare_inputs would hand it to the loss."""
    batch = [{"prompt": "p", "index": 3 * (i // 4) + 1} for i in range(rows)]
    trainer.model.train()
    out = trainer._generate_and_score_completions(batch)
    n = trainer.args.per_device_train_batch_size
    return {
        k: (v[:n] if torch.is_tensor(v) and v.dim() and v.shape[0] == rows else v) for k, v in out.items()
    }


def _perturb(lens: ConsistencyLens, scale: float = 3e-2) -> list[torch.nn.Parameter]:
    """Move every trainable parameter (as an optimizer step would) and return them."""
    g = torch.Generator().manual_seed(1)
    params = [p for p in lens.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=g))
    return params


def _reference_logq_and_entropy(trainer: LensGRPOTrainer, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """log q of the completion tokens and H(q) per position, from ``SamplingPolicy.log_probs`` on
    the decoder's logits (not the fused scorer the trainer uses)."""
    ids = inputs["completion_ids"]
    logits = trainer.lens.decoder.fwd_tokens(inputs["activation"], ids, scores=False).logits
    logp = trainer.lens_args.policy.log_probs(logits)  # -inf outside the truncated support
    q = logp.exp()
    entropy = -(q * torch.where(q > 0, logp, torch.zeros_like(logp))).sum(-1)
    return logp.gather(-1, ids[..., None])[..., 0], entropy


def _reference_loss(
    trainer: LensGRPOTrainer,
    inputs: dict,
    loss_type: str,
    level: str,
    ga: int,
    entropy_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """TRL 1.16's GRPO loss (grpo_trainer.py `_compute_loss`) written out for the lens policy."""
    args = trainer.lens_args
    mask = inputs["completion_mask"].float()
    logq, _ = _reference_logq_and_entropy(trainer, inputs)  # independent of the scorer
    logq = torch.where(torch.isfinite(logq), logq, torch.full_like(logq, LOGQ_FLOOR))  # left the support
    old = inputs.get("old_per_token_logps", logq.detach())
    adv = inputs["advantages"][:, None]
    log_ratio = logq - old
    if level == "token":
        log_w = log_ratio
    else:
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1))[:, None]
    coef_1 = log_w.exp()
    # the lens importance weights, recomputed from the sampler's log q
    is_w = None
    if args.lens_importance_sampling:
        diff = inputs["old_per_token_logps"] - inputs["sampling_per_token_logps"]
        if args.vllm_importance_sampling_mode.startswith("sequence"):
            r = diff.sum(-1, keepdim=True).exp()
        else:
            r = diff.exp()
        hi = args.vllm_importance_sampling_clip_max
        if args.vllm_importance_sampling_mode.endswith("truncate"):
            is_w = r.clamp(max=hi)
        else:
            is_w = torch.where(r <= hi, r, torch.zeros_like(r))
    eps = args.epsilon
    if loss_type == "cispo":
        per_tok = -coef_1.clamp(max=eps).detach() * adv * logq
    elif loss_type == "sapo":
        tau = torch.where(
            adv > 0, torch.tensor(args.sapo_temperature_pos), torch.tensor(args.sapo_temperature_neg)
        )
        per_tok = -(torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau) * adv
    elif loss_type == "vespo":
        seq = (log_ratio.clamp(-20, 20) * mask).sum(-1, keepdim=True)
        if is_w is not None:
            seq = seq + is_w.log().clamp(math.log(1e-8), 20).sum(-1, keepdim=True)
        log_w_seq = seq.clamp(math.log(1e-8), 20)
        k = torch.where(adv >= 0, args.vespo_k_pos, args.vespo_k_neg)
        lam = torch.where(adv >= 0, args.vespo_lambda_pos, args.vespo_lambda_neg)
        phi = (lam + k * log_w_seq - lam * log_w_seq.exp()).exp().detach()
        per_tok = -phi * adv * logq
    else:
        per_tok = -torch.min(coef_1 * adv, coef_1.clamp(1 - eps, 1 + eps) * adv)
    if entropy_mask is not None:
        per_tok = per_tok * entropy_mask
    if is_w is not None and loss_type != "vespo":
        per_tok = per_tok * is_w
    per_tok = per_tok.expand_as(mask) if per_tok.shape[1] == 1 and loss_type != "luspo" else per_tok
    if loss_type in ("grpo", "sapo"):
        return ((per_tok * mask).sum(-1) / mask.sum(-1)).mean() / ga
    if loss_type == "bnpo":
        return (per_tok * mask).sum() / mask.sum() / ga
    if loss_type == "dr_grpo":
        return (per_tok * mask).sum() / (per_tok.shape[0] * T_TEXT) / ga  # max_completion_length = t_text
    if loss_type == "luspo":
        return (per_tok * mask).sum(-1).mean() / ga
    normalizer = inputs["num_items_in_batch"] * ga / args.steps_per_generation  # cispo, dapo, vespo
    return (per_tok * mask).sum() / normalizer


# (num_iterations, gradient_accumulation_steps, steps_per_generation)
SCHEDULES = [(1, 1, None), (2, 1, None), (1, 2, None), (2, 2, None), (1, 4, 3)]
IS_MODES = [None, "token_truncate", "sequence_mask"]


@pytest.mark.parametrize("is_mode", IS_MODES, ids=lambda m: f"is-{m}")
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: f"iter{s[0]}-ga{s[1]}-spg{s[2]}")
def test_loss_and_gradient_match_trl_formula(
    grpo_parts, tmp_path, tiny_model_dir, tiny_dump, schedule, is_mode
):
    num_iterations, ga, spg = schedule
    kw = dict(num_iterations=num_iterations, gradient_accumulation_steps=ga)
    if spg is not None:
        kw["steps_per_generation"] = spg
    if is_mode is None:
        kw["vllm_importance_sampling_correction"] = False
    else:
        kw["vllm_importance_sampling_mode"] = is_mode
    cfg = _config(tmp_path, tiny_model_dir, tiny_dump["train"], **kw)
    trainer = _trainer(grpo_parts, cfg)
    inputs = _rollout(trainer, 8 * cfg.steps_per_generation)
    # TRL's rule for keeping the rollout's log-probs
    needs_old = ga % (cfg.steps_per_generation * num_iterations) != 0 or is_mode is not None
    assert ("old_per_token_logps" in inputs) == needs_old
    assert cfg.max_completion_length == T_TEXT
    # An update between rollout and loss happens exactly where TRL keeps the old log-probs.
    params = _perturb(trainer.lens, 3e-2 if needs_old else 0.0)
    trainer.current_gradient_accumulation_steps = ga
    checked = 0
    for loss_type in LOSS_TYPES:
        if loss_type == "vespo" and is_mode == "sequence_mask":
            continue  # refused by the config (test_vespo_needs_token_level_weights)
        for level in ("token", "sequence"):
            trainer.loss_type = loss_type
            trainer.importance_sampling_level = level
            loss = trainer._compute_loss(trainer.model, inputs)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            ref = _reference_loss(trainer, inputs, loss_type, level, ga)
            ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
            assert torch.isfinite(loss)
            assert abs(float(loss) - float(ref)) <= LOSS_ATOL * max(1.0, abs(float(ref))), (loss_type, level)
            for g, r in zip(grads, ref_grads, strict=True):
                if r is None:
                    assert g is None or g.abs().max() == 0
                    continue
                scale = r.abs().max().clamp(min=1e-8)
                assert (g - r).abs().max() <= GRAD_RTOL * scale, (
                    loss_type,
                    level,
                    float((g - r).abs().max() / scale),
                )
            checked += 1
    assert checked >= 14


@pytest.mark.parametrize("quantile", [1.0, 0.5], ids=lambda q: f"top_entropy_quantile-{q}")
@pytest.mark.parametrize("ga", [1, 2], ids=lambda g: f"ga{g}")
def test_entropy_bonus_and_high_entropy_mask_match_trl(
    grpo_parts, tmp_path, tiny_model_dir, tiny_dump, quantile, ga
):
    """``entropy_coef`` and ``top_entropy_quantile`` act on H(q), the entropy of the policy the
    lens samples from (temperature and top-p), exactly as TRL's formulas act on its policy's
    entropy: the loss is L_policy (tokens below the entropy quantile masked) - coef * the mean
    H(q) over the kept tokens / GA, and the gradient of the bonus flows through H(q)."""
    coef = 0.3
    cfg = _config(
        tmp_path,
        tiny_model_dir,
        tiny_dump["train"],
        entropy_coef=coef,
        top_entropy_quantile=quantile,
        gradient_accumulation_steps=ga,
        vllm_importance_sampling_correction=False,
    )
    trainer = _trainer(grpo_parts, cfg)
    inputs = _rollout(trainer, 8 * cfg.steps_per_generation)
    params = [p for p in trainer.lens.parameters() if p.requires_grad]
    trainer.current_gradient_accumulation_steps = ga
    mask = inputs["completion_mask"].float()
    for loss_type in ("dapo", "grpo", "dr_grpo"):
        trainer.loss_type = loss_type
        loss = trainer._compute_loss(trainer.model, inputs)
        grads = torch.autograd.grad(loss, params, allow_unused=True)

        _, entropy = _reference_logq_and_entropy(trainer, inputs)
        emask = None
        if quantile < 1.0:  # TRL's get_high_entropy_mask, on the reference entropies
            threshold = torch.quantile(entropy.detach()[mask.bool()], 1 - quantile)
            emask = ((entropy.detach() * mask >= threshold) & mask.bool()).float()
            assert 0 < emask.sum() < mask.sum()  # the mask keeps some tokens and drops some
        eff = mask if emask is None else mask * emask
        bonus = (entropy * eff).sum() / eff.sum().clamp(min=1.0) / ga
        ref = _reference_loss(trainer, inputs, loss_type, "token", ga, entropy_mask=emask) - coef * bonus
        ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
        assert abs(float(loss) - float(ref)) <= LOSS_ATOL * max(1.0, abs(float(ref))), loss_type
        assert float(bonus) > 0  # the bonus term is present, not silently zero
        for g, r in zip(grads, ref_grads, strict=True):
            if r is None:
                assert g is None or g.abs().max() == 0
                continue
            scale = r.abs().max().clamp(min=1e-8)
            assert (g - r).abs().max() <= GRAD_RTOL * scale, (loss_type, float((g - r).abs().max() / scale))


def test_encoder_mse_is_scaled_for_accumulation(grpo_parts, tmp_path, tiny_model_dir, tiny_dump):
    """encoder_mse_weight adds w * MSE / GA (like TRL's own terms), from the same wrapped call."""
    losses = {}
    for ga in (1, 2):
        for w in (0.0, 0.5):
            cfg = _config(
                tmp_path,
                tiny_model_dir,
                tiny_dump["train"],
                gradient_accumulation_steps=ga,
                encoder_mse_weight=w,
            )
            trainer = _trainer(grpo_parts, cfg)
            inputs = _rollout(trainer, 8 * cfg.steps_per_generation)
            trainer.current_gradient_accumulation_steps = ga
            losses[ga, w] = float(trainer._compute_loss(trainer.model, inputs))
            if w:
                mse = float(trainer._encoder_mse)
                assert mse > 0
                assert losses[ga, w] - losses[ga, 0.0] == pytest.approx(w * mse / ga, rel=1e-5)


def test_reference_kl_uses_the_policy_temperature(grpo_parts, tmp_path, tiny_model_dir, tiny_dump):
    """beta > 0: ref log-probs are the frozen LM's under the policy's temperature (log q_ref)."""
    cfg = _config(tmp_path, tiny_model_dir, tiny_dump["train"], beta=0.1, top_p=1.0, temperature=1.7)
    trainer = _trainer(grpo_parts, cfg)
    inputs = _rollout(trainer, 8)
    ids = inputs["completion_ids"]
    prefix = trainer.prefix_ids.expand(len(ids), -1)
    logits = trainer.orig.logits(torch.cat([prefix, ids], 1))[:, prefix.shape[1] - 1 : -1]
    ref = torch.log_softmax(logits.float() / 1.7, -1).gather(-1, ids[..., None])[..., 0]
    assert torch.allclose(inputs["ref_per_token_logps"], ref, atol=1e-5)


# A value other than the accepted one for every refused field.
BAD_VALUES = {
    "remove_unused_columns": True,
    "push_to_hub": True,
    "torch_compile": True,
    "use_liger_kernel": True,
    "neftune_noise_alpha": 5.0,
    "label_smoothing_factor": 0.1,
    "label_names": ["labels"],
    "auto_find_batch_size": True,
    "include_for_metrics": ["inputs"],
    "batch_eval_metrics": True,
    "eval_accumulation_steps": 2,
    "eval_do_concat_batches": False,
    "eval_use_gather_object": True,
    "prediction_loss_only": True,
    "bf16_full_eval": True,
    "fp16_full_eval": True,
    "model_init_kwargs": {"dtype": "float16"},
    "trust_remote_code": True,
    "router_aux_loss_coef": 0.01,
    "cast_lm_head_to_fp32": True,
    "num_generations_eval": 2,
    "pad_to_multiple_of": 8,
    "generation_kwargs": {"top_a": 0.1},
    "chat_template_kwargs": {"enable_thinking": False},
    "repetition_penalty": 1.1,
    "cache_implementation": "static",
    "use_vllm": True,
    "vllm_mode": "server",
    "vllm_model_impl": "transformers",
    "vllm_enable_sleep_mode": True,
    "vllm_structured_outputs_regex": "[a-z]+",
    "vllm_server_base_url": "http://localhost:8000",
    "vllm_server_host": "127.0.0.1",
    "vllm_server_port": 8001,
    "vllm_server_timeout": 10.0,
    "vllm_group_port": 51217,
    "vllm_tensor_parallel_size": 2,
    "multi_objective_aggregation": "normalize_then_sum",
    "mask_truncated_completions": True,
    "sync_ref_model": True,
    "max_tool_calling_iterations": 2,
    "log_completions_hub_repo": "me/completions",
    "use_transformers_continuous_batching": True,
    "transformers_continuous_batching_config": {"max_batch_tokens": 64},
    "use_transformers_paged": True,
    "vllm_importance_sampling_cap": 2.0,
}


def test_every_refused_field_is_named(tmp_path, tiny_model_dir, tiny_dump):
    assert set(BAD_VALUES) == set(GRPO_REFUSED) | set(TRAINING_ARGS_REFUSED)
    for name, bad in BAD_VALUES.items():
        with pytest.raises(ConfigError, match=f"LensGRPOConfig.{name}="):
            _config(tmp_path, tiny_model_dir, tiny_dump["train"], **{name: bad})


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(max_completion_length=16), "max_completion_length=16 differs from t_text=4"),
        (dict(lens_importance_sampling=True, vllm_importance_sampling_correction=False), "conflicts"),
        (dict(loss_type="vespo", vllm_importance_sampling_mode="sequence_mask"), "token_truncate"),
        (dict(beta=0.1, top_p=0.9), "truncating policy"),
        (dict(eval_strategy="steps", eval_steps=1), "needs val_data"),
        (dict(fsdp="full_shard"), "fsdp"),
        (dict(deepspeed=ZERO3, peft_config=LORA), r"peft_config: not supported under DeepSpeed ZeRO-3"),
        (
            dict(lens_fsdp2=True, beta=0.01, beta_reference="initial_policy", top_p=1.0),
            r"beta_reference: not supported under FSDP2",
        ),
        (
            dict(deepspeed=ZERO3, beta=0.01, beta_reference="initial_policy", top_p=1.0),
            r"beta_reference: not supported under DeepSpeed ZeRO-3",
        ),
        (
            dict(
                deepspeed=ZERO3, encoder_mse_weight=1.0, eval_strategy="steps", eval_steps=1, val_data="VAL"
            ),
            r"encoder_mse_weight: not supported under DeepSpeed ZeRO-3",
        ),
        (dict(load_best_model_at_end=True), "load_best_model_at_end needs metric_for_best_model"),
        (
            dict(lr_scheduler_type="reduce_lr_on_plateau"),
            "'reduce_lr_on_plateau' needs metric_for_best_model",
        ),
    ],
)
def test_impossible_combinations_are_refused(tmp_path, tiny_model_dir, tiny_dump, kw, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, tiny_model_dir, tiny_dump["train"], **kw)


def test_accepted_defaults(tmp_path, tiny_model_dir, tiny_dump):
    cfg = _config(tmp_path, tiny_model_dir, tiny_dump["train"], vllm_importance_sampling_correction=False)
    assert cfg.lens_importance_sampling is False  # follows TRL's switch
    cfg = _config(tmp_path, tiny_model_dir, tiny_dump["train"])
    assert cfg.lens_importance_sampling is True and cfg.max_completion_length == T_TEXT


def test_launcher_zero3_refusals(tmp_path, tiny_model_dir, tiny_dump, monkeypatch):
    """`accelerate launch --use_deepspeed --zero_stage 3` reaches the job only as environment
    variables; the config alone would not see it. ZeRO-3 parses; what it cannot run is refused."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    if importlib.util.find_spec("deepspeed") is not None:
        assert _config(tmp_path, tiny_model_dir, tiny_dump["train"]).output_dir
    else:  # CI: DeepSpeed is an opt-in extra
        with pytest.raises(
            ConfigError, match=r"ZeRO-3 \(accelerate launch .* needs DeepSpeed, which is not installed"
        ):
            _config(tmp_path, tiny_model_dir, tiny_dump["train"])
    with pytest.raises(
        ConfigError,
        match=r"LensGRPOConfig.peft_config: not supported under DeepSpeed ZeRO-3 \(accelerate launch --zero_stage",
    ):
        _config(tmp_path, tiny_model_dir, tiny_dump["train"], peft_config=LORA)
