"""The entropy probe end to end: how does ONE training update change the policy's entropy?

Phases (each timed; ``results.json`` holds the timings next to the cost of one training step):

1. ``sample_e``: the evaluation batch E, B_E prompts drawn with replacement from the pool, one
   response each, from the sampling policy q_theta;
2. ``sample_u``: the update batch U, B_U distinct prompts x G responses, and their rewards;
3. ``update_vector``: the GRPO loss on U with TRL's normalisation, backward, gradient clipping
   and the AdamW direction v (``theta_new = theta + lr v``), checked against a real
   ``optimizer.step()``; ``sample_u + update_vector`` is one training step on U;
4. ``score_e``: teacher-forced log q, RB entropies and per-step features of E at theta;
5. ``jvp``: per-token directional derivatives of log q and the RB entropy along v (one batched
   forward-mode pass over E serves every baseline);
6. ``truth``: SNIS estimates of ``H(theta + eta v) - H(theta)`` over the eta sweep;
7. ``resample``: optional direct check, E re-sampled at ``theta + eta v`` with the same noise.

One :class:`~lens_rl.ops.sampling.SamplingPolicy` (inside the SequenceProcessor) drives the
sampler, log q, the RB entropy and the importance weights. The policy runs in eval mode
(no dropout) throughout, in float32 with float64 vocabulary math by default.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
import trl
from rich.console import Console
from transformers import AutoTokenizer

from lens_rl.data.dataset import ActivationDataset
from lens_rl.models.families import load_causal_lm
from lens_rl.models.lens import ConsistencyLens
from lens_rl.models.loading import local_folder
from lens_rl.probe.config import EntropyProbeConfig
from lens_rl.probe.estimators import (
    FEATURE_NAMES,
    Estimate,
    base_entropy_stat,
    covariance_stat,
    covariance_terms,
    estimate,
    prediction_stat,
    prediction_terms,
    snis_stat,
    snis_terms,
    weight_diagnostics,
)
from lens_rl.probe.from_run import apply_run, read_run
from lens_rl.probe.report import NORMALIZATIONS, closeness, plot_probe, summary_table
from lens_rl.probe.subjects import (
    ProbeSubject,
    lens_subject,
    lm_subject,
    load_trl_checkpoint,
    shifted_parameters,
)
from lens_rl.probe.update_vector import (
    adamw_direction,
    build_optimizer,
    named_direction,
    pg_loss,
    verify_against_step,
)
from lens_rl.processing.sequence_processor import (
    BatchedSequences,
)
from lens_rl.training.rewards import group_advantages
from lens_rl.utils.files import replace_on_success
from lens_rl.utils.outputs import refuse_existing_outputs
from lens_rl.utils.progress import progress_bar

COVARIANCE_REFERENCE = (
    "Cui et al. 2025 (arXiv 2505.22617): deltaH ~ -eta Cov(log q, A) over every scored token of the "
    "update batch U (A: the GRPO advantages of the step); per_sequence = per_token x mean tokens per "
    "sequence of U. Exact for a tabular softmax under the natural-PG logit step z += eta A; it does not "
    "use v. Its SE: jackknife over U's GRPO groups. covariance_difference = truth - eta (-Cov), SE "
    "given U (the truth's, over E)."
)


# ---------------------------------------------------------------------------- phases
class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def _flat(x: torch.Tensor) -> torch.Tensor:
    """``(B, G, T) -> (B G, T)`` on CPU."""
    return x.reshape(-1, x.shape[-1]).cpu()


def compute_update_vector(
    subject: ProbeSubject,
    seqs_u: BatchedSequences,
    rewards: torch.Tensor,
    cfg: EntropyProbeConfig,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """v for one AdamW step on the GRPO loss over U (see :mod:`lens_rl.probe.update_vector`)."""
    module = subject.module
    opt = build_optimizer(
        subject.optimizer_module or module,
        cfg.learning_rate,
        (cfg.adam_beta1, cfg.adam_beta2),
        cfg.adam_epsilon,
        cfg.weight_decay,
    )
    state_path = cfg.optimizer_state or (
        str(Path(cfg.trl_checkpoint) / "optimizer.pt") if cfg.trl_checkpoint else None
    )
    if state_path:
        saved = torch.load(state_path, map_location="cpu", weights_only=True)
        try:
            opt.load_state_dict(saved)
        except ValueError as e:
            raise ValueError(
                f"{state_path} does not fit the probe's AdamW parameter groups ({e}); it must come from "
                "an optimizer over the same trainable parameters, grouped as transformers.Trainer does."
            ) from e
        # the saved groups carry the lr of the saved step (0 at the end of a linear schedule); the
        # probed step uses the config's (a run's next-step lr, or an explicit override)
        for i, group in enumerate(opt.param_groups):
            group.update(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
            group["weight_decay"] = cfg.weight_decay if i == 0 else 0.0
    module.zero_grad(set_to_none=True)
    res = subject.sp.teacher_force_logprobs(seqs_u, with_grad=True, compute_rb=False, progress=progress)
    adv = group_advantages(rewards, cfg.scale_rewards)[0].flatten().to(res.token_logqs.device)
    mask = seqs_u.gen_mask.reshape(adv.shape[0], -1)
    token_logq = res.token_logqs.reshape(adv.shape[0], -1)
    loss = pg_loss(token_logq, mask, adv, cfg.loss_type, cfg.max_new_tokens)
    loss.backward()
    trainable = [p for p in module.parameters() if p.requires_grad]
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm else float("inf")  # 0: off, as transformers
    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, max_norm))
    direction = adamw_direction(opt)
    info: dict[str, Any] = {
        "loss": float(loss.detach()),
        "grad_norm_before_clip": grad_norm,
        "clip_coef": min(1.0, max_norm / (grad_norm + 1e-6)),
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()),
        "num_trainable_params": sum(p.numel() for p in trainable),
        "optimizer_steps_before": max(
            (int(st["step"]) for st in opt.state.values() if "step" in st), default=0
        ),
    }
    if cfg.verify_update:
        info["verify_against_optimizer_step"] = verify_against_step(opt, direction)
    module.zero_grad(set_to_none=True)
    v_named = named_direction(module, direction)
    v_norm = float(
        torch.sqrt(
            sum((v.double().pow(2).sum() for v in v_named.values()), torch.zeros((), dtype=torch.float64))
        )
    )
    lr = float(opt.defaults["lr"])
    if not (math.isfinite(v_norm) and v_norm > 0 and math.isfinite(lr) and lr > 0):
        raise ValueError(
            f"The update direction is zero or not finite (|v| = {v_norm}, lr = {lr}, |g| = {grad_norm}, "
            f"reward std {info['reward_std']:.3g}): there is no step to probe. A zero reward spread in "
            "every group gives zero advantages; try another seed or a larger batch_size_u."
        )
    info["v_norm"] = v_norm
    # the covariance baseline (Cui et al. 2025) reads the update batch: popped by probe()
    info["_covariance_terms"] = covariance_terms(token_logq, mask, adv)
    return v_named, info


def _features(pack, mask: torch.Tensor) -> torch.Tensor:
    """``(N, T, F)`` per-step features of the step distribution (prefix-only: valid baselines)."""
    step = pack.step
    t = mask.shape[1]
    cols = []
    for name in FEATURE_NAMES:
        if name == "position":
            x = (torch.arange(t, dtype=torch.float64) / t).expand(mask.shape[0], t)
        else:
            x = torch.nan_to_num(getattr(step, name).double().cpu().reshape(mask.shape), 0.0, 0.0, 0.0)
        cols.append(torch.where(mask, x, torch.zeros_like(x)))
    return torch.stack(cols, -1)


@contextlib.contextmanager
def _phase(
    timer: _Timer, name: str, description: str, total: int, show: bool
) -> Iterator[Callable[[int], None]]:
    """A timed phase with a progress bar (rate and ETA) over ``total`` items."""

    with timer.phase(name), progress_bar(description, total, enabled=show) as advance:
        yield lambda k=1: advance(k)


def _est(stat, n: int, cfg: EntropyProbeConfig, salt: int) -> Estimate:
    return estimate(stat, n, cfg.se_method, cfg.ci_level, cfg.n_bootstrap, seed=cfg.seed + salt)


@dataclass
class ProbeOutput:
    """``results`` (``results.json``'s content) and the update vector ``v`` (by parameter name)."""

    results: dict[str, Any]
    v_named: dict[str, torch.Tensor]


def probe(subject: ProbeSubject, cfg: EntropyProbeConfig, show_progress: bool = True) -> ProbeOutput:
    """Run phases 1-7 on ``subject``."""
    sp = subject.sp
    if cfg.batch_size_u > subject.pool_size:
        raise ValueError(f"batch_size_u={cfg.batch_size_u} exceeds the prompt pool ({subject.pool_size}).")
    subject.module.eval()
    timer = _Timer()
    gen = torch.Generator().manual_seed(cfg.seed)
    n_e, n_u = cfg.batch_size_e, cfg.batch_size_u * cfg.num_generations

    def bar(name: str, description: str, total: int):
        return _phase(timer, name, description, total, show_progress)

    with bar("sample_e", "sample E (sequences)", n_e) as adv:
        idx_e = torch.randint(0, subject.pool_size, (cfg.batch_size_e,), generator=gen)
        seqs_e = sp.generate_batched(subject.prompts(idx_e), G=1, seed=cfg.seed + 1, progress=adv)
    with bar("sample_u", "sample U (sequences)", n_u) as adv:
        idx_u = torch.randperm(subject.pool_size, generator=gen)[: cfg.batch_size_u]
        seqs_u = sp.generate_batched(
            subject.prompts(idx_u), G=cfg.num_generations, seed=cfg.seed + 2, progress=adv
        )
        rewards = subject.rewards(seqs_u, idx_u)
    with bar("update_vector", "update vector (U scored)", n_u) as adv:
        v_named, update_info = compute_update_vector(subject, seqs_u, rewards, cfg, progress=adv)
    with bar("score_e", "score E", n_e) as adv:
        base, diag = sp.teacher_force_logprobs_with_diagnostics(seqs_e, progress=adv)
        mask = _flat(seqs_e.gen_mask).bool()
        logq0, rb0 = _flat(base.token_logqs), _flat(base.rb_entropies)
        feats = _features(diag.diagnostics, mask)
    with bar("jvp", "JVP along v", n_e) as adv:
        tang = sp.teacher_force_jvp(seqs_e, v_named, method=cfg.jvp_method, progress=adv)
    n = mask.shape[0]
    consistency = {
        "max_abs_rb_jvp_primal_vs_scored": float((_flat(tang.rb_entropies) - rb0).abs().max()),
        "max_abs_logq_jvp_primal_vs_scored": float(
            torch.where(mask, _flat(tang.token_logqs).double() - logq0.double(), 0.0).abs().max()
        ),
    }
    h_seq, length = (rb0.double() * mask).sum(-1), mask.double().sum(-1)
    ones = torch.ones(n, dtype=torch.float64)
    results: dict[str, Any] = {
        "base": {
            k: _est(base_entropy_stat(h_seq, length, ones, k), n, cfg, 0).as_dict() for k in NORMALIZATIONS
        }
        | {"num_sequences": n, "mean_length": float(length.mean())},
        "prediction": {},
        "best_baseline": {},
    }
    pred_stats: dict[str, Callable] = {}
    for norm in NORMALIZATIONS:
        results["prediction"][norm] = {}
        best = None
        for bl in cfg.baselines:
            terms = prediction_terms(
                rb0,
                _flat(tang.d_rb_entropies),
                _flat(tang.d_token_logqs),
                mask,
                features=feats,
                baseline=bl,
                normalize=norm,
                folds=cfg.cross_fit_folds,
                ridge=cfg.ridge,
                generator=torch.Generator().manual_seed(cfg.seed + 3),
            )
            stat = prediction_stat(terms, norm)
            est = _est(stat, n, cfg, 1)
            results["prediction"][norm][bl] = {"dh_deta": est.as_dict()}
            if best is None or est.se < best[1].se:
                best = (bl, est, stat)
        results["best_baseline"][norm] = best[0]
        pred_stats[norm] = best[2]
    cov_terms = update_info.pop("_covariance_terms")
    if cfg.batch_size_u >= 2:  # advantages are relative to the group: replicates leave out whole groups
        cov_terms = cov_terms.by_group(cfg.num_generations)
    n_cov = cov_terms.logq.numel()
    cov_est = {norm: _est(covariance_stat(cov_terms, norm), n_cov, cfg, 5) for norm in NORMALIZATIONS}
    results["covariance"] = {
        norm: {"dh_deta": cov_est[norm].as_dict(), "replicate_units": n_cov} for norm in NORMALIZATIONS
    } | {"reference": COVARIANCE_REFERENCE}
    entries = []
    n_eta = len(cfg.eta_list)
    with bar("truth", f"SNIS over {n_eta} eta (E scored)", n_eta * n_e) as adv:
        for eta in cfg.eta_list:
            new = sp.teacher_force_logprobs(
                seqs_e, params_override=sp.build_params_override(v_named, eta), progress=adv
            )
            st = snis_terms(
                logq0, _flat(new.token_logqs), rb0, _flat(new.rb_entropies), mask, cfg.clip_log_weight
            )
            entry: dict[str, Any] = {"eta": eta, "weights": weight_diagnostics(st)}
            for norm in NORMALIZATIONS:
                truth, pred = snis_stat(st, norm), pred_stats[norm]
                entry[norm] = {
                    "truth": _est(truth, n, cfg, 2).as_dict(),
                    "prediction": _est(lambda c, p=pred, e=eta: e * p(c), n, cfg, 2).as_dict(),
                    "difference": _est(
                        lambda c, t=truth, p=pred, e=eta: t(c) - e * p(c), n, cfg, 2
                    ).as_dict(),
                    "covariance": Estimate(
                        eta * cov_est[norm].value, eta * cov_est[norm].se, cfg.ci_level
                    ).as_dict(),
                    # given U (which fixes v and the covariance) only E varies: the truth's SE
                    "covariance_difference": _est(
                        lambda c, t=truth, k=eta * cov_est[norm].value: t(c) - k, n, cfg, 2
                    ).as_dict(),
                }
            entries.append(entry)
    if cfg.resample_check:
        with bar("resample", f"resample E at {n_eta} eta (sampled + scored)", 2 * n_eta * n_e) as adv:
            for entry in entries:
                with shifted_parameters(subject.module, v_named, entry["eta"]):
                    seqs_r = sp.generate_batched(subject.prompts(idx_e), G=1, seed=cfg.seed + 1, progress=adv)
                scored = sp.teacher_force_logprobs(
                    seqs_r, params_override=sp.build_params_override(v_named, entry["eta"]), progress=adv
                )
                m_r = _flat(seqs_r.gen_mask).bool()
                h_r = (_flat(scored.rb_entropies).double() * m_r).sum(-1)
                len_r = m_r.double().sum(-1)
                for norm in NORMALIZATIONS:
                    new_s = base_entropy_stat(h_r, len_r, ones, norm)
                    old_s = base_entropy_stat(h_seq, length, ones, norm)
                    entry[norm]["resample"] = _est(
                        lambda c, a=new_s, b=old_s: a(c) - b(c), n, cfg, 4
                    ).as_dict()
                entry["resample_changed_fraction"] = float(
                    (_flat(seqs_r.gen_tokens()) != _flat(seqs_e.gen_tokens())).any(-1).double().mean()
                )
    results.update(
        {
            "learning_rate": cfg.learning_rate,
            "entries": entries,
            "update": update_info,
            "consistency": consistency,
            "timings_s": timer.seconds,
            "training_step_s": timer.seconds["sample_u"] + timer.seconds["update_vector"],
        }
    )
    return ProbeOutput(results, v_named)


OUTPUT_FILES = ("config.json", "probe.png", "results.json")  # renamed into place in this order


def run_entropy_probe(cfg: EntropyProbeConfig, show_progress: bool = True) -> dict[str, Any]:
    """Load the policy named by ``cfg``, probe it and write ``results.json``, ``config.json``,
    ``probe.png``; print the summary table. Returns the results."""

    refuse_existing_outputs(
        cfg.output_dir, OUTPUT_FILES, cfg.overwrite_output_dir, "--overwrite_output_dir true"
    )
    console = Console(width=max(Console().width, 132))
    run_record = None
    if cfg.trl_checkpoint:
        settings = read_run(cfg.trl_checkpoint)
        run_record = apply_run(cfg, settings)
        console.print(
            f"probing the next step of {run_record['checkpoint']} (step {run_record['global_step']} of "
            f"{run_record['max_steps']}); from the run: "
            + ", ".join(f"{k}={v}" for k, v in run_record["from_run"].items())
        )
        for k, v in run_record["overrides"].items():
            console.print(f"[yellow]override: {k}={v['probe']} (the run has {v['run']})[/yellow]")
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    )
    local_folder(cfg.model_name_or_path)  # local folders only: no Hub lookup for a mistyped path
    tok = AutoTokenizer.from_pretrained(cfg.model_name_or_path)
    if cfg.policy == "lm":
        model = load_causal_lm(cfg.model_name_or_path, dtype=torch.float32).to(device)
        subject = lm_subject(model, tok, cfg)
    else:
        base = load_causal_lm(cfg.model_name_or_path, dtype=torch.float32)
        if cfg.lens_path is not None:
            lens = ConsistencyLens.from_pretrained(cfg.lens_path, base=base, tokenizer=tok).to(device)
        else:  # a run that started from a fresh lens: its architecture from the run's config
            args = settings.args
            lens = ConsistencyLens.build(
                base, tok, args.decoder_config, args.encoder_config, share_base=True
            ).to(device)
        store = ActivationDataset(cfg.activations)
        store.check_compatible(base.get_input_embeddings().weight.shape[1], model=base)
        subject = lens_subject(lens, tok, store, cfg)
        if cfg.trl_checkpoint:
            subject.optimizer_module = load_trl_checkpoint(lens, cfg.trl_checkpoint)
    results = probe(subject, cfg, show_progress=show_progress).results
    if run_record is not None:
        results["run"] = run_record
    results["config"] = cfg.to_dict()
    results["versions"] = _versions()
    results["closeness"] = {norm: closeness(results, norm) for norm in NORMALIZATIONS}
    out = Path(cfg.output_dir)
    # temporary names renamed at the end, results.json last: the three files appear together
    with replace_on_success(*(out / name for name in OUTPUT_FILES)) as (config_tmp, png_tmp, results_tmp):
        plot_probe(results, png_tmp)
        config_tmp.write_text(json.dumps(cfg.to_dict(), indent=2))
        results_tmp.write_text(json.dumps(results, indent=2))
    console.print(summary_table(results, "per_token"))
    console.print(summary_table(results, "per_sequence"))
    for norm, c in results["closeness"].items():
        closer = "first order" if c["first_order"] <= c["covariance"] else "covariance"
        console.print(
            f"{norm}: mean |truth - estimate| over eta: first order {c['first_order']:.3e}, covariance "
            f"{c['covariance']:.3e} ({c['covariance_over_first_order']:.3g}x): {closer} is closer"
        )
    low = [e["eta"] for e in results["entries"] if e["weights"]["ess_fraction"] < 0.1]
    if low:
        console.print(
            f"[yellow]ESS/N < 0.1 at eta {low}: the SNIS ground truth rests on a few sequences there; "
            "trust the resample column or use smaller eta / a larger E.[/yellow]"
        )
    moved = [e["eta"] for e in results["entries"] if e["weights"]["outside_support_fraction"] > 0]
    if moved:
        console.print(
            f"[yellow]At eta {moved} some sampled tokens left the new top-p/top-k nucleus: the support "
            "changed, so SNIS misses tokens that entered it; prefer smaller eta.[/yellow]"
        )
    u = results["update"]
    console.print(
        f"update: loss {u['loss']:+.4f}, |g| {u['grad_norm_before_clip']:.3g} (clip x{u['clip_coef']:.3f}), "
        f"|v| {u['v_norm']:.3g}; timings (s): "
        + ", ".join(f"{k} {v:.1f}" for k, v in results["timings_s"].items())
        + f"; one training step {results['training_step_s']:.1f} s"
    )
    return results


def _versions() -> dict[str, str]:
    return {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}
