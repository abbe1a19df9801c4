"""How the GRPO learning rate moves a supervised lens: held-out FVE before/after per setting.

Runs the RL stage (``configs/rl_quickstart.yaml``) from one supervised lens for each learning
rate (and optionally with the encoder co-trained), and writes one JSON with the val FVE before
and after, the functional KL after, the mean reward of the first and last logged steps and the
seconds per run. The "before" of every run is the same lens, so the differences are paired.

    python benchmarks/sweep_rl_lr.py --model_name_or_path .cache/lens_rl/base-llama-d128 \
        --sft_lens outputs/quickstart/sft/lens \
        --data .cache/lens_rl/activations/WEIGHTS/base-llama-d128/layer_1 \
        --lrs 1e-5 1e-4 1e-3 --encoder_mse_weights 0 1 --max_steps 60
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_name_or_path", required=True)
    ap.add_argument("--sft_lens", required=True)
    ap.add_argument("--data", required=True, help="dump layer folder with train/ and val/")
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3])
    ap.add_argument("--encoder_mse_weights", type=float, nargs="+", default=[0.0])
    ap.add_argument("--max_steps", type=int, default=60)
    ap.add_argument("--output_dir", default="outputs/rl_lr_sweep")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more LensGRPOConfig flags")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "rl_lr_sweep.json"))
    args = ap.parse_args()

    from lens_rl.config import parse_args
    from lens_rl.training.grpo_config import LensGRPOConfig
    from lens_rl.training.rl_stage import run_rl

    rows = []
    for w in args.encoder_mse_weights:
        for lr in args.lrs:
            out = Path(args.output_dir) / f"lr{lr:g}_enc{w:g}"
            argv = [
                "--config", str(ROOT / "configs" / "rl_quickstart.yaml"),
                "--model_name_or_path", args.model_name_or_path,
                "--sft_lens", args.sft_lens,
                "--train_data", str(Path(args.data) / "train"),
                "--val_data", str(Path(args.data) / "val"),
                "--output_dir", str(out),
                "--overwrite_output_dir", "true",
                "--learning_rate", str(lr),
                "--encoder_mse_weight", str(w),
                "--max_steps", str(args.max_steps),
                "--disable_tqdm", "true",
                *args.extra,
            ]  # fmt: skip
            (cfg,) = parse_args([LensGRPOConfig], argv, typecheck=False)
            t0 = time.perf_counter()
            res = run_rl(cfg)
            rewards = [h["reward"] for h in res["log_history"] if "reward" in h]
            row = {
                "extra": " ".join(args.extra),
                "learning_rate": lr,
                "encoder_mse_weight": w,
                "max_steps": args.max_steps,
                "fve_before": res["before"]["fve"],
                "fve_after": res["after"]["fve"],
                "delta_fve": res["after"]["fve"] - res["before"]["fve"],
                "kl_recon_after": res["after"]["kl_recon"],
                "lm_kl_after": res["after"]["lm_kl"],
                "reward_first": rewards[0] if rewards else None,
                "reward_last": rewards[-1] if rewards else None,
                "seconds": round(time.perf_counter() - t0, 1),
            }
            rows.append(row)
            print(json.dumps(row))
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"runs": rows}, indent=2))


if __name__ == "__main__":
    main()
