"""FSDP2 on the lens modules, checked against the unsharded lens: N CPU processes over gloo.

:func:`fsdp2_vs_unsharded` spawns ``world`` processes; each builds the same tiny lens, shards one
copy with :func:`~lens_rl.models.sharding.fully_shard_lens` (``init_device_mesh("cpu", ...)``)
and keeps an unsharded copy. The sharded copy computes the loss on its 1/world share of the
batch; the unsharded one computes the mean of the per-share losses, each with the noise its rank
drew, so both are the same function of the parameters. Returned (from rank 0): the worst
relative gradient difference (FSDP2 averages gradients over ranks), the loss difference, the
worst parameter difference after one SGD step of rate 1 (the update is the gradient itself, so a
stale or misplaced shard shows as an O(gradient) error; Adam's first step, ``g / (|g| + eps)``,
would amplify float32 rounding of tiny gradients past any useful bound) relative to the largest
gradient entry, and whether the full state dict gathered from
the shards equals the unsharded lens's.

``device="cuda"`` runs the same check over NCCL on CUDA, one process per GPU (``make gpu-check``
runs it with as many processes as there are GPUs, up to 2).
"""

from __future__ import annotations

import copy
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from transformers import AutoTokenizer

from lens_rl.data.corpus import pydoc_topics
from lens_rl.generation.rollouts import lens_rollouts
from lens_rl.metrics import reconstruct
from lens_rl.models.configuration import DecoderConfig, EncoderConfig
from lens_rl.models.families import embed_tokens, load_causal_lm
from lens_rl.models.lens import ConsistencyLens, LensModule
from lens_rl.models.sharding import full_state_dict, fully_shard_lens
from lens_rl.models.tokenizer import train_bpe_tokenizer
from lens_rl.ops.sampling import SamplingPolicy
from lens_rl.testing.tiny_models import build_tiny_model

Case = Literal["sft", "grpo", "rollout"]
ROWS, T_TEXT = 4, 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sft_round_trip_loss(lens: ConsistencyLens, acts, cur, var, seed: int) -> torch.Tensor:
    """The supervised reconstruction loss through the differentiable KV-cached generator."""
    g = torch.Generator(acts.device).manual_seed(seed)
    gen = lens.decoder.generate_soft_kv_cached(acts, T_TEXT, generator=g, gumbel_tau=1.0)
    a_hat = lens.encoder(gen.generated_text_embeddings, current_token_ids=cur)
    return reconstruct(a_hat, acts, train_var=var, dtype=torch.float32).nmse.mean()


def grpo_scorer_loss(lens: ConsistencyLens, acts, cur, var, tokens) -> torch.Tensor:
    """The GRPO scorer's quantities (log q through ``fwd_tokens``, the co-trained encoder's MSE)."""
    logq = lens.decoder.fwd_tokens(acts, tokens, policy=SamplingPolicy(temperature=1.0)).logprobs
    emb = embed_tokens(lens.decoder.base, tokens).detach()
    a_hat = lens.encoder(emb, current_token_ids=cur)
    return logq.mean() + reconstruct(a_hat, acts, train_var=var, dtype=torch.float32).nmse.mean()


