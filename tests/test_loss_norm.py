"""lens_rl.training.loss_norm.aggregate_loss equals TRL 1.16's ``GRPOTrainer._compute_loss``.

TRL's real ``_compute_loss`` runs unbound on a minimal trainer state: the per-token log-probs
come from a stand-in for the model forward, the accelerator is one process's identity
gather/reduce (``num_processes`` is what the normaliser reads). With ``old_per_token_logps``
absent the ratio is 1 and, given ``(B, T)`` advantages, TRL's per-token loss is an arbitrary
``(B, T)`` tensor we know: ``-A`` (grpo family, luspo), ``-A log p`` (cispo), ``-(4 / (2 tau)) A``
with ``tau = 2`` (sapo) and ``-phi A log p`` (vespo, phi from TRL's own ``get_gamma_weights``).
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl.trainer.grpo_trainer import GRPOTrainer

from lens_rl.training.loss_norm import LOSS_TYPES, aggregate_loss


class _OneProcess:
    def __init__(self, num_processes: int) -> None:
        self.num_processes = num_processes
        self.sync_gradients = True

    def gather(self, x):
        return x.reshape(-1) if x.dim() == 0 else x

    def reduce(self, x, reduction="sum"):
        return x


def _trl_loss(loss_type, logps, adv, mask, *, t_max, n_items, procs, accum, spg, training):
    args = SimpleNamespace(
        delta=None,
        steps_per_generation=spg,
        sapo_temperature_pos=2.0,
        sapo_temperature_neg=2.0,
        vespo_k_pos=2.0,
        vespo_lambda_pos=3.0,
        vespo_k_neg=3.0,
        vespo_lambda_neg=2.0,
        use_bias_correction_kl=False,
    )
    me = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=0.0,
        loss_type=loss_type,
        epsilon_low=0.2,
        epsilon_high=0.28 if loss_type != "cispo" else 5.0,
        args=args,
        use_vllm=False,
        model=SimpleNamespace(training=training),
        current_gradient_accumulation_steps=accum,
        accelerator=_OneProcess(procs),
        max_completion_length=t_max,
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        get_gamma_weights=GRPOTrainer.get_gamma_weights,
    )
    b, t = mask.shape
    inputs = {
        "prompt_ids": torch.zeros(b, 1, dtype=torch.long),
        "prompt_mask": torch.ones(b, 1, dtype=torch.long),
        "completion_ids": torch.zeros(b, t, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "num_items_in_batch": torch.tensor(float(n_items)),
    }
    return GRPOTrainer._compute_loss(me, None, inputs)


def _per_token_loss(loss_type, logps, adv, mask):
    if loss_type in ("cispo",):
        return -adv * logps
    if loss_type == "vespo":
        phi = GRPOTrainer.get_gamma_weights(
            advantages=adv,
            log_ratio_per_token=torch.zeros_like(logps),
            mask=mask,
            importance_sampling_ratio=None,
            k_pos=2.0,
            lambda_pos=3.0,
            k_neg=3.0,
            lambda_neg=2.0,
        )
        return -phi * adv * logps
    return -adv.expand_as(logps)  # grpo family, luspo, sapo (4 / (2 tau) = 1 at tau = 2)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize(
    ("procs", "accum", "spg", "training"), [(1, 1, 1, True), (2, 4, 2, True), (3, 2, 4, False)]
)
def test_aggregate_loss_equals_trl(loss_type, procs, accum, spg, training):
    gen = torch.Generator().manual_seed(0)
    b, t = 6, 5
    logps = -torch.rand(b, t, generator=gen, dtype=torch.float64) * 3
    adv = torch.randn(b, t, generator=gen, dtype=torch.float64)
    mask = (torch.rand(b, t, generator=gen) < 0.7).long()
    mask[0] = 0  # an empty completion: every clamp(min=1) matters
    kw = dict(t_max=7, n_items=int(mask.sum()) * procs * spg + 3, procs=procs, accum=accum, spg=spg)
    expected = _trl_loss(loss_type, logps, adv, mask, training=training, **kw)
    got = aggregate_loss(
        _per_token_loss(loss_type, logps, adv, mask),
        mask,
        loss_type,
        max_completion_length=7,
        num_items_in_batch=kw["n_items"],
        num_processes=procs,
        gradient_accumulation_steps=accum,
        steps_per_generation=spg,
        training=training,
    )
    torch.testing.assert_close(got.loss, expected, rtol=1e-12, atol=0)
    assert got.loss != 0


def test_aggregate_loss_errors():
    x, m = torch.ones(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        aggregate_loss(x, m, "dapo", max_completion_length=3)
    with pytest.raises(ValueError, match="Unknown loss_type 'ppo'"):
        aggregate_loss(x, m, "ppo", max_completion_length=3)
