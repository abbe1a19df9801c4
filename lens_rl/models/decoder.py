"""The lens decoder: activation ``A`` -> short text, by Gumbel-softmax + straight-through.

Sequence layout (one row per activation)::

    [prompt_left_emb ... | proj(A) | prompt_right_emb ... | generated token embeddings ...]
                           ^ embed_pos (the ``<embed>`` slot)

Single-layer mode writes ``proj(A)`` into the input slot only (this is the layout vLLM gets as
``prompt_embeds``). Multi-layer mode (``patch_all_layers``) additionally *replaces* the input of
each block ``i < N`` at the slot with ``proj_i(A)`` (one projection per layer, or one shared),
through the single hook mechanism in :mod:`lens_rl.models.hooks`. For GPT-2 this means block
0 sees ``proj_0(A)`` without the learned position embedding at the slot; the semantics is the
same for every architecture: "the input of block i at the slot is proj_i(A)".

Token embeddings and ``proj(A)``: the sequence is fed as ``inputs_embeds``, i.e. the residual
stream entering block 0 (plus GPT-2's learned positions, which its model adds). Every *token*
in it (the initial soft prompt, each generated token) is exactly what the model's own embedding
module returns for that id, so families that scale inside that module (Gemma 2/3:
``weight[id] * sqrt(hidden_size)``) get their scaled values; the straight-through gradient path
is ``softmax(...) @ W_E * scale``, the same linear map. ``proj(A)`` is injected *after* that
scale: it is not multiplied by ``sqrt(hidden_size)``, the residual stream entering block 0 at the
slot is ``proj(A)`` itself (for GPT-2, ``proj(A) + wpe[slot]``), the same quantity as ``A`` (a
residual-stream activation after block L). The logits are the model's own: the LM head followed
by ``final_logit_softcapping`` when the config sets it (Gemma 2/3), so log q / log p are those of
the distribution the tokens are sampled from. See :mod:`lens_rl.models.families`.

RoPE variants whose frequencies depend on the sequence length (``dynamic``, ``longrope``) are
accepted only for passes no longer than their limit (``max_position_embeddings`` /
``original_max_position_embeddings``); a longer generation or ``fwd_tokens`` raises
:class:`~lens_rl.config.ConfigError` naming the rope type, since past it cached and recomputed
passes disagree.

All three generators and :meth:`Decoder.fwd_tokens` go through :meth:`Decoder._backbone` and
:meth:`Decoder._sample_step`, so they differ only in caching and in whether a graph is kept.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lens_rl.config import ConfigError
from lens_rl.models.configuration import (
    _FULL_TRAINING,
    EMBED_MARKER,
    DecoderConfig,
    refuse_lora_with_full_training,
)
from lens_rl.models.families import (
    embed_soft,
    embed_tokens,
    length_dependent_rope_error,
    lm_logits,
    load_causal_lm,
)
from lens_rl.models.family_check import check_lens_family
from lens_rl.models.hooks import checkpointed_blocks, hooked, replace_rows
from lens_rl.models.lora import check_lora_config, lora_base, lora_parameters
from lens_rl.ops.diagnostics import score_tokens
from lens_rl.ops.sampling import SamplingPolicy, gumbel_max_sample


@dataclass
class Generated:
    """Output of every decoder generator.

    Attributes:
        generated_text_embeddings: ``(B, T, d)`` input embeddings of the sampled tokens (with
            straight-through gradients in the differentiable generators); what the encoder reads.
        raw_lm_logits: ``(B, T, V)`` fp32 logits before temperature/truncation; step ``t``'s
            logits are the ones token ``t`` was sampled from.
        hard_token_ids: ``(B, T)`` sampled token ids.
        logprobs: ``(B, T)`` log q of each sampled token under the sampling policy (processed
            log-probs), when requested.
        hidden_states: ``(B, T, d)`` final hidden state (the LM head's input) at each step,
            when requested.
    """

    generated_text_embeddings: torch.Tensor
    raw_lm_logits: torch.Tensor
    hard_token_ids: torch.Tensor
    logprobs: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None

    def detach(self) -> Generated:
        """A copy with every tensor detached."""
        return Generated(
            **{
                f.name: (v.detach() if (v := getattr(self, f.name)) is not None else None)
                for f in fields(self)
            }
        )


@dataclass
class FwdTokensOutput:
    """Teacher-forced scores of given tokens.

    Attributes:
        logprobs: ``(B, T)`` log q of each given token under the policy (the default policy is the
            model's plain softmax at temperature 1, where q = p), with gradient: ``TokenScores.logq``.
        entropies: ``(B, T)`` H(q), the entropy of the same distribution at each position (the
            Rao-Blackwellised estimate, not the surprisal), with gradient: ``TokenScores.rb_entropy``.
        logits: ``(B, T, V)`` fp32 raw logits that scored each token.
        hidden_states: ``(B, T, d)`` final hidden states, when requested.
    """

    logprobs: torch.Tensor | None
    entropies: torch.Tensor | None
    logits: torch.Tensor
    hidden_states: torch.Tensor | None = None


def _identity_linear(d: int) -> nn.Linear:
    lin = nn.Linear(d, d)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(d))
        lin.bias.zero_()
    return lin


class Decoder(nn.Module):
    """Consistency-lens decoder around a decoder-only causal LM (families: see
    :data:`lens_rl.models.families.TESTED_FAMILIES`).

    Attributes:
        base: the causal LM (own copy, or frozen weights shared with the orig model).
        proj: shared projection ``d -> d`` (None with per-layer projections).
        proj_layers: per-layer projections, one per patched block (None otherwise).
        prompt_left_emb: ``(L_left, d)`` soft prompt before the slot.
        prompt_right_emb: ``(L_right, d)`` soft prompt after the slot.
    """

    base: PreTrainedModel
    proj: nn.Linear | None
    proj_layers: nn.ModuleList | None
    prompt_left_emb: nn.Parameter
    prompt_right_emb: nn.Parameter

    def __init__(
        self, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: DecoderConfig
    ) -> None:
        super().__init__()
        self.config = config
        if config.lora:  # adapters on a structural copy sharing every weight (no deep copy)
            base = lora_base(base, config.lora, "decoder.lora")
        self.base = base
        self.family = check_lens_family(base)  # raises on unsupported architectures
        # Block checkpointing of cache-free passes (fwd_tokens, generate_soft); set by
        # ConsistencyLens.gradient_checkpointing_enable. The KV-cached generators keep activations.
        self.checkpointing: dict | None = None
        n_blocks = self.family.n_layers
        d = base.get_input_embeddings().weight.shape[1]
        pal = config.patch_all_layers
        self.n_patched = 0 if pal is False else (n_blocks if pal is True else int(pal))
        if self.n_patched > n_blocks:
            raise ConfigError(f"patch_all_layers={pal} exceeds the model's {n_blocks} blocks.")
        if config.per_layer_projections:
            self.proj = None
            self.proj_layers = nn.ModuleList([_identity_linear(d) for _ in range(self.n_patched)])
        else:
            self.proj = _identity_linear(d)
            self.proj_layers = None
        dtype = base.get_input_embeddings().weight.dtype
        (self.proj or self.proj_layers).to(dtype)
        self.set_prompt(config.prompt, tokenizer)
        self._apply_trainability()
        self.base.train(False)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(
        cls, path: str | Path, tokenizer: PreTrainedTokenizerBase, config: DecoderConfig, dtype=torch.float32
    ) -> Decoder:
        """Build a decoder on its own copy of a local checkpoint folder."""
        return cls(load_causal_lm(path, dtype=dtype), tokenizer, config)

    @classmethod
    def from_base(
        cls,
        base: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: DecoderConfig,
        share_weights: bool = False,
    ) -> Decoder:
        """Build a decoder on ``base``: a deep copy, or (``share_weights``) the same frozen module.

        Sharing saves memory when only the projections and prompt train; it is refused when any
        base weight is trainable, since that would also change the orig model. With
        ``config.lora`` the base is never copied: the adapters go on a structural copy that shares
        every weight (:func:`lens_rl.models.lora.lora_base`).
        """
        if config.lora:
            return cls(base, tokenizer, config)
        if share_weights:
            trainable = [
                n
                for n in ("trainable_base", "trainable_embeddings", "trainable_output_head")
                if getattr(config, n)
            ]
            if trainable:
                raise ConfigError(f"share_weights=True needs a frozen base, but {trainable} are set.")
            if config.use_dropout:
                raise ConfigError(
                    "use_dropout=True would switch the shared (orig) model to train mode; "
                    "use share_weights=False."
                )
            return cls(base, tokenizer, config)
        return cls(copy.deepcopy(base), tokenizer, config)

    def set_prompt(self, prompt: str, tokenizer: PreTrainedTokenizerBase) -> None:
        """Split ``prompt`` at ``<embed>`` and initialise the soft prompts from the token embeddings."""
        left, right = prompt.split(EMBED_MARKER)
        ids_l = tokenizer(left, add_special_tokens=False)["input_ids"] if left else []
        ids_r = tokenizer(right, add_special_tokens=False)["input_ids"] if right else []
        dev = self.base.get_input_embeddings().weight.device
        with torch.no_grad():  # the values the model itself would see for these tokens (scaled)
            emb_l = embed_tokens(self.base, torch.tensor(ids_l, dtype=torch.long, device=dev))
            emb_r = embed_tokens(self.base, torch.tensor(ids_r, dtype=torch.long, device=dev))
        self.prompt_left_emb = nn.Parameter(emb_l.detach().clone())
        self.prompt_right_emb = nn.Parameter(emb_r.detach().clone())
        self.register_buffer(
            "prompt_ids", torch.tensor(ids_l + [-1] + ids_r, dtype=torch.long), persistent=False
        )
        self.embed_pos = len(ids_l)
        self._apply_trainability()
        self.check_length(0)  # the prompt alone must fit a length-dependent RoPE's limit

    def _apply_trainability(self) -> None:
        cfg = self.config
        head = self.base.get_output_embeddings()
        inp = self.base.get_input_embeddings()
        for p in self.base.parameters():
            p.requires_grad_(cfg.trainable_base)
        for p in inp.parameters():
            p.requires_grad_(cfg.trainable_embeddings)
        pos = getattr(getattr(self.base, "transformer", None), "wpe", None)  # GPT-2 learned positions
        if pos is not None:
            for p in pos.parameters():
                p.requires_grad_(cfg.trainable_embeddings)
        if head is not None and head.weight is not inp.weight:
            for p in head.parameters():
                p.requires_grad_(cfg.trainable_output_head)
        for p in self.projection_parameters():
            p.requires_grad_(cfg.trainable_projection)
        if hasattr(self, "prompt_left_emb"):
            self.prompt_left_emb.requires_grad_(cfg.trainable_prompt)
            self.prompt_right_emb.requires_grad_(cfg.trainable_prompt)
        for p in lora_parameters(self.base):
            p.requires_grad_(True)

    def enable_lora(self, lora: dict, where: str = "peft_config") -> None:
        """Add LoRA adapters to a built decoder (e.g. an SFT lens that trained without them)."""
        if self.config.lora:
            raise ConfigError(
                f"{where}: the decoder already has LoRA adapters ({self.config.lora}); leave {where} unset "
                "to go on training them."
            )
        lora = check_lora_config(lora, where)
        refuse_lora_with_full_training(lora, self.config, "decoder", _FULL_TRAINING)
        self.base = lora_base(self.base, lora, where)
        self.config.lora = lora
        self._apply_trainability()

    def projection_parameters(self) -> list[nn.Parameter]:
        """Parameters of the projection(s) of A (for per-group learning rates)."""
        return list((self.proj or self.proj_layers).parameters())

    def prompt_parameters(self) -> list[nn.Parameter]:
        """The soft-prompt embeddings."""
        return [self.prompt_left_emb, self.prompt_right_emb]

    def train(self, mode: bool = True) -> Decoder:
        """Train mode for the lens parts; the base keeps dropout off unless ``use_dropout``."""
        super().train(mode)
        self.base.train(mode and self.config.use_dropout)
        return self

    # ----------------------------------------------------------------- shared pieces
    @property
    def prefix_len(self) -> int:
        """Length of ``[prompt_left, slot, prompt_right]``."""
        return self.prompt_left_emb.shape[0] + 1 + self.prompt_right_emb.shape[0]

    def projected(self, activation: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Project ``A`` ``(B, d)``: the input-slot value and the per-block patch values."""
        a = activation.to(self.prompt_left_emb.dtype)
        if self.proj_layers is not None:
            vals = {i: p(a) for i, p in enumerate(self.proj_layers)}
            return vals[0], vals
        v = self.proj(a)
        return v, {i: v for i in range(self.n_patched)}

    def prefix_embeds(self, slot: torch.Tensor) -> torch.Tensor:
        """``(B, P, d)`` prompt embeddings with ``slot`` ``(B, d)`` at the ``<embed>`` position."""
        b = slot.shape[0]
        return torch.cat(
            [
                self.prompt_left_emb.unsqueeze(0).expand(b, -1, -1),
                slot.unsqueeze(1),
                self.prompt_right_emb.unsqueeze(0).expand(b, -1, -1),
            ],
            dim=1,
        )

    def prompt_embeds(self, activation: torch.Tensor) -> torch.Tensor:
        """The decoder's prompt for ``A`` as input embeddings ``(B, P, d)`` (vLLM's ``prompt_embeds``).

        Only valid in single-layer mode: multi-layer patching edits block inputs, which an engine
        fed with prompt embeddings cannot do.
        """
        if self.n_patched:
            raise ConfigError("prompt_embeds() cannot express multi-layer patching (patch_all_layers).")
        return self.prefix_embeds(self.projected(activation)[0])

    def _backbone(
        self,
        embeds: torch.Tensor,
        layer_values: dict[int, torch.Tensor] | None = None,
        past=None,
        use_cache: bool = False,
    ):
        """Run the transformer on ``embeds``; patch the slot when the pass contains it.

        Returns the final hidden states ``(B, S, d)`` (the LM head's input) and the cache.
        """
        edits = {}
        if layer_values and past is None:  # a pass that starts at position 0 contains the slot
            pos = torch.full((embeds.shape[0],), self.embed_pos, device=embeds.device, dtype=torch.long)
            edits = {i: (lambda h, v=v: replace_rows(h, pos, v)) for i, v in layer_values.items()}
        ckpt = (
            checkpointed_blocks(self.base, **self.checkpointing)
            if self.checkpointing is not None and not use_cache and past is None and torch.is_grad_enabled()
            else contextlib.nullcontext()
        )
        with hooked(self.base, input_edits=edits), ckpt:
            out = self.base.base_model(inputs_embeds=embeds, past_key_values=past, use_cache=use_cache)
        return out.last_hidden_state, (out.past_key_values if use_cache else None)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits the model itself returns (head, then soft-capping where configured)."""
        return lm_logits(self.base, hidden)

    def check_length(self, n_tokens: int) -> None:
        """Refuse a pass over the prompt plus ``n_tokens`` tokens (the longest pass of a
        generation of ``n_tokens + 1`` tokens, or of ``fwd_tokens`` on ``n_tokens + 1``) when a
        length-dependent RoPE would change its frequencies inside it (see the module docstring)."""
        limit = self.family.rope_limit
        needed = self.prefix_len + n_tokens
        if limit is not None and needed > limit[1]:
            raise length_dependent_rope_error(self.family.model_type, limit[0], limit[1], needed)

    def _sample_step(
        self,
        logits: torch.Tensor,
        policy: SamplingPolicy,
        generator: torch.Generator,
        gumbel_tau: float,
        differentiable: bool,
        want_logq: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Sample one token per row by Gumbel-max; return (ids, embeddings, log q of the ids or None).

        The draw is :func:`~lens_rl.ops.sampling.gumbel_max_sample` (shared with the HF backend).
        Forward: exactly what the model's embedding module returns for the sampled token
        (Gemma: the row times ``sqrt(hidden_size)``). Backward (when ``differentiable``): the
        gradient of ``softmax((z + g) / tau) @ W_E * scale`` flows into the logits, i.e. the
        straight-through Gumbel-softmax estimator. ``tau`` never changes which token is drawn.
        """
        draw = gumbel_max_sample(logits, policy, generator, want_logq=want_logq)
        emb = embed_tokens(self.base, draw.ids)
        if differentiable:
            y_soft = F.softmax(draw.perturbed / gumbel_tau, dim=-1)
            # (y_soft - y_soft.detach()) is exactly 0 forward; backward it carries d/dy_soft.
            emb = emb + embed_soft(self.base, y_soft - y_soft.detach())
        return draw.ids, emb, draw.logq

    def _generate(
        self,
        activation: torch.Tensor,
        max_length: int,
        *,
        generator: torch.Generator,
        use_cache: bool,
        differentiable: bool,
        gumbel_tau: float = 1.0,
        policy: SamplingPolicy | None = None,
        return_logprobs: bool = False,
        return_hidden: bool = False,
        num_samples: int = 1,
    ) -> Generated:
        """The one generation loop behind all three public generators.

        ``num_samples = G > 1`` returns ``B * G`` rows (row ``b * G + g``). With the KV cache the
        prompt and activation are encoded once per activation and the cache is expanded over the
        group; without it the activations are repeated. Both draw the same tokens as passing
        ``activation.repeat_interleave(G, 0)``.
        """
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}.")
        if gumbel_tau <= 0:
            raise ValueError(f"gumbel_tau must be > 0, got {gumbel_tau}.")
        if activation.dim() != 2:
            raise ValueError(f"activation must be (B, d), got shape {tuple(activation.shape)}.")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
        self.check_length(max_length - 1)
        policy = policy or SamplingPolicy()
        expand_cache = use_cache and num_samples > 1
        if num_samples > 1 and not use_cache:
            activation = activation.repeat_interleave(num_samples, dim=0)
        slot, layer_values = self.projected(activation)
        prefix = self.prefix_embeds(slot)
        embs: list[torch.Tensor] = []
        logits_l, ids_l, logq_l, hid_l = [], [], [], []
        past = None
        for t in range(max_length):
            if use_cache and t > 0:
                hidden, past = self._backbone(embs[-1].unsqueeze(1), past=past, use_cache=True)
            else:
                seq = torch.cat([prefix, *[e.unsqueeze(1) for e in embs]], dim=1)
                hidden, past = self._backbone(seq, layer_values, use_cache=use_cache)
                if expand_cache:  # prefix encoded once per activation; the group shares it
                    past.batch_repeat_interleave(num_samples)
                    hidden = hidden.repeat_interleave(num_samples, dim=0)
            h_last = hidden[:, -1]
            logits = self._head(h_last)  # (B, V)
            ids, emb, log_q = self._sample_step(
                logits, policy, generator, gumbel_tau, differentiable, want_logq=return_logprobs
            )
            embs.append(emb)
            logits_l.append(logits)
            ids_l.append(ids)
            logq_l.append(log_q)
            hid_l.append(h_last)
        return Generated(
            generated_text_embeddings=torch.stack(embs, dim=1),
            raw_lm_logits=torch.stack(logits_l, dim=1),
            hard_token_ids=torch.stack(ids_l, dim=1),
            logprobs=torch.stack(logq_l, dim=1) if return_logprobs else None,
            hidden_states=torch.stack(hid_l, dim=1) if return_hidden else None,
        )

    # ----------------------------------------------------------------- public API
    def generate_soft(
        self,
        activation: torch.Tensor,
        max_length: int,
        gumbel_tau: float = 1.0,
        *,
        generator: torch.Generator,
        policy: SamplingPolicy | None = None,
        return_logprobs: bool = False,
        return_hidden: bool = False,
        num_samples: int = 1,
    ) -> Generated:
        """Reference generator: recompute the whole sequence at every step, differentiable. O(T^2)."""
        return self._generate(
            activation,
            max_length,
            generator=generator,
            use_cache=False,
            differentiable=True,
            gumbel_tau=gumbel_tau,
            policy=policy,
            return_logprobs=return_logprobs,
            return_hidden=return_hidden,
            num_samples=num_samples,
        )

    def generate_soft_kv_cached(
        self,
        activation: torch.Tensor,
        max_length: int,
        gumbel_tau: float = 1.0,
        *,
        generator: torch.Generator,
        policy: SamplingPolicy | None = None,
        return_logprobs: bool = False,
        return_hidden: bool = False,
        num_samples: int = 1,
    ) -> Generated:
        """Same tokens and values as :meth:`generate_soft` in O(T), the KV cache kept in the graph.

        Gradients reach A, the projection(s), the prompt (and trainable base weights) through
        every step, because the cached keys/values are ordinary autograd tensors.
        """
        return self._generate(
            activation,
            max_length,
            generator=generator,
            use_cache=True,
            differentiable=True,
            gumbel_tau=gumbel_tau,
            policy=policy,
            return_logprobs=return_logprobs,
            return_hidden=return_hidden,
            num_samples=num_samples,
        )

    def generate_soft_kv_cached_nondiff(
        self,
        activation: torch.Tensor,
        max_length: int,
        *,
        generator: torch.Generator,
        policy: SamplingPolicy | None = None,
        return_logprobs: bool = True,
        return_logits: bool = True,
        return_hidden: bool = False,
        num_samples: int = 1,
    ) -> Generated:
        """Rollout generator: KV-cached, under ``no_grad`` (no graph), same tokens as the others.

        Samples from ``policy`` (temperature, top-k, top-p); ``logprobs`` are log q of the
        sampled tokens under that policy. With ``return_logits=False`` the returned
        ``raw_lm_logits`` is an empty ``(B, T, 0)`` tensor. The outputs are ordinary tensors (no
        copy needed, as there was out of ``inference_mode``), so they can index into a later
        graph-carrying pass. Not ``inference_mode``: under
        FSDP2 the weights gathered inside it would become inference tensors, which the next
        gathered pass outside it may not overwrite (measured: a RuntimeError in the GRPO scorer).
        """
        with torch.no_grad():
            out = self._generate(
                activation,
                max_length,
                generator=generator,
                use_cache=True,
                differentiable=False,
                policy=policy,
                return_logprobs=return_logprobs,
                return_hidden=return_hidden,
                num_samples=num_samples,
            )
        if not return_logits:  # a fresh empty tensor: a view would keep the whole logits alive
            out.raw_lm_logits = out.raw_lm_logits.new_empty((*out.raw_lm_logits.shape[:-1], 0))
        return out

    def forward(self, activation: torch.Tensor, tokens: torch.Tensor, **kwargs) -> FwdTokensOutput:
        """Alias of :meth:`fwd_tokens`, so ``torch.func.functional_call`` can override parameters."""
        return self.fwd_tokens(activation, tokens, **kwargs)

    def fwd_tokens(
        self,
        activation: torch.Tensor,
        tokens: torch.Tensor,
        *,
        policy: SamplingPolicy | None = None,
        return_hidden: bool = False,
        scores: bool = True,
    ) -> FwdTokensOutput:
        """One teacher-forced pass over ``[prompt, slot, prompt_right, tokens]``, patched as in generation.

        Token ``t`` is scored by the logits at the position before it (the slot's right prompt
        end for ``t = 0``). The RL stage uses ``logprobs`` as the policy's log pi.

        Args:
            activation: ``(B, d)``.
            tokens: ``(B, T)`` token ids (e.g. ``Generated.hard_token_ids``).
            policy: score under this sampling policy (log q); default: plain softmax (log p).
            scores: compute ``logprobs``/``entropies`` (with :func:`~lens_rl.ops.diagnostics.score_tokens`,
                the scorer the sequence processor and the trainer share); False: logits only.
        """
        if tokens.dim() != 2 or tokens.shape[0] != activation.shape[0]:
            raise ValueError(
                f"tokens must be (B, T) with B = {activation.shape[0]}, got shape {tuple(tokens.shape)}."
            )
        self.check_length(tokens.shape[1] - 1)
        policy = policy or SamplingPolicy()
        slot, layer_values = self.projected(activation)
        # The last token is only scored, never read: the pass stops before it, so it is exactly as
        # long as the generation step that sampled that token.
        seq = torch.cat([self.prefix_embeds(slot), embed_tokens(self.base, tokens[:, :-1])], dim=1)
        hidden, _ = self._backbone(seq, layer_values)
        p = self.prefix_len
        h_sel = hidden[:, p - 1 : p - 1 + tokens.shape[1]]  # (B, T, d)
        logits = self._head(h_sel)  # (B, T, V)
        lp = ent = None
        if scores:
            sc = score_tokens(logits, tokens, policy)
            lp, ent = sc.logq, sc.rb_entropy
        return FwdTokensOutput(
            logprobs=lp,
            entropies=ent,
            logits=logits,
            hidden_states=h_sel if return_hidden else None,
        )
