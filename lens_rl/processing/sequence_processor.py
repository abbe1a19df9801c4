"""SequenceProcessor: one module for rollouts, teacher-forced log-probs and diagnostics.

It works on two kinds of policy with the same outputs:

- a plain causal LM with text prompts (B prompts x G responses, left-padded prompts, EOS and
  stop strings; the EOS/stop token is generated, kept and scored);
- the lens :class:`~lens_rl.models.decoder.Decoder`, whose prompts are activations ``(B, d)``
  and whose scores come from ``fwd_tokens`` (fixed-length explanations).

Sampling, log q, RB entropies, diagnostics and importance weights all use ONE
:class:`~lens_rl.ops.sampling.SamplingPolicy` built from :class:`SamplingConfig`. Backends:
``hf`` (exact Gumbel-max sampling from the policy with an explicit generator) and ``vllm``
(token prompts or ``prompt_embeds``; processed log-probs); lens rollouts are
:func:`~lens_rl.generation.rollouts.lens_rollouts`, shared with the GRPO trainer. Teacher
forcing aligns logits at ``i - 1`` with token ``i`` and scores with
:func:`~lens_rl.ops.diagnostics.score_tokens`; padded tensors ``(B, G, T)`` with ``gen_mask``
replace the seed's lists of per-sequence arrays (``per_sequence`` gives the trimmed view).

Names: ``logp`` is log p (the model's plain softmax), ``logq`` is log q (the sampling policy),
``rb_entropy`` is H(q), ``surprisal`` is -log p. ``sampler_logprobs`` (like
``Generated.logprobs``) is log q as the sampler returned it.

The no-grad path always runs through ``torch.func.functional_call`` with a parameter mapping
(the live parameters, or ``theta + eta * v``), so an override with ``eta = 0`` is the same
computation as the live model. The with-grad path runs the live module and keeps the graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from lens_rl.generation.rollouts import lens_rollouts, text_rollouts
from lens_rl.models.decoder import Decoder
from lens_rl.ops.autodiff import jvp
from lens_rl.ops.diagnostics import DiagnosticsPack, score_tokens
from lens_rl.ops.sampling import SamplingPolicy
from lens_rl.processing.prompts import prompt_pool, sample_prompts


# ---------------------------------------------------------------------------- configs and results
@dataclass
class SamplingConfig:
    """Sampling policy and batching (the seed's fields plus top_k, min_p, backend, stops)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_new_tokens: int = 64
    do_sample: bool = True
    num_return_sequences: int = 8
    gen_batch_size: int = 32
    tf_batch_size: int = 8
    rb_requires_grad: bool = False
    backend: Literal["hf", "vllm"] = "hf"
    stop_strings: list[str] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.do_sample:
            raise ValueError(
                "do_sample=False (greedy) has no log q to weight with; use a small temperature instead."
            )
        self.policy  # validates the policy fields  # noqa: B018

    @property
    def policy(self) -> SamplingPolicy:
        """The shared sampling policy."""
        return SamplingPolicy(self.temperature, self.top_k, self.top_p, self.min_p)


@dataclass
class PrecisionConfig:
    """Precision profiles (seed 002): functional-override dtype, fp64 vocabulary math."""

    func_override_dtype: Literal["float32", "float64"] = "float32"
    cast_params: bool = True
    entropy_fp64: bool = False
    allow_tf32: bool = False


@dataclass
class BatchedSequences:
    """B prompts x G responses, padded.

    Attributes:
        sequences: ``(B, G, P + T)`` prompt (left-padded to P) + generated tokens (right-padded);
            lens mode: ``(B, G, T)`` generated tokens only (P = 0).
        prompt_lens: the padded prompt length P, once per prompt.
        gen_lens: ``(B, G)`` generated tokens including the EOS/stop token.
        attention_masks: ``(B, G, P + T)``.
        responses_text: decoded responses.
        sampler_logprobs: ``(B, G, T)`` log q of each token as returned by the sampler.
        activations: ``(B, d)`` in lens mode.
    """

    sequences: torch.Tensor
    prompt_lens: list[int]
    gen_lens: torch.Tensor
    attention_masks: torch.Tensor
    responses_text: list[list[str]]
    sampler_logprobs: torch.Tensor | None = None
    activations: torch.Tensor | None = None

    @property
    def max_gen_len(self) -> int:
        """T, the padded generated length."""
        return self.sequences.shape[-1] - (self.prompt_lens[0] if self.prompt_lens else 0)

    @property
    def gen_mask(self) -> torch.Tensor:
        """``(B, G, T)`` True on generated (scored) tokens."""
        t = torch.arange(self.max_gen_len, device=self.gen_lens.device)
        return t[None, None, :] < self.gen_lens[..., None]

    def gen_tokens(self) -> torch.Tensor:
        """``(B, G, T)`` generated tokens."""
        return self.sequences[..., self.sequences.shape[-1] - self.max_gen_len :]


@dataclass
class LogprobResults:
    """Teacher-forced scores, ``(B, G, T)`` per token (0 beyond ``gen_mask``), ``(B, G)`` sums.

    Attributes:
        token_logps: log p of each token under the model's plain softmax (temperature 1).
        token_surprisals: -log p of each token (the naive entropy estimate).
        rb_entropies: H(q) at each step (the Rao-Blackwellised estimate), detached.
        token_logqs: log q of each token under the sampling policy.
        sequence_logps: ``(B, G)`` sums of ``token_logps``.
        sequence_logqs: ``(B, G)`` sums of ``token_logqs``.
        rb_entropy_sums: ``(B, G)`` sums of ``rb_entropies``.
        gen_mask: ``(B, G, T)`` scored tokens.
        rb_entropies_torch: H(q) with its graph (with-grad scoring and ``rb_requires_grad``).
        rewards: ``(B, G)`` when a reward function was given.
    """

    token_logps: torch.Tensor
    token_surprisals: torch.Tensor
    rb_entropies: torch.Tensor
    token_logqs: torch.Tensor
    sequence_logps: torch.Tensor
    sequence_logqs: torch.Tensor
    rb_entropy_sums: torch.Tensor
    gen_mask: torch.Tensor
    rb_entropies_torch: torch.Tensor | None = None
    rewards: torch.Tensor | None = None

    def per_sequence(self, name: str, b: int, g: int) -> torch.Tensor:
        """The scored tokens of response ``g`` of prompt ``b`` for field ``name``."""
        return getattr(self, name)[b, g][self.gen_mask[b, g]]


@dataclass
class TangentResults:
    """``(B, G, T)`` per-token log q and RB entropy at theta, and their derivatives along v."""

    token_logqs: torch.Tensor
    rb_entropies: torch.Tensor
    d_token_logqs: torch.Tensor
    d_rb_entropies: torch.Tensor
    gen_mask: torch.Tensor


@dataclass
class DiagnosticsResults:
    """Diagnostics over the ``B * G`` sequences (row ``b * G + g``)."""

    diagnostics: DiagnosticsPack


# ---------------------------------------------------------------------------- the processor
class SequenceProcessor:
    """Generation + teacher-forced scoring + diagnostics under one sampling policy."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        config: SamplingConfig | dict | None = None,
        precision: PrecisionConfig | dict | None = None,
        vllm_backend=None,
    ) -> None:
        if isinstance(config, dict):  # seed 002 style: {"generation": {...}, "precision": {...}}
            precision = precision or config.get("precision")
            config = SamplingConfig(**config.get("generation", config if "generation" not in config else {}))
        self.config = config or SamplingConfig()
        self.precision = (
            PrecisionConfig(**precision) if isinstance(precision, dict) else precision or PrecisionConfig()
        )
        self.model = model
        self.tokenizer = tokenizer
        self.is_lens = isinstance(model, Decoder)
        self.vllm = vllm_backend
        if self.config.backend == "vllm" and vllm_backend is None:
            raise ValueError("backend='vllm' needs a VLLMBackend (vllm_backend=...).")
        if self.is_lens and self.config.backend == "vllm" and model.n_patched:
            raise ValueError("The vLLM backend cannot express multi-layer patching; use backend='hf'.")
        base = model.base if self.is_lens else model
        self.eos_token_id = base.config.eos_token_id if tokenizer is None else tokenizer.eos_token_id
        self._params_zero: dict[str, torch.Tensor] | None = None
        torch.backends.cuda.matmul.allow_tf32 = self.precision.allow_tf32

    @property
    def policy(self) -> SamplingPolicy:
        """The one sampling policy (sampler, log q, RB entropy, diagnostics)."""
        return self.config.policy

    @property
    def device(self) -> torch.device:
        """Device of the policy's parameters."""
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ prompts
    def sample_prompts(self, dataset_name: str, split: str, num_prompts: int, seed: int) -> list[str]:
        """Draw ``num_prompts`` distinct prompts from a registered dataset with a seeded generator
        (:func:`lens_rl.processing.prompts.sample_prompts`)."""
        return sample_prompts(dataset_name, split, num_prompts, seed)

    # ------------------------------------------------------------------ generation
    def generate_batched(
        self,
        prompts: Sequence[str] | torch.Tensor,
        G: int | None = None,
        gen_batch_size: int | None = None,
        seed: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> BatchedSequences:
        """Generate G responses per prompt (text prompts, or activations ``(B, d)`` in lens mode).
        ``progress(n)`` is called with the number of responses finished after each batch."""
        g_count = G or self.config.num_return_sequences
        seed = self.config.seed if seed is None else seed
        if self.is_lens:
            out = self._generate_lens(prompts, g_count, seed)
            if progress is not None:
                progress(out.gen_lens.numel())
            return out
        return self._generate_text(
            list(prompts), g_count, gen_batch_size or self.config.gen_batch_size, seed, progress
        )

    def _generate_lens(self, activations: torch.Tensor, g_count: int, seed: int) -> BatchedSequences:
        if not isinstance(activations, torch.Tensor) or activations.dim() != 2:
            raise ValueError("In lens mode the prompts are activations, a (B, d) tensor.")
        b = activations.shape[0]
        t = self.config.max_new_tokens
        out = lens_rollouts(
            self.model,
            activations.to(self.device),
            g_count,
            t,
            policy=self.policy,
            seed=seed,
            vllm_backend=self.vllm if self.config.backend == "vllm" else None,
        )
        ids, logq = out.token_ids, out.sampler_logqs
        ids = ids.view(b, g_count, t)
        return BatchedSequences(
            sequences=ids,
            prompt_lens=[0] * b,
            gen_lens=torch.full((b, g_count), t, device=ids.device),
            attention_masks=torch.ones_like(ids),
            responses_text=[[self.tokenizer.decode(s) for s in row] for row in ids] if self.tokenizer else [],
            sampler_logprobs=logq.view(b, g_count, t).float(),
            activations=activations,
        )

    def _generate_text(
        self,
        prompts: list[str],
        g_count: int,
        gen_batch_size: int,
        seed: int,
        progress: Callable[[int], None] | None = None,
    ) -> BatchedSequences:
        tok = self.tokenizer
        side, tok.padding_side = tok.padding_side, "left"  # prompts are left-padded; restored below
        try:
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            tok.padding_side = side
        pad = tok.pad_token_id if tok.pad_token_id is not None else self.eos_token_id
        t_max = self.config.max_new_tokens
        out = text_rollouts(
            self.model,
            tok,
            enc["input_ids"],
            enc["attention_mask"],
            g_count,
            t_max,
            policy=self.policy,
            seed=seed,
            eos_token_id=self.eos_token_id,
            pad_token_id=pad,
            stop_strings=self.config.stop_strings,
            gen_batch_size=gen_batch_size,
            vllm_backend=self.vllm if self.config.backend == "vllm" else None,
            progress=progress,
        )
        p_len, n = enc["input_ids"].shape[1], out.sequences.shape[0]
        gen_part, gen_lens = out.sequences[:, p_len:], out.gen_lens
        t_mask = torch.arange(t_max)[None, :] < gen_lens[:, None]
        attn = torch.cat([enc["attention_mask"].repeat_interleave(g_count, 0), t_mask.long()], dim=1)
        texts = [tok.decode(gen_part[i, : gen_lens[i]]) for i in range(n)]
        b = len(prompts)
        return BatchedSequences(
            sequences=out.sequences.view(b, g_count, -1).to(self.device),
            prompt_lens=[p_len] * b,
            gen_lens=gen_lens.view(b, g_count).to(self.device),
            attention_masks=attn.view(b, g_count, -1).to(self.device),
            responses_text=[texts[i * g_count : (i + 1) * g_count] for i in range(b)],
            sampler_logprobs=(out.sampler_logqs * t_mask).view(b, g_count, t_max).to(self.device),
        )

    # ------------------------------------------------------------------ parameter overrides
    def _named_params(self) -> dict[str, torch.Tensor]:
        return dict(self.model.named_parameters())

    def build_params_override(
        self, v_named: dict[str, torch.Tensor] | None, eta: float | torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``{name: theta + eta * v}`` (params only; theta detached; cast per the precision
        profile). A tensor ``eta`` that requires grad keeps the graph to ``eta``."""
        dtype = getattr(torch, self.precision.func_override_dtype)
        out = {}
        for name, p in self._named_params().items():
            val = p.detach()
            if v_named is not None and name in v_named and (isinstance(eta, torch.Tensor) or eta != 0):
                val = val + eta * v_named[name].to(val.device, val.dtype)
            out[name] = val.to(dtype) if self.precision.cast_params else val
        return out

    def _zero_mapping(self) -> dict[str, torch.Tensor]:
        if self._params_zero is None:
            self._params_zero = self.build_params_override(None, 0.0)
        return self._params_zero

    # ------------------------------------------------------------------ teacher forcing
    def _logits(self, sequences: BatchedSequences, rows: slice, mapping) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(n, T, V)`` scoring the generated tokens of flat rows ``rows``, and the tokens."""
        t = sequences.max_gen_len
        tokens = sequences.gen_tokens().reshape(-1, t)[rows]
        if self.is_lens:
            g_count = sequences.sequences.shape[1]
            acts = sequences.activations.to(self.device).repeat_interleave(g_count, 0)[rows]
            if mapping is None:
                return self.model.fwd_tokens(acts, tokens).logits, tokens
            return functional_call(self.model, mapping, (acts, tokens)).logits, tokens
        p_len = sequences.prompt_lens[0]
        ids = sequences.sequences.reshape(-1, sequences.sequences.shape[-1])[rows]
        mask = sequences.attention_masks.reshape(-1, ids.shape[-1])[rows]
        kwargs = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": (mask.long().cumsum(-1) - 1).clamp(min=0),
            "use_cache": False,
        }
        out = self.model(**kwargs) if mapping is None else functional_call(self.model, mapping, (), kwargs)
        return out.logits[:, p_len - 1 : p_len - 1 + t], tokens

    def teacher_force_logprobs(
        self,
        sequences: BatchedSequences,
        with_grad: bool = False,
        tf_batch_size: int | None = None,
        compute_rb: bool = True,
        params_override: dict[str, torch.Tensor] | None = None,
        return_diagnostics: bool = False,
        progress: Callable[[int], None] | None = None,
    ):
        """Score the generated tokens: log p, log q, RB entropy, surprisal, sums (``(B, G, ·)``).

        No-grad: through ``functional_call`` with ``params_override`` (default: the live
        parameters). With-grad: the live module, graph kept; with ``params_override`` the graph
        runs through the mapping's tensors instead (e.g. ``theta + eta v`` with ``eta`` a
        tensor that requires grad, for exact derivatives in eta). ``progress(n)`` is called with
        the number of sequences scored after each batch.
        Returns :class:`LogprobResults`, plus :class:`DiagnosticsResults` if requested.
        """
        b, g_count = sequences.sequences.shape[:2]
        n = b * g_count
        bs = tf_batch_size or self.config.tf_batch_size
        fp64 = self.precision.entropy_fp64
        mask = sequences.gen_mask.reshape(n, -1)
        parts: dict[str, list[torch.Tensor]] = {"logp": [], "logq": [], "rb_entropy": [], "surprisal": []}
        diag_parts: list[DiagnosticsPack] = []
        for s in range(0, n, bs):
            rows = slice(s, min(s + bs, n))
            ctx = torch.enable_grad() if with_grad else torch.no_grad()
            with ctx:
                mapping = params_override
                if mapping is None and not with_grad:
                    mapping = self._zero_mapping()
                logits, tokens = self._logits(sequences, rows, mapping)
                sc = score_tokens(  # one pass over the vocabulary for scores and diagnostics
                    logits,
                    tokens,
                    self.policy,
                    fp64=fp64,
                    diagnostics=return_diagnostics,
                    mask=mask[rows],
                    eos_token_id=self.eos_token_id,
                )
                if return_diagnostics:
                    diag_parts.append(sc.diagnostics)
            m = mask[rows].to(sc.logp.dtype)
            for k in parts:
                val = getattr(sc, k)
                parts[k].append(torch.where(m.bool(), val, torch.zeros_like(val)))
            if progress is not None:
                progress(rows.stop - rows.start)
        full = {k: torch.cat(v).view(b, g_count, -1) for k, v in parts.items()}
        rb_torch = full["rb_entropy"] if (with_grad and self.config.rb_requires_grad) else None
        res = LogprobResults(
            token_logps=full["logp"],
            token_surprisals=full["surprisal"].detach() if not with_grad else full["surprisal"],
            rb_entropies=full["rb_entropy"].detach()
            if compute_rb
            else torch.zeros_like(full["logp"]).detach(),
            token_logqs=full["logq"],
            sequence_logps=full["logp"].sum(-1),
            sequence_logqs=full["logq"].sum(-1),
            rb_entropy_sums=full["rb_entropy"].detach().sum(-1),
            gen_mask=sequences.gen_mask,
            rb_entropies_torch=rb_torch,
        )
        if not return_diagnostics:
            return res
        return res, DiagnosticsResults(DiagnosticsPack.cat(diag_parts))

    def teacher_force_logprobs_with_diagnostics(self, sequences: BatchedSequences, **kwargs):
        """:meth:`teacher_force_logprobs` that also returns :class:`DiagnosticsResults`."""
        return self.teacher_force_logprobs(sequences, return_diagnostics=True, **kwargs)

    def teacher_force_logprobs_multi_eta(
        self, sequences: BatchedSequences, v_named: dict[str, torch.Tensor], etas: Sequence[float], **kwargs
    ) -> list[LogprobResults]:
        """No-grad scores under ``theta + eta * v`` for each ``eta`` (one forward per eta)."""
        return [
            self.teacher_force_logprobs(
                sequences, params_override=self.build_params_override(v_named, eta), **kwargs
            )
            for eta in etas
        ]

    def teacher_force_jvp(
        self,
        sequences: BatchedSequences,
        v_named: dict[str, torch.Tensor],
        method: Literal["jvp", "double_backward"] = "jvp",
        tf_batch_size: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> TangentResults:
        """Per-token log q and RB entropy at theta and their directional derivatives along v.

        ``d/d eta`` of ``f(theta + eta v)`` at ``eta = 0`` for every scored token, batched over
        rows (never looped per sequence). ``jvp`` is forward mode (``torch.func.jvp`` through
        ``functional_call``; attention runs on SDPA's math kernel, the only one with forward-mode
        formulas on CPU); ``double_backward`` gets the same numbers from reverse mode (the
        ``grad(grad(f, theta, u), u)`` trick) for ops without forward-mode support. Parameters
        not in ``v_named`` are held fixed. Values outside ``gen_mask`` are 0. ``progress(n)`` is
        called with the number of sequences done after each batch.
        """
        if method not in ("jvp", "double_backward"):
            raise ValueError(f"method must be jvp or double_backward, not {method!r}.")
        missing = set(v_named) - set(dict(self.model.named_parameters()))
        if missing:
            raise KeyError(f"v_named has names that are not parameters of the policy: {sorted(missing)[:5]}")
        b, g_count = sequences.sequences.shape[:2]
        n = b * g_count
        bs = tf_batch_size or self.config.tf_batch_size
        fp64 = self.precision.entropy_fp64
        mask = sequences.gen_mask.reshape(n, -1)
        base = self._zero_mapping()
        names = list(v_named)
        primals = {k: base[k] for k in names}
        tangents = {k: v_named[k].to(base[k].device, base[k].dtype) for k in names}
        parts: dict[str, list[torch.Tensor]] = {"logq": [], "rb": [], "d_logq": [], "d_rb": []}
        for s in range(0, n, bs):
            rows = slice(s, min(s + bs, n))

            def scores(trainable: dict[str, torch.Tensor], rows=rows) -> tuple[torch.Tensor, torch.Tensor]:
                logits, tokens = self._logits(sequences, rows, {**base, **trainable})
                sc = score_tokens(logits, tokens, self.policy, fp64=fp64)
                return sc.logq, sc.rb_entropy

            with sdpa_kernel(SDPBackend.MATH):
                (lq, rb), (dlq, drb) = jvp(scores, primals, tangents, method)
            m = mask[rows]
            for k, val in zip(("logq", "rb", "d_logq", "d_rb"), (lq, rb, dlq, drb), strict=True):
                parts[k].append(torch.where(m, val.detach(), torch.zeros_like(val)))
            if progress is not None:
                progress(rows.stop - rows.start)
        full = {k: torch.cat(v).view(b, g_count, -1) for k, v in parts.items()}
        return TangentResults(
            token_logqs=full["logq"],
            rb_entropies=full["rb"],
            d_token_logqs=full["d_logq"],
            d_rb_entropies=full["d_rb"],
            gen_mask=sequences.gen_mask,
        )

    # ------------------------------------------------------------------ end to end
    def generate_with_logprobs(
        self,
        prompts: Sequence[str] | torch.Tensor | None = None,
        G: int | None = None,
        dataset_name: str | None = None,
        split: str = "train",
        num_prompts: int | None = None,
        seed: int | None = None,
        with_grad: bool = False,
        gen_batch_size: int | None = None,
        tf_batch_size: int | None = None,
        compute_rb: bool = True,
        reward_fn: Callable[[list, list[list[str]]], list[list[float]]] | None = None,
    ) -> tuple[BatchedSequences, LogprobResults, DiagnosticsResults]:
        """Prompts (explicit, or ``num_prompts`` from ``dataset_name``) -> rollouts -> scores."""
        seed = self.config.seed if seed is None else seed
        if prompts is None:
            if dataset_name is None or num_prompts is None:
                raise ValueError("Give prompts, or dataset_name and num_prompts.")
            prompts = self.sample_prompts(dataset_name, split, num_prompts, seed)
        seqs = self.generate_batched(prompts, G=G, gen_batch_size=gen_batch_size, seed=seed)
        res, diag = self.teacher_force_logprobs_with_diagnostics(
            seqs, with_grad=with_grad, tf_batch_size=tf_batch_size, compute_rb=compute_rb
        )
        if reward_fn is not None:
            res.rewards = torch.tensor(reward_fn(list(prompts), seqs.responses_text), dtype=torch.float32)
        return seqs, res, diag

    def generate_with_replacement_sampling(
        self,
        total_sequences: int,
        dataset_name: str | None = None,
        split: str = "train",
        prompts_pool: Sequence[str] | torch.Tensor | None = None,
        max_prompts_pool: int | None = None,
        seed: int | None = None,
        **kwargs,
    ) -> tuple[BatchedSequences, LogprobResults, DiagnosticsResults]:
        """``total_sequences`` independent draws: prompts sampled with replacement, G = 1."""
        seed = self.config.seed if seed is None else seed
        if prompts_pool is None:
            if dataset_name is None:
                raise ValueError("Give prompts_pool or dataset_name.")
            prompts_pool = prompt_pool(dataset_name, split)
        size = len(prompts_pool) if max_prompts_pool is None else min(max_prompts_pool, len(prompts_pool))
        idx = torch.randint(0, size, (total_sequences,), generator=torch.Generator().manual_seed(seed))
        if isinstance(prompts_pool, torch.Tensor):
            chosen = prompts_pool[idx]
        else:
            chosen = [prompts_pool[int(i)] for i in idx]
        kwargs.pop("G", None)
        return self.generate_with_logprobs(prompts=chosen, G=1, seed=seed, **kwargs)
