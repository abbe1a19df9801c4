"""Per-rank bytes of parameters, gradients and optimizer state: DDP, DeepSpeed ZeRO-2 and ZeRO-3,
and FSDP2 on the same lens.

Each engine runs in ``world`` CPU processes over gloo on the quickstart's base (decoder and
encoder bases trainable, as in the quickstart), takes one AdamW step on the GRPO scorer's loss
(log q and the co-trained encoder's MSE: then the parameters, gradients and Adam moments all
exist) and counts the bytes each rank holds, from the tensors themselves (a DTensor counts its
local shard). The frozen original
model is counted apart: neither engine shards it here (it stays a full replica).

    python benchmarks/sharding_memory.py --out benchmarks/results/sharding_memory.json

DDP is the baseline in the same run: the JSON gives each engine's bytes and its ratio to DDP's
at the same world size. The DeepSpeed engines run only where DeepSpeed is installed (an opt-in
extra: ``EXTRAS=deepspeed make setup``; otherwise they are listed as not measured, saying why),
with ``deepspeed.initialize`` on the lens as the stages' Trainer builds it (ZeRO-3: root
parameters registered, ``stage3_param_persistence_threshold: 0`` so every tensor is partitioned).
Their bytes are read from DeepSpeed's own buffers, which hold everything the engine keeps per
parameter: ZeRO-3 parameters = the rank's partitions (``fp16_partitioned_groups_flat``; named
fp16 whatever the dtype), ZeRO-2 parameters = the full flat copies (``bit16_groups_flat``);
gradients = the reduced gradient partitions, read before the step frees them; optimizer = the
fp32 master partitions (a second fp32 copy even in fp32 training) plus Adam's moments. Transient
communication buckets are not counted.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoTokenizer

from lens_rl.models.configuration import DecoderConfig, EncoderConfig
from lens_rl.models.families import load_causal_lm
from lens_rl.models.lens import ConsistencyLens, LensModule
from lens_rl.models.sharding import detach_empty_parameters, fully_shard_lens, register_zero3_root_parameters
from lens_rl.testing.fsdp2_check import grpo_scorer_loss

ROOT = Path(__file__).resolve().parents[1]


def _local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def _deepspeed_gradient_bytes(engine) -> int:
    """Per-rank bytes of a DeepSpeed engine's reduced gradients, read after the backward and before
    the step (the step frees them): ZeRO-3's gradient-partition buffer, ZeRO-2's averaged
    gradient partitions."""
    zopt = engine.optimizer
    if hasattr(zopt, "fp16_partitioned_groups_flat"):
        buf = zopt.grad_partitions_flat_buffer
        return _local_bytes(buf) if buf is not None else 0
    return sum(_local_bytes(t) for ts in zopt.averaged_gradients.values() for t in ts if t is not None)


def _deepspeed_counts(engine, module: LensModule, gradient_bytes: int) -> dict[str, int]:
    """Per-rank bytes of a DeepSpeed engine's parameters, gradients and optimizer state (see the
    module docstring for which buffers count as which)."""
    zopt = engine.optimizer
    if hasattr(zopt, "fp16_partitioned_groups_flat"):  # ZeRO-3
        params = list(zopt.fp16_partitioned_groups_flat)
        masters = list(zopt.fp32_partitioned_groups_flat)
    else:  # ZeRO-1/2
        params = list(zopt.bit16_groups_flat)
        masters = list(zopt.single_partition_of_fp32_groups)
    moments = [v for st in zopt.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    return {
        "parameters": sum(_local_bytes(t) for t in params),
        "gradients": gradient_bytes,
        "optimizer": sum(_local_bytes(t) for t in masters + moments),
        "frozen_lens": sum(_local_bytes(p) for p in module.parameters() if not p.requires_grad),
    }


def _deepspeed_config(stage: int) -> dict:
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    return {"train_micro_batch_size_per_gpu": 4, "zero_optimization": zero, "gradient_accumulation_steps": 1}


def _worker(rank: int, world: int, engine: str, model_dir: str, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
        orig = load_causal_lm(model_dir).eval()
        torch.manual_seed(0)
        lens = ConsistencyLens.build(
            orig, tok, DecoderConfig(trainable_base=True), EncoderConfig(trainable_base=True), share_base=True
        )
        module = LensModule(lens)
        if engine == "fsdp2":  # fully_shard replaces the parameters: the optimizer comes after
            wrapped = fully_shard_lens(module, init_device_mesh("cpu", (world,)))
        elif engine == "ddp":
            wrapped = DistributedDataParallel(module)
        elif engine == "zero3":  # as the stages prepare the lens (lens_rl.training.sharded.prepare_zero3)
            detach_empty_parameters(module)
            register_zero3_root_parameters(module)
        params = [p for p in module.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        if engine.startswith("zero"):
            import deepspeed  # optional: only these engines need it

            wrapped, opt, _, _ = deepspeed.initialize(
                model=module,
                optimizer=opt,
                config=_deepspeed_config(int(engine[-1])),
                dist_init_required=False,
            )
        g = torch.Generator().manual_seed(rank)
        acts = torch.randn(4, orig.config.hidden_size, generator=g)
        cur = torch.randint(0, len(tok), (4,), generator=g)
        tokens = torch.randint(0, len(tok), (4, 8), generator=g)
        var = torch.ones(orig.config.hidden_size)
        loss = wrapped(grpo_scorer_loss, acts, cur, var, tokens)  # decoder and encoder both train
        if engine.startswith("zero"):
            wrapped.backward(loss)
            gradient_bytes = _deepspeed_gradient_bytes(wrapped)
            wrapped.step()
            counts = _deepspeed_counts(wrapped, module, gradient_bytes) | {
                "orig_replica": sum(_local_bytes(p) for p in orig.parameters())
            }
        else:
            loss.backward()
            opt.step()
            counts = _counts(module, params, opt, orig)
        counts["trainable_total"] = counts["parameters"] + counts["gradients"] + counts["optimizer"]
        gathered = [None] * world
        dist.all_gather_object(gathered, counts)
        if rank == 0:
            Path(out).write_text(json.dumps(gathered))
    finally:
        dist.barrier()  # no rank tears the group down while another still runs a collective
        dist.destroy_process_group()


def _counts(module, params, opt, orig) -> dict[str, int]:
    """Per-rank bytes of a torch engine (DDP, FSDP2: a DTensor counts its local shard)."""
    return {
        "parameters": sum(_local_bytes(p) for p in params),
        "gradients": sum(_local_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(
            _local_bytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v)
        ),
        "frozen_lens": sum(_local_bytes(p) for p in module.parameters() if not p.requires_grad),
        "orig_replica": sum(_local_bytes(p) for p in orig.parameters()),
    }


def measure(engine: str, world: int, model_dir: Path) -> list[dict[str, int]]:
    with tempfile.TemporaryDirectory() as d, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        out = str(Path(d) / "counts.json")
        torch.multiprocessing.spawn(_worker, args=(world, engine, str(model_dir), port, out), nprocs=world)
        return json.loads(Path(out).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_dir", type=Path, default=ROOT / ".cache" / "lens_rl" / "base-llama-d128")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sharding_memory.json")
    a = p.parse_args()
    if not (a.model_dir / "config.json").is_file():
        raise SystemExit(f"{a.model_dir} has no config.json: run `make demo` first (it pretrains the base).")
    rows = []
    for world in a.worlds:
        ddp = measure("ddp", world, a.model_dir)
        for engine in ("ddp", "zero2", "zero3", "fsdp2"):
            if engine.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
                rows.append({"engine": engine, "world": world, "not_measured": "DeepSpeed is not installed"})
                continue
            ranks = ddp if engine == "ddp" else measure(engine, world, a.model_dir)
            worst = max(ranks, key=lambda c: c["trainable_total"])
            row = {"engine": engine, "world": world, "per_rank": ranks, "max_rank": worst}
            row["ratio_to_ddp"] = {
                k: round(worst[k] / max(ddp[0][k], 1), 4)
                for k in ("parameters", "gradients", "optimizer", "trainable_total")
            }
            rows.append(row)
            print(
                f"{engine:5s} world {world}: max per-rank trainable bytes {worst['trainable_total']:,} "
                f"(ratio to DDP {row['ratio_to_ddp']['trainable_total']}); orig replica {worst['orig_replica']:,}"
            )
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model_dir": str(a.model_dir),
        "rows": rows,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
