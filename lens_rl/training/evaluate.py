"""Held-out evaluation of a lens over a whole split.

Metrics (sums are accumulated over the split, then combined; with N processes each takes
every N-th sample and the sums are reduced):

- ``fve``: 1 - sum||A_train - A||^2 / sum||A - mean_val(A)||^2 over the whole set;
- ``fve_recon``: the same for Â (differs from ``fve`` only with resample ablation);
- ``nmse``: mean((A_train - A)^2) / mean(train feature variance);
- ``baseline_mean_fve`` / ``baseline_mean_nmse``: the trivial predictor "train mean of A";
- ``kl_recon`` / ``kl_train``: functional KL of the next-token distribution with Â / A_train;
- ``lm_kl``: KL(P_orig || P_dec) on the explanations;
- ``entropy``: the decoder's mean next-token entropy;
- ``fve_frozen_encoder`` (when ``frozen_encoder`` is given; the GRPO stage): ``fve`` with the
  same explanations read by the encoder the run started from, i.e. the decoder's own gain,
  apart from the encoder's adaptation to it (EasyNLA's frozen-reconstructor FVE).

The reconstruction arithmetic is :mod:`lens_rl.metrics`'s (:class:`~lens_rl.metrics.FVEAccumulator`
for the split, :func:`~lens_rl.metrics.reconstruct` for each sample explanation's ``rel_error``:
``||A_train - A||^2 / ||A - train_mean||^2``).

:class:`LensEvaluationMixin` is the ``evaluate()`` of both trainers (``LensSFTTrainer``,
``LensGRPOTrainer``): :func:`evaluate_on_processes`, logged as ``eval_*`` with the sample
explanations.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.func import functional_call
from torch.utils.data import DataLoader, Subset
from transformers import Trainer

from lens_rl.data.dataset import materialize
from lens_rl.metrics import FVEAccumulator, functional_kl, reconstruct
from lens_rl.ops.distributions import entropy_from_logits
from lens_rl.training.reports import evaluation_tables
from lens_rl.training.sft_losses import lm_kl, round_trip
from lens_rl.training.trackers import log_samples


@torch.no_grad()
def evaluate_lens(
    lens,
    orig,
    dataset,
    *,
    layer: int,
    t_text: int,
    train_mean: torch.Tensor,
    train_var: torch.Tensor,
    prefix_ids: torch.Tensor,
    tokenizer,
    batch_size: int,
    seed: int,
    resample_ablation: bool,
    num_explanations: int = 8,
    process_index: int = 0,
    num_processes: int = 1,
    reduce=None,
    device: torch.device | str = "cpu",
    frozen_encoder: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Evaluate on every sample of ``dataset``; return (metrics, sample explanations).

    ``frozen_encoder``: encoder parameters (name -> tensor; those not given are the live
    encoder's) to also score the explanations with, as ``fve_frozen_encoder``."""
    was_training = lens.training
    lens.eval()
    # Each process takes every N-th sample (a process may get none on a tiny set).
    subset = Subset(dataset, list(range(process_index, len(dataset), num_processes)))
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False)
    keys = ["n", "kl_recon", "kl_train", "lm_kl", "entropy"]
    acc = {k: torch.zeros((), dtype=torch.float64, device=device) for k in keys}
    d = train_mean.numel()
    # one predictor each: A_train (the lens), Â (differs only with resample ablation), train mean
    fve = {name: FVEAccumulator(d, device) for name in ("train", "recon", "base", "frozen")}
    if frozen_encoder is not None:
        frozen_encoder = {k: v.to(device) for k, v in frozen_encoder.items()}
    samples: list[dict[str, Any]] = []
    mean = train_mean.to(device)
    for i, batch in enumerate(loader):
        batch = materialize({k: v.to(device) for k, v in batch.items()}, orig, layer)
        g = torch.Generator(device).manual_seed(seed + 1_000 * i + process_index)
        gen, a_hat, a_train = round_trip(lens, batch, t_text, 1.0, g, resample_ablation, differentiable=False)
        a = batch["A"].double()
        acc["n"] += a.shape[0]
        fve["train"].update(a_train, a)
        fve["recon"].update(a_hat, a)
        fve["base"].update(mean, a)
        if frozen_encoder is not None:
            cur = batch["input_ids"][torch.arange(a.shape[0], device=a.device), batch["token_pos"]]
            a_frozen = functional_call(
                lens.encoder, frozen_encoder, (gen.generated_text_embeddings,), {"current_token_ids": cur}
            )
            fve["frozen"].update(a_frozen, a)
        acc["kl_recon"] += functional_kl(orig, batch, layer, a_hat).double().sum()
        acc["kl_train"] += functional_kl(orig, batch, layer, a_train).double().sum()
        acc["lm_kl"] += lm_kl(orig, prefix_ids, gen.hard_token_ids, gen.raw_lm_logits).double().mean(1).sum()
        acc["entropy"] += entropy_from_logits(gen.raw_lm_logits).double().mean(1).sum()
        if len(samples) < num_explanations and process_index == 0:
            rel_error = reconstruct(a_train, a, train_mean=mean).rel_error
            for b in range(min(a.shape[0], num_explanations - len(samples))):
                p = int(batch["token_pos"][b])
                ids = batch["input_ids"][b]
                samples.append(
                    {
                        "index": int(batch["index"][b]),
                        "position": p,
                        "context": tokenizer.decode(ids[max(0, p - 15) : p]),
                        "token": tokenizer.decode(ids[p : p + 1]),
                        "explanation": tokenizer.decode(gen.hard_token_ids[b]),
                        "rel_error": float(rel_error[b]),
                    }
                )
    if len(dataset) == 0:
        raise ValueError("The evaluation set is empty.")
    if reduce is not None:
        acc = {k: reduce(v) for k, v in acc.items()}
        for f in fve.values():
            f.reduce_(reduce)
    n = acc["n"]
    metrics = {
        "fve": fve["train"].fve(),
        "fve_recon": fve["recon"].fve(),
        "baseline_mean_fve": fve["base"].fve(),
        "nmse": fve["train"].nmse(train_var),
        "baseline_mean_nmse": fve["base"].nmse(train_var),
        "kl_recon": acc["kl_recon"] / n,
        "kl_train": acc["kl_train"] / n,
        "lm_kl": acc["lm_kl"] / n,
        "entropy": acc["entropy"] / n,
        "num_samples": n,
    }
    if frozen_encoder is not None:
        metrics["fve_frozen_encoder"] = fve["frozen"].fve()
    lens.train(was_training)
    return {k: float(v) for k, v in metrics.items()}, samples


