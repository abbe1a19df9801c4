"""Prompt datasets for text-mode rollouts: a registry of named prompt sources and seeded draws.

A source is ``fn(split) -> list[str]``, registered under a name with
:func:`register_prompt_dataset`; :meth:`SequenceProcessor.sample_prompts
<lens_rl.processing.sequence_processor.SequenceProcessor.sample_prompts>` and the entropy probe's
``prompt_dataset`` read from it. ``pydoc_openings`` (offline, from the Python docs) is built in.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lens_rl.data.corpus import pydoc_topics

PROMPT_DATASETS: dict[str, Callable[[str], list[str]]] = {}


def register_prompt_dataset(name: str):
    """Register ``fn(split) -> list[str]`` as a prompt source for ``sample_prompts``."""

    def deco(fn: Callable[[str], list[str]]):
        PROMPT_DATASETS[name] = fn
        return fn

    return deco


def prompt_pool(dataset_name: str, split: str) -> list[str]:
    """Every prompt of ``split`` of a registered dataset."""
    if dataset_name not in PROMPT_DATASETS:
        raise KeyError(f"Unknown prompt dataset {dataset_name!r}; registered: {sorted(PROMPT_DATASETS)}.")
    return PROMPT_DATASETS[dataset_name](split)


def sample_prompts(dataset_name: str, split: str, num_prompts: int, seed: int) -> list[str]:
    """Draw ``num_prompts`` distinct prompts from a registered dataset with a seeded generator."""
    pool = prompt_pool(dataset_name, split)
    if num_prompts > len(pool):
        raise ValueError(f"{dataset_name}/{split} has {len(pool)} prompts, fewer than {num_prompts}.")
    idx = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:num_prompts]
    return [pool[int(i)] for i in idx]


@register_prompt_dataset("pydoc_openings")
def _pydoc_openings(split: str) -> list[str]:
    """First sentence fragments of the pydoc topics (offline); even topics train, odd test."""
    texts = [t.strip().split("\n")[0][:80] for t in pydoc_topics() if t.strip()]
    texts = [t for t in texts if len(t) > 8]
    return texts[0::2] if split == "train" else texts[1::2]
