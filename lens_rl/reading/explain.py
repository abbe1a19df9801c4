"""Read a lens: explain the activations of text (the computation behind ``lens-rl explain``).

For every chosen position ``p`` of a text, ``A`` (the residual stream after block ``layer`` at
``p``) is decoded ``k`` times (the KV-cached rollout generator, one seeded generator per
text), each explanation is encoded back to ``Â``, and the samples are ranked by
reconstruction (best-of-``k``, as the original's analysis tools do). Scores per sample (float64,
from :func:`lens_rl.metrics.reconstruct`):

- ``rel_error``: ``||Â - A||² / ||A - mean||²`` with the lens's training mean (the per-sample
  term of the evaluation's FVE); ``fve = 1 - rel_error``;
- ``nmse``: ``mean((Â - A)²) / mean(train variance)`` (the training loss's normalisation);
- ``kl``: KL(P(next | A) || P(next | Â)) of the orig model at ``p`` (functional KL).

Both scores normalise by the statistics of the lens's training split (``train_mean`` and
``train_var`` in its sidecar's ``meta``, checked against the base's hidden size). A lens saved
without them (older versions) is refused, naming the file and how to record them: a fallback on
the explained activations' own mean made the scores depend on which positions were asked.

:func:`explain` (text) and :func:`explain_ids` (token ids) return an
:class:`~lens_rl.reading.results.Explanations`; its page is :mod:`lens_rl.reading.page`.
``lens-rl explain`` is :mod:`lens_rl.cli.explain`; the training stages' end-of-run report
(held-out windows) is :mod:`lens_rl.training.reports`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lens_rl.metrics import functional_kl, reconstruct
from lens_rl.models.hooks import run_until
from lens_rl.models.lens import LENS_CONFIG, activation_stats
from lens_rl.models.orig import OrigWrapper
from lens_rl.reading.results import Explanations, parse_positions
from lens_rl.utils.progress import progress_bar


def _stats(lens, acts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(mean, variance) of the lens's training split, as it records them (checked: see
    :func:`~lens_rl.models.lens.activation_stats`), and the name of that normaliser.

    Raises:
        ValueError: the lens records no statistics (naming its sidecar and how to add them), or
            records values that cannot be right.
    """
    source = getattr(lens, "source_dir", None)
    where = f"{source}/{LENS_CONFIG}" if source is not None else "the lens's lens_config"
    stats = activation_stats(lens.lens_config, acts[0].shape[-1], where)
    if stats is None:
        raise ValueError(
            f"{where} records no activation statistics (meta.train_mean and meta.train_var: a lens "
            "saved by an older lens_rl lacks them); FVE and NMSE are normalised by them. Record "
            "those of the lens's training split and save the lens again: `from lens_rl.data.dataset "
            "import ActivationDataset; d = ActivationDataset(TRAIN_SPLIT_DIR); lens.lens_config.train_mean "
            "= d.mean.tolist(); lens.lens_config.train_var = d.var.tolist(); lens.save_pretrained(LENS_DIR)`, "
            "or train the lens again."
        )
    return stats[0], stats[1], "train_mean"