def evaluate_on_processes(
    accelerator, step: int, lens, orig, dataset, **kwargs
) -> tuple[dict[str, float], list]:
    """:func:`evaluate_lens` as both trainers run it: every process takes its share of
    ``dataset``, the sums are reduced, and the main process prints the metrics and sample
    explanations (:func:`lens_rl.training.reports.evaluation_tables`). ``kwargs`` are
    :func:`evaluate_lens`'s keyword arguments other than the process layout and the device."""
    acc = accelerator
    metrics, samples = evaluate_lens(
        lens,
        orig,
        dataset,
        process_index=acc.process_index,
        num_processes=acc.num_processes,
        reduce=(lambda t: acc.reduce(t, "sum")) if acc.num_processes > 1 else None,
        device=acc.device,
        **kwargs,
    )
    if acc.is_main_process:
        from rich.console import Console

        Console().print(*evaluation_tables(metrics, samples, step=step))
    return metrics, samples


def _evaluate_through_module(lens, accelerator, step: int, orig, dataset, **kwargs):
    """:func:`evaluate_on_processes` as ``model(fn, ...)`` runs it (``fn(lens, *args)``)."""
    return evaluate_on_processes(accelerator, step, lens, orig, dataset, **kwargs)


class LensEvaluationMixin:
    """``evaluate()`` for a lens trainer (a base before ``Trainer``/``GRPOTrainer``): the whole-set
    lens evaluation (FVE, normalised MSE, functional and LM KL, baselines, sample explanations)
    sharded over processes, logged as ``eval_*`` (through ``Trainer.log``: TRL's ``log`` would
    flush its training metrics), the samples to the trackers and kept in ``last_samples``.

    The trainer sets ``lens``, ``orig``, ``layer``, ``train_mean``, ``train_var`` and
    ``prefix_ids`` and implements :meth:`eval_split`; ``explanations_file`` (a name in
    ``output_dir``) also appends each evaluation's samples as JSON lines."""

    explanations_file: str | None = None

    def eval_split(self, eval_dataset=None):
        """The dataset to evaluate (raises ``ValueError`` when there is none)."""
        raise NotImplementedError

    def num_eval_explanations(self) -> int:
        """Sample explanations per evaluation: ``num_completions_to_print``."""
        return self.args.num_completions_to_print

    def evaluate(
        self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """Whole-set lens evaluation on every process's share of the validation split."""
        dataset = self.eval_split(eval_dataset)
        args = self.args
        # through the module's forward, as every weight read (FSDP2 gathers the root unit there)
        metrics, samples = self.model(
            _evaluate_through_module,
            self.accelerator,
            self.state.global_step,
            self.orig,
            dataset,
            layer=self.layer,
            t_text=args.t_text,
            train_mean=self.train_mean,
            train_var=self.train_var,
            prefix_ids=self.prefix_ids.to(self.accelerator.device),
            tokenizer=self.processing_class,
            batch_size=args.per_device_eval_batch_size,
            seed=args.seed + 7919,
            resample_ablation=getattr(args, "resample_ablation", False),
            num_explanations=self.num_eval_explanations(),
            frozen_encoder=getattr(self, "frozen_encoder", None),
        )
        if self.explanations_file is not None and args.should_save and samples:
            out = Path(args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            with (out / self.explanations_file).open("a") as f:
                for s in samples:
                    f.write(json.dumps({"step": self.state.global_step, **s}) + "\n")
        self.last_samples = samples
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in metrics.items()}
        Trainer.log(self, metrics)
        log_samples(self, samples, self.state.global_step)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
