"""The lens encoder: generated text embeddings -> reconstructed activation ``Â``.

It reads the decoder's ``generated_text_embeddings`` (so gradients flow back into the decoder
through the straight-through estimator; token embeddings are what the model's own embedding
module returns, scaled for Gemma, see :mod:`lens_rl.models.families`), optionally wrapped in a soft prompt split at a
``<text>`` marker, runs its base LM only up to ``output_layer`` (later blocks, the final norm
and the LM head are skipped), takes the last position and projects it to the activation space.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lens_rl.config import ConfigError
from lens_rl.models.configuration import TEXT_MARKER, EncoderConfig, refuse_lora_with_full_training
from lens_rl.models.decoder import _identity_linear
from lens_rl.models.families import embed_tokens
from lens_rl.models.family_check import check_lens_family
from lens_rl.models.hooks import checkpointed_blocks, run_until
from lens_rl.models.lora import check_lora_config, lora_base, lora_parameters


class Encoder(nn.Module):
    """Consistency-lens encoder.

    Attributes:
        base: the causal LM it reads with (own copy, or frozen weights shared with the orig).
        proj: ``d -> d`` projection to the activation space, identity-initialised.
        prompt_left_emb / prompt_right_emb: soft prompt around the text (possibly empty).
    """

    base: PreTrainedModel
    proj: nn.Linear
    prompt_left_emb: nn.Parameter
    prompt_right_emb: nn.Parameter

    def __init__(
        self, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: EncoderConfig
    ) -> None:
        super().__init__()
        self.config = config
        if config.lora:  # adapters on a structural copy sharing every weight (no deep copy)
            base = lora_base(base, config.lora, "encoder.lora")
        self.base = base.train(False)
        n = check_lens_family(base).n_layers  # raises on unsupported architectures
        if not -n <= config.output_layer < n:
            raise ConfigError(
                f"EncoderConfig.output_layer={config.output_layer} is out of range for {n} blocks."
            )
        emb = base.get_input_embeddings().weight
        self.proj = _identity_linear(emb.shape[1]).to(emb.dtype)
        left, right = config.prompt.split(TEXT_MARKER) if config.prompt else ("", "")
        ids_l = tokenizer(left, add_special_tokens=False)["input_ids"] if left else []
        ids_r = tokenizer(right, add_special_tokens=False)["input_ids"] if right else []
        with torch.no_grad():  # what the model's embedding module returns (Gemma: scaled)
            emb_l = embed_tokens(base, torch.tensor(ids_l, dtype=torch.long, device=emb.device))
            emb_r = embed_tokens(base, torch.tensor(ids_r, dtype=torch.long, device=emb.device))
        self.prompt_left_emb = nn.Parameter(emb_l.detach().clone())
        self.prompt_right_emb = nn.Parameter(emb_r.detach().clone())
        for p in self.base.parameters():
            p.requires_grad_(config.trainable_base)
        for p in lora_parameters(self.base):
            p.requires_grad_(True)
        self.frozen_unused: list[str] = []  # base parameters left frozen because no gradient reaches them
        self.checkpointing: dict | None = (
            None  # block checkpointing (ConsistencyLens.gradient_checkpointing_enable)
        )
        if config.trainable_base or config.lora:
            self._freeze_unused_base()
        self.proj.requires_grad_(config.trainable_projection)
        self.prompt_left_emb.requires_grad_(config.trainable_prompt)
        self.prompt_right_emb.requires_grad_(config.trainable_prompt)

    def _freeze_unused_base(self) -> None:
        """Keep trainable only the base parameters the encoder's forward reaches.

        The encoder reads inputs_embeds (not token ids, unless ``add_current_token``) and stops
        after ``output_layer``, so the embedding table, later blocks, the final norm and the LM
        head never receive a gradient. Left trainable, they break DDP ("parameters that did not
        receive grad") and fill checkpoints with untouched copies. The set is found with one tiny
        forward and ``autograd.grad(allow_unused=True)`` rather than a per-family table, so it is
        right for every architecture the block lookup supports.
        """
        params = [(n, p) for n, p in self.base.named_parameters() if p.requires_grad]
        emb = self.base.get_input_embeddings().weight
        x = torch.zeros(1, 2, emb.shape[1], dtype=emb.dtype, device=emb.device)
        cur = torch.zeros(1, dtype=torch.long, device=emb.device)
        with torch.enable_grad():
            out = self.forward(x, current_token_ids=cur if self.config.add_current_token else None)
            grads = torch.autograd.grad(out.sum(), [p for _, p in params], allow_unused=True)
        self.frozen_unused = [n for (n, p), g in zip(params, grads, strict=True) if g is None]
        for (_, p), g in zip(params, grads, strict=True):
            if g is None:
                p.requires_grad_(False)

    @classmethod
    def from_base(
        cls,
        base: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: EncoderConfig,
        share_weights: bool = False,
    ) -> Encoder:
        """Build on a deep copy of ``base`` or (``share_weights``, frozen base only) on ``base`` itself;
        with ``config.lora`` never on a copy (the adapters go on a structural copy sharing the weights)."""
        if share_weights and config.trainable_base:
            raise ConfigError("share_weights=True needs EncoderConfig.trainable_base=False.")
        return cls(base if share_weights or config.lora else copy.deepcopy(base), tokenizer, config)

    def enable_lora(self, lora: dict, where: str = "peft_config") -> None:
        """Add LoRA adapters to a built encoder (e.g. an SFT lens that trained without them)."""
        if self.config.lora:
            raise ConfigError(
                f"{where}: the encoder already has LoRA adapters ({self.config.lora}); leave {where} unset "
                "to go on training them."
            )
        lora = check_lora_config(lora, where)
        refuse_lora_with_full_training(lora, self.config, "encoder", ("trainable_base",))
        self.base = lora_base(self.base, lora, where).train(False)
        self.config.lora = lora
        for p in lora_parameters(self.base):
            p.requires_grad_(True)
        self._freeze_unused_base()

    def train(self, mode: bool = True) -> Encoder:
        """Train mode for the lens parts; the base keeps dropout off."""
        super().train(mode)
        self.base.train(False)
        return self

    def forward(
        self, embeddings: torch.Tensor, current_token_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Reconstruct ``Â`` ``(B, d)`` from text embeddings ``(B, T, d)``.

        Args:
            embeddings: the decoder's ``generated_text_embeddings`` (or any token embeddings).
            current_token_ids: ``(B,)`` token at A's position; required with ``add_current_token``.
        """
        b = embeddings.shape[0]
        parts = [
            self.prompt_left_emb.unsqueeze(0).expand(b, -1, -1),
            embeddings.to(self.prompt_left_emb.dtype),
            self.prompt_right_emb.unsqueeze(0).expand(b, -1, -1),
        ]
        if self.config.add_current_token:
            if current_token_ids is None:
                raise ValueError("EncoderConfig.add_current_token=True needs current_token_ids (B,).")
            parts.append(embed_tokens(self.base, current_token_ids).unsqueeze(1))
        seq = torch.cat(parts, dim=1)
        if self.checkpointing is not None and torch.is_grad_enabled():
            with checkpointed_blocks(self.base, **self.checkpointing):
                hidden = run_until(self.base, self.config.output_layer, inputs_embeds=seq, use_cache=False)
        else:
            hidden = run_until(self.base, self.config.output_layer, inputs_embeds=seq, use_cache=False)
        return self.proj(hidden[:, -1])
