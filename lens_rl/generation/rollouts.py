"""Rollouts: the one place that samples from a policy, on HF or vLLM.

:func:`lens_rollouts` samples explanations of activations: the GRPO trainer
(``LensGRPOTrainer._rollouts``) and the sequence processor in lens mode
(``SequenceProcessor.generate_batched``) both call it. Each activation gets
``G`` explanations of exactly ``max_new_tokens`` tokens (EOS is an ordinary token), sampled from
the shared :class:`~lens_rl.ops.sampling.SamplingPolicy`:

- HF (no vLLM backend): the decoder's no-grad KV-cached generator
  (:meth:`~lens_rl.models.decoder.Decoder.generate_soft_kv_cached_nondiff`), the prefix encoded
  once per activation and the cache expanded over the ``G`` samples; Gumbel-max noise from
  ``torch.Generator(device).manual_seed(seed)``.
- vLLM: one request per activation with ``n = G``, the decoder's prompt as ``prompt_embeds``
  (single-layer patching only), request ``i`` seeded ``seed + i``; the engine's processed
  log-probs are log q.

Row ``b * G + g`` of the outputs is sample ``g`` of activation ``b``. Syncing a trained base into
the engine is the caller's job (the trainer does it once per optimizer step).

:func:`text_rollouts` samples continuations of text prompts from a plain causal LM (the
sequence processor's text mode): HF ``generate`` driven by the same Gumbel-max step
(:func:`~lens_rl.generation.hf_backend.hf_generate`, in batches of rows), or vLLM with token
prompts; each sample ends at EOS or a stop string, which is generated and kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from lens_rl.generation.hf_backend import hf_generate
from lens_rl.generation.vllm_backend import VLLMBackend
from lens_rl.models.decoder import Decoder
from lens_rl.ops.sampling import SamplingPolicy


@dataclass
class LensRollouts:
    """``B * G`` sampled explanations (row ``b * G + g``).

    Attributes:
        token_ids: ``(B * G, T)`` sampled token ids.
        sampler_logqs: ``(B * G, T)`` float32 log q of each token as the sampler computed it.
    """

    token_ids: torch.Tensor
    sampler_logqs: torch.Tensor


def lens_rollouts(
    decoder: Decoder,
    activations: torch.Tensor,
    num_samples: int,
    max_new_tokens: int,
    *,
    policy: SamplingPolicy,
    seed: int,
    vllm_backend: VLLMBackend | None = None,
) -> LensRollouts:
    """Sample ``num_samples`` explanations of ``max_new_tokens`` tokens per activation.

    Args:
        decoder: the lens decoder (its prompt and projection carry the activation).
        activations: ``(B, d)`` one row per activation, on the decoder's device.
        num_samples: ``G``, explanations per activation.
        max_new_tokens: ``T``, tokens per explanation.
        policy: the sampling policy q.
        seed: seeds the HF generator, or vLLM request ``i`` with ``seed + i``.
        vllm_backend: sample on this engine; None: the decoder's HF generator.
    """
    device = activations.device
    if vllm_backend is None:
        gen = decoder.generate_soft_kv_cached_nondiff(
            activations,
            max_new_tokens,
            generator=torch.Generator(device).manual_seed(seed),
            policy=policy,
            return_logits=False,
            num_samples=num_samples,
        )
        return LensRollouts(token_ids=gen.hard_token_ids, sampler_logqs=gen.logprobs.float())
    with torch.no_grad():
        embeds = decoder.prompt_embeds(activations)  # (B, P, d)
    out = vllm_backend.generate(
        policy=policy,
        n=num_samples,
        max_new_tokens=max_new_tokens,
        seed=seed,
        prompt_embeds=list(embeds),
        ignore_eos=True,
    )
    ids = torch.tensor([s for req in out.token_ids for s in req], device=device)
    logq = torch.tensor([s for req in out.logprobs for s in req], device=device, dtype=torch.float32)
    return LensRollouts(token_ids=ids, sampler_logqs=logq)


@dataclass
class TextRollouts:
    """``B * G`` continuations of ``B`` left-padded prompts (row ``b * G + g``).

    Attributes:
        sequences: ``(B * G, P + T)`` prompt (left-padded to P) + generated tokens (pad after).
        sampler_logqs: ``(B * G, T)`` float32 log q of each generated token as the sampler
            computed it (0 where nothing was generated).
        gen_lens: ``(B * G,)`` generated tokens, including the EOS or stop token.
    """

    sequences: torch.Tensor
    sampler_logqs: torch.Tensor
    gen_lens: torch.Tensor


def text_rollouts(
    model: PreTrainedModel,
    tokenizer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    num_samples: int,
    max_new_tokens: int,
    *,
    policy: SamplingPolicy,
    seed: int,
    eos_token_id: int | None,
    pad_token_id: int,
    stop_strings: list[str] | None = None,
    gen_batch_size: int = 32,
    vllm_backend: VLLMBackend | None = None,
    progress: Callable[[int], None] | None = None,
) -> TextRollouts:
    """Sample ``num_samples`` continuations (up to ``max_new_tokens``) of each prompt.

    Args:
        model: the causal LM (HF) whose policy is sampled.
        tokenizer: decodes rows for the stop strings.
        input_ids: ``(B, P)`` left-padded prompts (CPU).
        attention_mask: ``(B, P)``.
        num_samples: ``G``, continuations per prompt.
        max_new_tokens: ``T``.
        policy: the sampling policy q.
        seed: seeds the HF generator (one for all batches), or vLLM request ``i`` with ``seed + i``.
        eos_token_id: ends a sample (kept and scored).
        pad_token_id: fills the rows after a sample ends.
        stop_strings: also end a sample at the token that completes one of them.
        gen_batch_size: HF rows per ``generate`` call.
        vllm_backend: sample on this engine; None: HF.
        progress: called with the number of rows finished after each batch.

    Returns:
        :class:`TextRollouts` on the CPU.
    """
    device = next(model.parameters()).device
    p_len = input_ids.shape[1]
    rows_ids = input_ids.repeat_interleave(num_samples, 0)
    rows_mask = attention_mask.repeat_interleave(num_samples, 0)
    n = rows_ids.shape[0]
    seqs = torch.full((n, p_len + max_new_tokens), pad_token_id, dtype=torch.long)
    logq = torch.zeros(n, max_new_tokens)
    steps_run = torch.full((n,), max_new_tokens, dtype=torch.long)
    if vllm_backend is None:
        gen = torch.Generator(device).manual_seed(seed)
        for s in range(0, n, gen_batch_size):
            e = min(s + gen_batch_size, n)
            out = hf_generate(
                model,
                rows_ids[s:e].to(device),
                rows_mask[s:e].to(device),
                policy=policy,
                generator=gen,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
                stop_strings=stop_strings,
                tokenizer=tokenizer,
            )
            seqs[s:e, : out.sequences.shape[1]] = out.sequences.cpu()
            steps_run[s:e] = out.sequences.shape[1] - p_len
            logq[s:e, : out.sampler_logq.shape[1]] = out.sampler_logq.float().cpu()
            if progress is not None:
                progress(e - s)
        gen_lens = _gen_lengths(seqs[:, p_len:], steps_run, eos_token_id, stop_strings, tokenizer)
        return TextRollouts(sequences=seqs, sampler_logqs=logq, gen_lens=gen_lens)
    ids = [row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask, strict=True)]
    out = vllm_backend.generate(
        policy=policy,
        n=num_samples,
        max_new_tokens=max_new_tokens,
        seed=seed,
        prompt_token_ids=ids,
        stop=stop_strings,
        eos_token_id=eos_token_id,
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
    # vLLM returns each sample up to its own stop
    gen_lens = torch.tensor([len(s) for req in out.token_ids for s in req])
    return TextRollouts(sequences=seqs, sampler_logqs=logq, gen_lens=gen_lens)


def _gen_lengths(
    gen_part: torch.Tensor,
    steps_run: torch.Tensor,
    eos_token_id: int | None,
    stop_strings: list[str] | None,
    tokenizer,
) -> torch.Tensor:
    """Generated tokens per row: through the first EOS, else through the token that completes
    a stop string, else every step the generator ran for that row's batch. (A sampled pad
    token is an ordinary token: after a stop HF pads, but those positions lie past the stop.)"""
    n = gen_part.shape[0]
    lens = steps_run.clone()
    stops = stop_strings or []
    for i in range(n):
        row = gen_part[i, : int(steps_run[i])]
        eos = (row == eos_token_id).nonzero()
        end = int(eos[0]) + 1 if len(eos) else int(steps_run[i])
        if stops:
            for t in range(1, end + 1):
                if any(stop in tokenizer.decode(row[:t]) for stop in stops):
                    end = t
                    break
        lens[i] = end
    return lens
