"""Token windows and activation positions, shared by the dumper and the on-the-fly dataset.

A corpus is tokenised once, documents are joined with EOS and cut into non-overlapping
windows of ``seq_len`` tokens. Windows are shuffled with a seeded generator; the first
``num_val`` become the validation split and the next ``num_train`` the training split. Each
window gets a position ``P`` (where ``A`` is read) and the index ``A'`` of another window of
the same split (the "different context" of the resample-ablation trick). Everything is a pure
function of the seed, so every process and every resumed run sees the same samples.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

PositionStrategy = Literal["random", "last", "midpoint"]


@dataclass
class WindowSet:
    """One split: ``input_ids`` ``(N, S)``, ``token_pos`` ``(N,)``, ``a_prime_index`` ``(N,)``."""

    input_ids: torch.Tensor
    token_pos: torch.Tensor
    a_prime_index: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def tokenize_corpus(
    texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, batch_size: int = 256
) -> torch.Tensor:
    """Tokenise documents once and join them with EOS into one 1-D stream of token ids."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("The tokenizer has no eos_token_id; it is needed to separate documents.")
    stream: list[int] = []
    batch: list[str] = []

    def flush() -> None:
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            stream.append(eos)
        batch.clear()

    for text in texts:
        if text and text.strip():
            batch.append(text)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    return torch.tensor(stream, dtype=torch.long)


def sample_positions(
    n: int, seq_len: int, min_pos: int, strategy: PositionStrategy, generator: torch.Generator
) -> torch.Tensor:
    """Positions ``P`` in ``[min_pos, seq_len - 1]`` (``A`` is read after token ``P``)."""
    if not 0 <= min_pos < seq_len:
        raise ValueError(f"min_pos must be in [0, seq_len) = [0, {seq_len}), got {min_pos}.")
    if strategy == "random":
        return torch.randint(min_pos, seq_len, (n,), generator=generator)
    if strategy == "last":
        return torch.full((n,), seq_len - 1, dtype=torch.long)
    if strategy == "midpoint":
        return torch.full((n,), (min_pos + seq_len - 1) // 2, dtype=torch.long)
    raise ValueError(f"Unknown position strategy {strategy!r}; choose random, last or midpoint.")


def a_prime_indices(n: int, generator: torch.Generator) -> torch.Tensor:
    """For each sample, another sample of the same split (never itself when ``n > 1``)."""
    if n < 2:
        return torch.zeros(n, dtype=torch.long)
    offsets = torch.randint(1, n, (n,), generator=generator)
    return (torch.arange(n) + offsets) % n


def build_windows(
    stream: torch.Tensor,
    seq_len: int,
    num_train: int,
    num_val: int,
    *,
    min_pos: int,
    strategy: PositionStrategy,
    seed: int,
) -> dict[str, WindowSet]:
    """Cut ``stream`` into windows and return the ``train`` and ``val`` splits.

    Raises:
        ValueError: when the corpus is too small for the requested counts (the message gives
            how many windows it has).
    """
    n_windows = stream.numel() // seq_len
    if n_windows < num_train + num_val:
        raise ValueError(
            f"The corpus gives {n_windows} windows of {seq_len} tokens, fewer than num_train + num_val = "
            f"{num_train} + {num_val}. Use a larger corpus, a shorter seq_len or fewer samples."
        )
    windows = stream[: n_windows * seq_len].view(n_windows, seq_len)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_windows, generator=g)
    out = {}
    for split, idx in (("val", order[:num_val]), ("train", order[num_val : num_val + num_train])):
        out[split] = WindowSet(
            input_ids=windows[idx].clone(),
            token_pos=sample_positions(len(idx), seq_len, min_pos, strategy, g),
            a_prime_index=a_prime_indices(len(idx), g),
        )
    return out
