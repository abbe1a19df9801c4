"""HF generation that samples exactly from the shared :class:`SamplingPolicy`.

HF's own warpers and its sampler (``torch.multinomial`` on global RNG state) are bypassed:
:class:`PolicyGumbelProcessor` runs the project's one Gumbel-max step
(:func:`~lens_rl.ops.sampling.gumbel_max_sample`: ``policy.process_logits`` plus Gumbel noise from
an explicit ``torch.Generator``) and hands ``z + g`` to ``generate``, which runs greedy, so its
``argmax(z + g)`` is an exact draw from q. The processor records log q of each drawn token (the
sampler's log-probs), so a teacher-forced re-score can be compared with what the sampler used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig as HFGenerationConfig
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel

from lens_rl.ops.sampling import SamplingPolicy, gumbel_max_sample


class PolicyGumbelProcessor(LogitsProcessor):
    """Turn greedy decoding into exact sampling from ``policy``, recording log q of each draw."""

    def __init__(self, policy: SamplingPolicy, generator: torch.Generator) -> None:
        self.policy = policy
        self.generator = generator
        self.logq_steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        draw = gumbel_max_sample(scores, self.policy, self.generator)
        self.logq_steps.append(draw.logq)
        return draw.perturbed  # greedy decoding takes its argmax: draw.ids


@dataclass
class HFGenerated:
    """``sequences`` ``(N, P + T)`` (prompt + generated, pad after a stop), ``sampler_logq`` ``(N, T)``."""

    sequences: torch.Tensor
    sampler_logq: torch.Tensor


@torch.no_grad()
def hf_generate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    policy: SamplingPolicy,
    generator: torch.Generator,
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int,
    stop_strings: list[str] | None = None,
    tokenizer=None,
) -> HFGenerated:
    """Sample ``max_new_tokens`` (or until EOS/stop string) for each row of a left-padded batch."""
    proc = PolicyGumbelProcessor(policy, generator)
    gen_cfg = HFGenerationConfig(  # a fresh config: none of the checkpoint's sampling defaults apply
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        stop_strings=stop_strings,
    )
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        generation_config=gen_cfg,
        logits_processor=LogitsProcessorList([proc]),
        tokenizer=tokenizer if stop_strings else None,
    )
    logq = torch.stack(proc.logq_steps, dim=1) if proc.logq_steps else torch.zeros(input_ids.shape[0], 0)
    return HFGenerated(sequences=out, sampler_logq=logq)
