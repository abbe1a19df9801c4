"""SequenceProcessor: one module for rollouts, teacher-forced log-probs and diagnostics.

It works on two kinds of policy with the same outputs:

- a plain causal LM with text prompts (B prompts x G responses, left-padded prompts, EOS and
  stop strings; the EOS/stop token is generated, kept and scored);
- the lens :class:`~lens_rl.models.decoder.Decoder`, whose prompts are activations ``(B, d)``
  and whose scores come from ``fwd_tokens`` (fixed-length explanations).

Sampling, log q, RB entropies, diagnostics and importance weights all use ONE
:class:`~lens_rl.ops.sampling.SamplingPolicy` built from :class:`GenerationConfig`. Backends:
``hf`` (exact Gumbel-max sampling from the policy with an explicit generator) and ``vllm``
(token prompts or ``prompt_embeds``; processed log-probs). Teacher forcing aligns logits at
``i - 1`` with token ``i``; padded tensors ``(B, G, T)`` with ``gen_mask`` replace the seed's
lists of per-sequence arrays (``per_sequence`` gives the trimmed view).

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

from lens_rl.generation.hf_backend import hf_generate
from lens_rl.models.decoder import Decoder
from lens_rl.ops.diagnostics import DiagnosticsPack, DistributionDiagnostics, token_scores
from lens_rl.ops.sampling import SamplingPolicy

# ---------------------------------------------------------------------------- prompt datasets
PROMPT_DATASETS: dict[str, Callable[[str], list[str]]] = {}


def register_prompt_dataset(name: str):
    """Register ``fn(split) -> list[str]`` as a prompt source for ``sample_prompts``."""

    def deco(fn: Callable[[str], list[str]]):
        PROMPT_DATASETS[name] = fn
        return fn

    return deco


@register_prompt_dataset("pydoc_openings")
def _pydoc_openings(split: str) -> list[str]:
    """First sentence fragments of the pydoc topics (offline); even topics train, odd test."""
    from lens_rl.data.corpus import pydoc_topics

    texts = [t.strip().split("\n")[0][:80] for t in pydoc_topics() if t.strip()]
    texts = [t for t in texts if len(t) > 8]
    return texts[0::2] if split == "train" else texts[1::2]


# ---------------------------------------------------------------------------- configs and results
@dataclass
class GenerationConfig:
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
    """Teacher-forced scores, ``(B, G, T)`` per token (0 beyond ``gen_mask``), ``(B, G)`` sums."""

    logprobs: torch.Tensor
    entropies: torch.Tensor
    rb_entropies: torch.Tensor
    token_logqs: torch.Tensor
    sequence_logprobs: torch.Tensor
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
        config: GenerationConfig | dict | None = None,
        precision: PrecisionConfig | dict | None = None,
        vllm_backend=None,
    ) -> None:
        if isinstance(config, dict):  # seed 002 style: {"generation": {...}, "precision": {...}}
            precision = precision or config.get("precision")
            config = GenerationConfig(
                **config.get("generation", config if "generation" not in config else {})
            )
        self.config = config or GenerationConfig()
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
        self.diagnostics = DistributionDiagnostics(self.config.policy, self.eos_token_id)
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
        """Draw ``num_prompts`` distinct prompts from a registered dataset with a seeded generator."""
        if dataset_name not in PROMPT_DATASETS:
            raise KeyError(f"Unknown prompt dataset {dataset_name!r}; registered: {sorted(PROMPT_DATASETS)}.")
        pool = PROMPT_DATASETS[dataset_name](split)
        if num_prompts > len(pool):
            raise ValueError(f"{dataset_name}/{split} has {len(pool)} prompts, fewer than {num_prompts}.")
        idx = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:num_prompts]
        return [pool[int(i)] for i in idx]

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
        dec: Decoder = self.model
        b = activations.shape[0]
        t = self.config.max_new_tokens
        if self.config.backend == "hf":  # prefix encoded once per activation, cache expanded over G
            gen = dec.generate_soft_kv_cached_nondiff(
                activations.to(self.device),
                t,
                generator=torch.Generator(self.device).manual_seed(seed),
                policy=self.policy,
                return_logits=False,
                num_samples=g_count,
            )
            ids, logq = gen.hard_token_ids, gen.logprobs
        else:
            embeds = dec.prompt_embeds(activations.to(self.device)).detach()
            out = self.vllm.generate(
                policy=self.policy,
                n=g_count,
                max_new_tokens=t,
                seed=seed,
                prompt_embeds=list(embeds),
                ignore_eos=True,
            )
            ids = torch.tensor([s for req in out.token_ids for s in req], device=self.device)
            logq = torch.tensor([s for req in out.logprobs for s in req], device=self.device)
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
        p_len = enc["input_ids"].shape[1]
        pad = tok.pad_token_id if tok.pad_token_id is not None else self.eos_token_id
        t_max = self.config.max_new_tokens
        rows_ids = enc["input_ids"].repeat_interleave(g_count, 0)
        rows_mask = enc["attention_mask"].repeat_interleave(g_count, 0)
        n = rows_ids.shape[0]
        seqs = torch.full((n, p_len + t_max), pad, dtype=torch.long)
        logq = torch.zeros(n, t_max)
        steps_run = torch.full((n,), t_max, dtype=torch.long)
        if self.config.backend == "hf":
            gen = torch.Generator(self.device).manual_seed(seed)
            for s in range(0, n, gen_batch_size):
                e = min(s + gen_batch_size, n)
                out = hf_generate(
                    self.model,
                    rows_ids[s:e].to(self.device),
                    rows_mask[s:e].to(self.device),
                    policy=self.policy,
                    generator=gen,
                    max_new_tokens=t_max,
                    eos_token_id=self.eos_token_id,
                    pad_token_id=pad,
                    stop_strings=self.config.stop_strings,
                    tokenizer=tok,
                )
                seqs[s:e, : out.sequences.shape[1]] = out.sequences.cpu()
                steps_run[s:e] = out.sequences.shape[1] - p_len
                logq[s:e, : out.sampler_logq.shape[1]] = out.sampler_logq.float().cpu()
                if progress is not None:
                    progress(e - s)
        else:
            ids = [
                row[m.bool()].tolist() for row, m in zip(enc["input_ids"], enc["attention_mask"], strict=True)
            ]
            out = self.vllm.generate(
                policy=self.policy,
                n=g_count,
                max_new_tokens=t_max,
                seed=seed,
                prompt_token_ids=ids,
                stop=self.config.stop_strings,
                eos_token_id=self.eos_token_id,
            )
            r = 0
            for req_ids, req_lp in zip(out.token_ids, out.logprobs, strict=True):
                for sample_ids, sample_lp in zip(req_ids, req_lp, strict=True):
                    seqs[r, :p_len] = rows_ids[r]
                    seqs[r, p_len : p_len + len(sample_ids)] = torch.tensor(sample_ids)
                    logq[r, : len(sample_lp)] = torch.tensor(sample_lp)
                    r += 1
            if progress is not None:
                progress(n)
        gen_part = seqs[:, p_len:]
        if self.config.backend == "vllm":  # vLLM returns each sample up to its own stop
            gen_lens = torch.tensor([len(s) for req in out.token_ids for s in req])
        else:
            gen_lens = self._gen_lengths(gen_part, steps_run)
        t_mask = torch.arange(t_max)[None, :] < gen_lens[:, None]
        attn = torch.cat([rows_mask, t_mask.long()], dim=1)
        texts = [tok.decode(gen_part[i, : gen_lens[i]]) for i in range(n)]
        b = len(prompts)
        return BatchedSequences(
            sequences=seqs.view(b, g_count, -1).to(self.device),
            prompt_lens=[p_len] * b,
            gen_lens=gen_lens.view(b, g_count).to(self.device),
            attention_masks=attn.view(b, g_count, -1).to(self.device),
            responses_text=[texts[i * g_count : (i + 1) * g_count] for i in range(b)],
            sampler_logprobs=(logq * t_mask).view(b, g_count, t_max).to(self.device),
        )

    def _gen_lengths(self, gen_part: torch.Tensor, steps_run: torch.Tensor) -> torch.Tensor:
        """Generated tokens per row: through the first EOS, else through the token that completes
        a stop string, else every step the generator ran for that row's batch. (A sampled pad
        token is an ordinary token: after a stop HF pads, but those positions lie past the stop.)"""
        n = gen_part.shape[0]
        lens = steps_run.clone()
        stops = self.config.stop_strings or []
        for i in range(n):
            row = gen_part[i, : int(steps_run[i])]
            eos = (row == self.eos_token_id).nonzero()
            end = int(eos[0]) + 1 if len(eos) else int(steps_run[i])
            if stops:
                for t in range(1, end + 1):
                    if any(stop in self.tokenizer.decode(row[:t]) for stop in stops):
                        end = t
                        break
            lens[i] = end
        return lens

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
                if return_diagnostics:  # one pass over the vocabulary for scores and diagnostics
                    scores, pack = self.diagnostics.score_and_diagnose(logits, tokens, mask[rows], fp64=fp64)
                    diag_parts.append(pack)
                else:
                    scores = token_scores(logits, tokens, self.policy, fp64=fp64)
            m = mask[rows].to(scores["logp"].dtype)
            for k in parts:
                parts[k].append(torch.where(m.bool(), scores[k], torch.zeros_like(scores[k])))
            if progress is not None:
                progress(rows.stop - rows.start)
        full = {k: torch.cat(v).view(b, g_count, -1) for k, v in parts.items()}
        rb_torch = full["rb_entropy"] if (with_grad and self.config.rb_requires_grad) else None
        res = LogprobResults(
            logprobs=full["logp"],
            entropies=full["surprisal"].detach() if not with_grad else full["surprisal"],
            rb_entropies=full["rb_entropy"].detach()
            if compute_rb
            else torch.zeros_like(full["logp"]).detach(),
            token_logqs=full["logq"],
            sequence_logprobs=full["logp"].sum(-1),
            sequence_logqs=full["logq"].sum(-1),
            rb_entropy_sums=full["rb_entropy"].detach().sum(-1),
            gen_mask=sequences.gen_mask,
            rb_entropies_torch=rb_torch,
        )
        if not return_diagnostics:
            return res
        return res, DiagnosticsResults(_concat_packs(diag_parts))

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
        from torch.nn.attention import SDPBackend, sdpa_kernel

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
                sc = token_scores(logits, tokens, self.policy, fp64=fp64)
                return sc["logq"], sc["rb_entropy"]

            with sdpa_kernel(SDPBackend.MATH):
                if method == "jvp":
                    (lq, rb), (dlq, drb) = torch.func.jvp(scores, (primals,), (tangents,))
                else:
                    lq, rb, dlq, drb = _double_backward_jvp(scores, primals, tangents)
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
            prompts_pool = PROMPT_DATASETS[dataset_name](split)
        size = len(prompts_pool) if max_prompts_pool is None else min(max_prompts_pool, len(prompts_pool))
        idx = torch.randint(0, size, (total_sequences,), generator=torch.Generator().manual_seed(seed))
        if isinstance(prompts_pool, torch.Tensor):
            chosen = prompts_pool[idx]
        else:
            chosen = [prompts_pool[int(i)] for i in idx]
        kwargs.pop("G", None)
        return self.generate_with_logprobs(prompts=chosen, G=1, seed=seed, **kwargs)


def _double_backward_jvp(fn, primals: dict, tangents: dict) -> tuple[torch.Tensor, ...]:
    """``J v`` by reverse mode: ``g(u) = J^T u`` is linear in ``u``, so ``d<g(u), v>/du = J v``."""
    params = {k: p.detach().requires_grad_(True) for k, p in primals.items()}
    with torch.enable_grad():
        outs = fn(params)
        us = [torch.zeros_like(o, requires_grad=True) for o in outs]
        keys = list(params)
        safe = [torch.where(torch.isfinite(o), o, torch.zeros_like(o)) for o in outs]
        grads = torch.autograd.grad(safe, [params[k] for k in keys], us, create_graph=True, allow_unused=True)
        pairs = [(g, tangents[k]) for g, k in zip(grads, keys, strict=True) if g is not None]
        dot = sum((g * t).sum() for g, t in pairs)
        jv = torch.autograd.grad(dot, us, allow_unused=True)
    return (
        *(o.detach() for o in outs),
        *(torch.zeros_like(o) if j is None else j.detach() for o, j in zip(outs, jv, strict=True)),
    )


def _concat_packs(packs: list[DiagnosticsPack]) -> DiagnosticsPack:
    from dataclasses import fields as dc_fields

    from lens_rl.ops.diagnostics import SequenceDiagnostics, TokenStepDiagnostics

    def cat(objs, cls):
        vals = {}
        for f in dc_fields(cls):
            xs = [getattr(o, f.name) for o in objs]
            vals[f.name] = None if xs[0] is None else torch.cat(xs)
        return cls(**vals)

    return DiagnosticsPack(
        step=cat([p.step for p in packs], TokenStepDiagnostics),
        seq=cat([p.seq for p in packs], SequenceDiagnostics),
    )
