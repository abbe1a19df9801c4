"""Supervised consistency-lens training on ``accelerate`` (CPU, 1 GPU, DDP, DeepSpeed ZeRO-2).

``SFTTrainer(cfg).train()`` runs the whole stage: build the orig model, the data and the lens;
optimise with AdamW (parameter groups by module: projections, prompts, base), an LR schedule
from ``transformers.get_scheduler``, gradient accumulation and clipping; evaluate on the
held-out split; checkpoint every N steps (``accelerator.save_state`` plus the data position);
``--resume`` continues exactly where a run stopped (same data order, same Gumbel noise: the
noise generator is seeded from the micro-step counter, not from global RNG state).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from lens_rl.data.dataset import ActivationDataset, OnTheFlyDataset, materialize
from lens_rl.models.lens import ConsistencyLens
from lens_rl.models.orig import OrigWrapper
from lens_rl.training.evaluate import evaluate_lens
from lens_rl.training.sft_config import SFTConfig
from lens_rl.training.sft_losses import StepWeights, sft_losses
from lens_rl.utils.progress import progress_bar

STATE_FILE = "trainer_state.json"


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch (``set_epoch``), independent of global RNG state."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch``."""
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def param_groups(lens: ConsistencyLens, cfg: SFTConfig) -> list[dict[str, Any]]:
    """AdamW groups by module ownership (not name substrings); no decay on 1-D tensors/prompts."""
    dec, enc = lens.decoder, lens.encoder
    owners: list[tuple[str, list[torch.nn.Parameter], float]] = [
        ("projection", [*dec.projection_parameters(), *enc.proj.parameters()], cfg.lr_projection),
        ("prompt", [*dec.prompt_parameters(), enc.prompt_left_emb, enc.prompt_right_emb], cfg.lr_prompt),
    ]
    claimed = {id(p) for _, ps, _ in owners for p in ps}
    base = [p for p in lens.parameters() if id(p) not in claimed]  # base weights of decoder/encoder
    owners.append(("base", base, cfg.lr_base))
    groups = []
    seen: set[int] = set()
    for name, params, mult in owners:
        params = [p for p in params if p.requires_grad and id(p) not in seen and not seen.add(id(p))]
        decay = [p for p in params if p.dim() >= 2 and name != "prompt"]
        no_decay = [p for p in params if not (p.dim() >= 2 and name != "prompt")]
        for suffix, ps, wd in (("", decay, cfg.weight_decay), ("_no_decay", no_decay, 0.0)):
            if ps:
                groups.append(
                    {"name": name + suffix, "params": ps, "lr": cfg.learning_rate * mult, "weight_decay": wd}
                )
    if not groups:
        raise ValueError("No trainable parameters: every trainable_* flag of decoder and encoder is False.")
    return groups