def rollout_tokens(lens: ConsistencyLens, acts, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's rollouts on the HF backend (the no-grad KV-cached generator, groups of 2):
    token ids and the sampler's log q."""
    out = lens_rollouts(lens.decoder, acts, 2, T_TEXT, policy=SamplingPolicy(temperature=1.0), seed=seed)
    return out.token_ids, out.sampler_logqs


def _rollout_case(sharded: LensModule, ref: LensModule, acts, rank: int, world: int) -> dict:
    """The rollouts through the sharded module's forward equal the unsharded lens's, same seed."""
    share = slice(rank * ROWS, (rank + 1) * ROWS)
    with torch.no_grad():
        ids, logq = sharded(rollout_tokens, acts[share], 7 + rank)
        ref_ids, ref_logq = rollout_tokens(ref.lens, acts[share], 7 + rank)
    same = torch.tensor(
        [float(torch.equal(ids, ref_ids)), float((logq - ref_logq).abs().max())], device=acts.device
    )
    gathered = [torch.zeros(2, device=acts.device) for _ in range(world)]
    dist.all_gather(gathered, same)
    return {
        "tokens_equal": all(bool(t[0]) for t in gathered),
        "logq_err": max(float(t[1]) for t in gathered),
    }


def _worker(
    rank: int, world: int, folder: str, port: int, arch: str, case: Case, trainable_base: bool, device: str
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh(device, (world,))
        tok = AutoTokenizer.from_pretrained(Path(folder) / "tokenizer")
        model = load_causal_lm(Path(folder) / "model").eval().to(device)
        configs = DecoderConfig(trainable_base=trainable_base), EncoderConfig(trainable_base=trainable_base)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the lens's fresh initialisation, the same on every rank
            lens = ConsistencyLens.build(model, tok, *configs, share_base=True)
        ref = LensModule(copy.deepcopy(lens))
        sharded = fully_shard_lens(LensModule(lens), mesh)

        g = torch.Generator().manual_seed(1)
        d = model.config.hidden_size
        acts = torch.randn(ROWS * world, d, generator=g).to(device)
        cur = torch.randint(0, len(tok), (ROWS * world,), generator=g).to(device)
        tokens = torch.randint(0, len(tok), (ROWS * world, T_TEXT), generator=g).to(device)
        var = (torch.rand(d, generator=g) + 0.5).to(device)
        shares = [slice(r * ROWS, (r + 1) * ROWS) for r in range(world)]

        if case == "rollout":
            result = _rollout_case(sharded, ref, acts, rank, world)
            if rank == 0:
                (Path(folder) / "result.json").write_text(json.dumps(result))
            return

        def loss(module_or_lens, share: slice, r: int):
            args = (acts[share], cur[share], var)
            if case == "sft":
                return module_or_lens(sft_round_trip_loss, *args, 100 + r)
            return module_or_lens(grpo_scorer_loss, *args, tokens[share])

        state_equal = None
        full = full_state_dict(sharded)
        if rank == 0:
            want = ref.state_dict()
            state_equal = full.keys() == want.keys() and all(torch.equal(full[k], want[k]) for k in want)

        mine = loss(sharded, shares[rank], rank)
        mine.backward()
        ref_loss = sum(loss(ref, s, r) for r, s in enumerate(shares)) / world
        ref_loss.backward()
        mean = mine.detach().clone()
        dist.all_reduce(mean)
        mean /= world

        ref_params = dict(ref.named_parameters())
        grad_err, n_grads = 0.0, 0
        for name, p in sharded.named_parameters():
            if p.grad is None or p.numel() == 0:
                continue
            got = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            want_g = ref_params[name].grad
            scale = want_g.abs().max().clamp(min=1e-12)
            grad_err = max(grad_err, float((got - want_g).abs().max() / scale))
            n_grads += 1
        n_ref = sum(1 for p in ref.parameters() if p.grad is not None and p.numel())

        params = [p for p in sharded.parameters() if p.requires_grad]
        max_grad = max(
            float(p.grad.abs().max()) for p in ref.parameters() if p.grad is not None and p.numel()
        )
        torch.optim.SGD(params, lr=1.0).step()
        torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=1.0).step()
        step_err = 0.0
        for name, p in sharded.named_parameters():
            if p.requires_grad and p.numel():
                got = p.full_tensor() if hasattr(p, "full_tensor") else p
                step_err = max(step_err, float((got.detach() - ref_params[name].detach()).abs().max()))
        if rank == 0:
            result = {
                "grad_rel_err": grad_err,
                "grads_compared": n_grads,
                "grads_in_reference": n_ref,
                "loss_err": float((mean - ref_loss.detach()).abs()),
                "step_rel_err": step_err / max_grad,
                "state_dict_equal": state_equal,
                "tied": bool(model.config.tie_word_embeddings),
            }
            (Path(folder) / "result.json").write_text(json.dumps(result))
    finally:
        # every rank's collectives done before the group goes (a rank tearing the group down while
        # the other still runs an FSDP2 all-gather aborted the process now and then)
        dist.barrier()
        dist.destroy_process_group()


def fsdp2_vs_unsharded(
    arch: str, case: Case, trainable_base: bool = True, world: int = 2, device: str = "cpu"
) -> dict:
    """Run the check (see the module docstring) on ``device`` (``cpu``: gloo; ``cuda``: NCCL, one
    GPU per process) and return rank 0's figures."""
    with tempfile.TemporaryDirectory() as folder:
        tok = train_bpe_tokenizer(pydoc_topics(), Path(folder) / "tokenizer", vocab_size=512)
        build_tiny_model(arch, Path(folder) / "model", len(tok), seed=0, eos_token_id=tok.eos_token_id)
        torch.multiprocessing.spawn(
            _worker, args=(world, folder, _free_port(), arch, case, trainable_base, device), nprocs=world
        )
        return json.loads((Path(folder) / "result.json").read_text())