@torch.no_grad()
def explain_ids(
    lens,
    orig,
    tokenizer,
    ids_list: Sequence[torch.Tensor],
    positions: str | int | Sequence[int] | Sequence[Any] = "all",
    *,
    k: int = 8,
    layer: int | None = None,
    t_text: int | None = None,
    policy=None,
    seed: int = 0,
    batch_size: int = 64,
    max_kl_tokens: int = 8192,
    show_progress: bool = False,
) -> Explanations:
    """:func:`explain` on token ids (one 1-D tensor per text). ``positions`` applies to every
    text, or is a list with one spec per text. ``batch_size`` rows (positions x ``k``) go
    through the decoder at once; the functional KL passes take at most ``max_kl_tokens`` tokens
    each (they compute full-vocabulary logits)."""
    layer = lens.lens_config.layer if layer is None else layer
    t_text = lens.lens_config.t_text if t_text is None else t_text
    if layer is None:
        raise ValueError("The lens records no layer; pass layer= (the block whose output A is).")
    if t_text is None:
        raise ValueError("The lens records no t_text; pass t_text= (explanation length in tokens).")
    if k < 1:
        raise ValueError(f"k (samples per position) must be >= 1, got {k}.")
    if t_text < 1:
        raise ValueError(f"t_text (explanation length in tokens) must be >= 1, got {t_text}.")
    per_text = (
        list(positions)
        if isinstance(positions, list | tuple) and positions and isinstance(positions[0], list | tuple | str)
        else [positions] * len(ids_list)
    )
    if len(per_text) != len(ids_list):
        raise ValueError(f"{len(per_text)} position specs for {len(ids_list)} texts.")
    device = next(lens.parameters()).device
    dtype = next(lens.decoder.parameters()).dtype
    was_training = lens.training
    lens.eval()
    try:
        orig.to(device)
        texts_pos: list[tuple[torch.Tensor, list[int], torch.Tensor]] = []
        for i, (ids, spec) in enumerate(zip(ids_list, per_text, strict=True)):
            ids = torch.as_tensor(ids, dtype=torch.long, device=device).reshape(-1)
            pos = parse_positions(spec, ids.numel(), where=f"text {i}")
            hidden = run_until(orig.model, layer, input_ids=ids[None], use_cache=False)[0]  # (S, d)
            texts_pos.append((ids, pos, hidden[pos].to(dtype)))
        mean, var, normaliser = _stats(lens, [a.cpu() for _, _, a in texts_pos])
        mean, var = mean.to(device), var.to(device)
        chunk = max(1, batch_size // k)
        rows: list[dict[str, Any]] = []
        total = sum(len(p) for _, p, _ in texts_pos)
        with progress_bar("explaining", total, enabled=show_progress) as advance:
            for ti, (ids, pos, acts) in enumerate(texts_pos):
                g = torch.Generator(device).manual_seed(seed + 100_003 * ti)
                for c0 in range(0, len(pos), chunk):
                    p = torch.tensor(pos[c0 : c0 + chunk], device=device)
                    a = acts[c0 : c0 + chunk]  # (c, d)
                    gen = lens.decoder.generate_soft_kv_cached_nondiff(
                        a, t_text, generator=g, policy=policy, num_samples=k, return_logits=False
                    )  # rows b * k + j
                    p_rep = p.repeat_interleave(k)
                    a_hat = lens.encoder(
                        gen.generated_text_embeddings, current_token_ids=ids[p_rep]
                    )  # (c*k, d)
                    scores = reconstruct(a_hat, a.repeat_interleave(k, 0), train_mean=mean, train_var=var)
                    rel, nmse = scores.rel_error, scores.nmse  # (c*k,) float64
                    # KL rows in groups of <= max_kl_tokens tokens of context (full-vocabulary logits)
                    ctx = int(p.max()) + 1
                    step = max(1, max_kl_tokens // ctx)
                    kl = torch.cat(
                        [
                            functional_kl(
                                orig,
                                {"input_ids": ids[None, :ctx].expand(len(sel), -1), "token_pos": p_rep[sel]},
                                layer,
                                a_hat[sel].to(dtype),
                            ).double()
                            for sel in torch.arange(p_rep.numel(), device=device).split(step)
                        ]
                    )
                    for b, position in enumerate(p.tolist()):
                        samples = []
                        for j in range(k):
                            r = b * k + j
                            samples.append(
                                {
                                    "explanation": tokenizer.decode(gen.hard_token_ids[r]),
                                    "token_ids": gen.hard_token_ids[r].tolist(),
                                    "rel_error": float(rel[r]),
                                    "fve": float(1 - rel[r]),
                                    "nmse": float(nmse[r]),
                                    "kl": float(kl[r]),
                                }
                            )
                        samples.sort(key=lambda s: s["rel_error"])
                        best = samples[0]
                        rows.append(
                            {
                                "text_index": ti,
                                "position": position,
                                "token": tokenizer.decode(ids[position : position + 1]),
                                "token_id": int(ids[position]),
                                "context": tokenizer.decode(ids[max(0, position - 15) : position]),
                                **best,
                                "normaliser": normaliser,
                                "samples": samples,
                            }
                        )
                    advance(int(p.numel()))
    finally:
        lens.train(was_training)
    tokens = [[tokenizer.decode(ids[i : i + 1]) for i in range(ids.numel())] for ids, _, _ in texts_pos]
    info = {"layer": layer, "t_text": t_text, "k": k, "seed": seed, "normaliser": normaliser}
    if policy is not None:
        info["policy"] = {n: getattr(policy, n) for n in ("temperature", "top_k", "top_p", "min_p")}
    return Explanations(rows, tokens, info)


def explain(
    lens,
    texts: str | Sequence[str],
    *,
    positions: str | int | Sequence[int] = "all",
    k: int = 8,
    orig=None,
    tokenizer=None,
    max_length: int | None = None,
    **kwargs: Any,
) -> Explanations:
    """Explain the activations of ``texts`` at ``positions`` with ``k`` samples each.

    Args:
        lens: a :class:`~lens_rl.models.lens.ConsistencyLens` (built or loaded: it knows its
            base model, tokenizer, layer and ``t_text``).
        texts: a string or a list of strings, tokenised without special tokens (as the
            activation dumps are).
        positions: ``"all"``, ``"last"``, token indices (negative from the end), or
            ``"i,j,..."``.
        k: samples per position; the best by reconstruction is the row's ``explanation``.
        orig: the frozen original model (default: an :class:`OrigWrapper` on the lens's base).
        tokenizer: default: the lens's.
        max_length: keep only the first ``max_length`` (>= 1) tokens of each text; None: all.
        kwargs: ``layer``, ``t_text``, ``policy`` (:class:`~lens_rl.ops.sampling.SamplingPolicy`),
            ``seed``, ``batch_size``, ``show_progress`` (see :func:`explain_ids`).
    """
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1 (None: no cap), got {max_length}.")
    if isinstance(texts, str):
        texts = [texts]
    tokenizer = tokenizer if tokenizer is not None else getattr(lens, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("This lens carries no tokenizer (it was not built or loaded here); pass tokenizer=.")
    if orig is None:
        base = getattr(lens, "base_model", None)
        if base is None:
            raise ValueError("This lens carries no base model; pass orig=OrigWrapper(base).")
        orig = OrigWrapper(base)
    ids_list = []
    for i, t in enumerate(texts):
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"text {i} ({t!r}) has no tokens; nothing to explain.")
        ids_list.append(torch.tensor(ids if max_length is None else ids[:max_length]))
    return explain_ids(lens, orig, tokenizer, ids_list, positions, k=k, **kwargs)