class SFTTrainer:
    """Runs supervised lens training for one :class:`SFTConfig`."""

    def __init__(self, cfg: SFTConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.ckpt_root = self.out / "checkpoints"

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Build accelerator, models, data, optimizer and scheduler."""
        from accelerate import Accelerator
        from accelerate.utils import GradientAccumulationPlugin, set_seed
        from transformers import AutoTokenizer, get_scheduler

        cfg = self.cfg
        cuda = torch.cuda.is_available()
        mp = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("bf16" if cuda else "no")
        if mp != "no" and not cuda:
            raise ValueError(f"mixed_precision={mp!r} needs a GPU; use 'no' (fp32) or 'auto' on CPU.")
        if cfg.report_to == "wandb":
            os.environ.setdefault("WANDB_MODE", "offline")
        self.acc = Accelerator(
            cpu=not cuda,
            mixed_precision=mp,
            # Optimizer steps every k micro-batches across epoch boundaries (no forced sync at an
            # epoch's end), so a resumed run (whose loader skips batches) steps at the same places.
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=cfg.gradient_accumulation_steps, sync_with_dataloader=False
            ),
            log_with=None if cfg.report_to == "none" else cfg.report_to,
            project_dir=str(self.out),
        )
        set_seed(cfg.seed, device_specific=False)  # only the fresh projections' init uses it
        acc = self.acc
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_name_or_path or cfg.model_name_or_path)
        self.orig = OrigWrapper.from_pretrained(cfg.model_name_or_path).to(acc.device)
        n_layers = self.orig.n_layers

        if cfg.train_data:
            self.train_set = ActivationDataset(cfg.train_data)
            self.val_set = ActivationDataset(cfg.val_data) if cfg.val_data else None
            self.layer = self.train_set.layer
            d_model = self.orig.model.get_input_embeddings().weight.shape[1]
            for ds in (self.train_set, self.val_set):
                if ds is not None:
                    ds.check_compatible(d_model, self.layer)
            self.train_mean, self.train_var = self.train_set.mean, self.train_set.var
        else:
            self._setup_on_the_fly(n_layers)
        self.layer %= n_layers

        meta = {
            "model_name_or_path": cfg.model_name_or_path,
            "tokenizer_name_or_path": cfg.tokenizer_name_or_path or cfg.model_name_or_path,
            "layer": self.layer,
            "t_text": cfg.t_text,
            "train_mean": self.train_mean.tolist(),
            "train_var": self.train_var.tolist(),
        }
        lens = ConsistencyLens.build(
            self.orig.model, self.tokenizer, cfg.decoder_config, cfg.encoder_config, cfg.share_base, meta
        ).to(acc.device)
        lens.train()
        groups = param_groups(lens, cfg)
        self.group_names = [g.pop("name") for g in groups]
        optimizer = torch.optim.AdamW(groups, betas=(cfg.adam_beta1, cfg.adam_beta2))
        scheduler = get_scheduler(
            cfg.lr_scheduler_type,
            optimizer,
            num_warmup_steps=cfg.warmup_steps,
            num_training_steps=cfg.max_steps,
        )
        self.sampler = EpochSampler(len(self.train_set), cfg.seed)
        loader = DataLoader(
            self.train_set, batch_size=cfg.per_device_batch_size, sampler=self.sampler, drop_last=True
        )
        if len(loader) == 0:
            raise ValueError(
                f"The training set ({len(self.train_set)} samples) is smaller than one batch "
                f"({cfg.per_device_batch_size}); lower per_device_batch_size."
            )
        self.lens, self.optimizer, self.loader, self.scheduler = acc.prepare(
            lens, optimizer, loader, scheduler
        )
        self.feature_var = self.train_var.to(acc.device)
        self.prefix_ids = torch.tensor(
            [self.tokenizer(cfg.lm_natural_prefix, add_special_tokens=False)["input_ids"]], device=acc.device
        )
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        if cfg.report_to != "none":
            acc.init_trackers("lens_rl_sft", config={k: str(v) for k, v in cfg.to_dict().items()})

    def _setup_on_the_fly(self, n_layers: int) -> None:
        from lens_rl.config import parse_args
        from lens_rl.data.dump import DumpConfig, dump_windows

        (dcfg,) = parse_args(
            [DumpConfig],
            ["--config", self.cfg.on_the_fly, "--model_name_or_path", self.cfg.model_name_or_path],
        )
        splits = dump_windows(dcfg, self.tokenizer)
        self.layer = dcfg.layer % n_layers
        self.train_set = OnTheFlyDataset(splits["train"], self.layer)
        self.val_set = OnTheFlyDataset(splits["val"], self.layer) if len(splits["val"]) else None
        # Normalisation statistics from (up to) 512 training windows.
        idx = torch.arange(min(512, len(self.train_set)))
        w = splits["train"]
        acts = torch.cat(
            [
                self.orig.capture(w.input_ids[c].to(self.orig.model.device), self.layer, w.token_pos[c]).cpu()
                for c in idx.split(64)
            ]
        ).double()
        self.train_mean, self.train_var = acts.mean(0).float(), acts.var(0, unbiased=False).float()

    # ------------------------------------------------------------------ checkpoints
    def _checkpoints(self) -> list[Path]:
        if not self.ckpt_root.exists():
            return []
        return sorted(self.ckpt_root.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))

    def save_checkpoint(self, state: dict[str, Any]) -> Path:
        """Save model/optimizer/scheduler/RNG (accelerate) plus the data position; keep the last k."""
        path = self.ckpt_root / f"step_{state['step']:08d}"
        self.acc.save_state(str(path))
        if self.acc.is_main_process:
            (path / STATE_FILE).write_text(json.dumps(state))
            keep = max(self.cfg.save_total_limit, 1)
            for old in self._checkpoints()[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return path

    def _resume_state(self) -> dict[str, Any]:
        ckpts = [c for c in self._checkpoints() if (c / STATE_FILE).exists()]
        if not ckpts:
            raise FileNotFoundError(f"--resume: no checkpoint with {STATE_FILE} under {self.ckpt_root}.")
        # Checkpoints hold only trainable/lens tensors (frozen base weights come from the model
        # folder), so load non-strictly and check the key set ourselves.
        self.acc.load_state(str(ckpts[-1]), strict=False)
        model_file = ckpts[-1] / "model.safetensors"
        if model_file.exists():
            from safetensors import safe_open

            with safe_open(str(model_file), "pt") as f:
                saved = set(f.keys())
            expected = set(self.acc.unwrap_model(self.lens).state_dict())
            if saved != expected:
                raise RuntimeError(
                    f"{model_file} does not match this lens: missing {sorted(expected - saved)[:5]}, "
                    f"unexpected {sorted(saved - expected)[:5]}. Was it saved with another config?"
                )
        state = json.loads((ckpts[-1] / STATE_FILE).read_text())
        self.acc.print(f"resumed from {ckpts[-1]} (step {state['step']})")
        return state

    # ------------------------------------------------------------------ loop
    def _weights(self, step: int) -> StepWeights:
        s = self.cfg.schedules
        return StepWeights(
            mse=s["mse_weight"](step),
            lm=s["lm_weight"](step),
            kl=s["kl_weight"](step),
            entropy=s["entropy_weight"](step),
            tau=s["gumbel_tau"](step),
        )

    def evaluate(self, step: int) -> dict[str, float]:
        """Evaluate on the validation split (all processes), log, save explanations."""
        if self.val_set is None:
            return {}
        acc = self.acc
        lens = acc.unwrap_model(self.lens)
        metrics, samples = evaluate_lens(
            lens,
            self.orig,
            self.val_set,
            layer=self.layer,
            t_text=self.cfg.t_text,
            train_mean=self.train_mean,
            train_var=self.train_var,
            prefix_ids=self.prefix_ids,
            tokenizer=self.tokenizer,
            batch_size=self.cfg.eval_batch_size,
            seed=self.cfg.seed + 7919,
            resample_ablation=self.cfg.resample_ablation,
            num_explanations=self.cfg.num_explanations,
            process_index=acc.process_index,
            num_processes=acc.num_processes,
            reduce=(lambda t: acc.reduce(t, "sum")) if acc.num_processes > 1 else None,
            device=acc.device,
        )
        if acc.is_main_process:
            with (self.out / "explanations.jsonl").open("a") as f:
                for s in samples:
                    f.write(json.dumps({"step": step, **s}) + "\n")
            self.last_samples = samples
        self._log({f"eval/{k}": v for k, v in metrics.items()}, step)
        return metrics

    def _log(self, values: dict[str, float], step: int) -> None:
        if self.acc.is_main_process:
            with (self.out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")
        if self.cfg.report_to != "none":
            self.acc.log(values, step=step)

    def train(self) -> dict[str, Any]:
        """Run to ``max_steps`` (or continue with ``resume``); return the final evaluation."""
        self.setup()
        cfg, acc = self.cfg, self.acc
        state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "micro_steps": 0}
        if cfg.resume:
            state = self._resume_state()
            if acc.is_main_process:  # drop log rows written after the checkpoint by the interrupted run
                for name in ("metrics.jsonl", "explanations.jsonl"):
                    path = self.out / name
                    if path.exists():
                        rows = [
                            r
                            for r in path.read_text().splitlines()
                            if r and json.loads(r)["step"] <= state["step"]
                        ]
                        path.write_text("".join(r + "\n" for r in rows))
        elif acc.is_main_process:
            for name in ("metrics.jsonl", "explanations.jsonl"):
                (self.out / name).unlink(missing_ok=True)
        step = state["step"]
        running: dict[str, float] = {}
        n_running = 0
        with progress_bar("sft", total=cfg.max_steps, enabled=acc.is_main_process) as advance:
            advance(step)
            while step < cfg.max_steps:
                loader = (
                    acc.skip_first_batches(self.loader, state["batch_in_epoch"])
                    if state["batch_in_epoch"]
                    else self.loader
                )
                # accelerate's loaders call sampler.set_epoch(their own iteration count) when
                # iterated; pin it to our epoch (a resumed or skipping loader starts counting at 0).
                for obj in (loader, self.sampler):
                    if hasattr(obj, "set_epoch"):
                        obj.set_epoch(state["epoch"])
                for batch in loader:
                    w = self._weights(step)
                    batch = materialize(batch, self.orig, self.layer)
                    g = torch.Generator(acc.device).manual_seed(
                        (cfg.seed * 1_000_003 + state["micro_steps"] * 7_919 + acc.process_index) % (2**63)
                    )
                    with acc.accumulate(self.lens), acc.autocast():
                        losses = self.lens(
                            sft_losses,
                            self.orig,
                            batch,
                            weights=w,
                            layer=self.layer,
                            t_text=cfg.t_text,
                            feature_var=self.feature_var,
                            prefix_ids=self.prefix_ids,
                            generator=g,
                            resample_ablation=cfg.resample_ablation,
                        )
                        acc.backward(losses["loss"])
                        grad_norm = None
                        if acc.sync_gradients and cfg.max_grad_norm > 0:
                            grad_norm = acc.clip_grad_norm_(self.lens.parameters(), cfg.max_grad_norm)
                        self.optimizer.step()
                        self.scheduler.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    state["micro_steps"] += 1
                    state["batch_in_epoch"] += 1
                    for k, v in losses.items():
                        running[k] = running.get(k, 0.0) + float(v.detach())
                    n_running += 1
                    if not acc.sync_gradients:
                        continue
                    step += 1
                    state["step"] = step
                    advance(
                        1,
                        info=f"loss {float(losses['loss'].detach()):.4f} mse {float(losses['mse'].detach()):.4f}",
                    )
                    if step % cfg.log_every == 0 or step == cfg.max_steps:
                        vals = {f"train/{k}": v / n_running for k, v in running.items()}
                        vals.update(
                            {"train/tau": w.tau, "train/w_lm": w.lm, "train/w_kl": w.kl, "train/w_mse": w.mse}
                        )
                        for name, group in zip(self.group_names, self.optimizer.param_groups, strict=False):
                            vals[f"lr/{name}"] = group["lr"]
                        if grad_norm is not None:
                            vals["train/grad_norm"] = float(grad_norm)
                        self._log(vals, step)
                        running, n_running = {}, 0
                    if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                        self.evaluate(step)
                    if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                        self.save_checkpoint(state)
                    if step >= cfg.max_steps:
                        break
                else:
                    state["epoch"] += 1
                    state["batch_in_epoch"] = 0
        final = self.evaluate(step)
        self.save_checkpoint(state)
        if acc.is_main_process:
            acc.unwrap_model(self.lens).save_pretrained(self.out / "lens")
            (self.out / "final_metrics.json").write_text(json.dumps(final, indent=2))
            if cfg.plot:
                from lens_rl.training.plots import plot_curves

                plot_curves(self.out / "metrics.jsonl", self.out / "training_curves.png")
        acc.end_training()
        return final
