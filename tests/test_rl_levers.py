"""The RL levers of the GRPO stage (issue #26): reward variants, the beta-KL reference, zero-variance
group filtering, and the co-trained encoder's rollouts and learning rate.

Each test recomputes what the lever should do by another code path than the trainer's (torch's
``cosine_similarity``, ``SamplingPolicy.log_probs`` on a copy of the starting decoder, argmax of
the logged rewards) and checks the trainer's inputs to TRL's loss against it.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import load_file

from lens_rl.config import ConfigError
from lens_rl.metrics import reconstruct
from lens_rl.models.families import embed_tokens
from lens_rl.models.lens import ConsistencyLens
from lens_rl.testing.configs import tiny_grpo_config
from lens_rl.training.grpo_trainer import LensGRPOTrainer
from lens_rl.training.rewards import best_of_group, reward_from_reconstruction, zero_std_groups
from lens_rl.training.rl_stage import run_rl

T_TEXT = 4
GROUP = 4


def _config(tmp_path, model_dir, dump, **kw):
    fixed = dict(t_text=T_TEXT, max_steps=-1, logging_steps=10, disable_tqdm=None)
    return tiny_grpo_config(model_dir, dump, tmp_path, **(fixed | kw))


def _trainer(grpo_parts, cfg, reward_funcs=None) -> LensGRPOTrainer:
    tok, orig, store = grpo_parts
    torch.manual_seed(0)  # the fresh lens's initialisation only
    lens = ConsistencyLens.build(orig.model, tok, cfg.decoder_config, cfg.encoder_config, share_base=True)
    return LensGRPOTrainer(cfg, lens, orig, tok, store, reward_funcs=reward_funcs)


def _rollout(trainer: LensGRPOTrainer, groups: int = 2) -> tuple[list[int], dict]:
    """One generation batch of ``groups`` activations x 4 rollouts (TRL's layout)."""
    index = [3 * (i // GROUP) + 1 for i in range(groups * GROUP)]
    trainer.model.train()
    return index, trainer._generate_and_score_completions([{"prompt": "p", "index": i} for i in index])


def _a_hat(trainer: LensGRPOTrainer, index: list[int], ids: torch.Tensor) -> torch.Tensor:
    lens, store = trainer.lens, trainer.store
    idx = torch.tensor(index)
    cur = store.input_ids[idx, store.token_pos[idx]].long()
    with torch.no_grad():
        return lens.encoder(embed_tokens(lens.decoder.base, ids), current_token_ids=cur)


def test_reward_variants_on_known_vectors():
    """Hand-computed values: A = (3, 4) - mu, with mu = (1, 1)."""
    mu = torch.tensor([1.0, 1.0])
    a = torch.tensor([[4.0, 5.0], [4.0, 5.0], [4.0, 5.0]])  # A - mu = (3, 4)
    a_hat = torch.tensor([[4.0, 5.0], [-3.0, 5.0], [7.0, 9.0]])
    # row 1: Â - mu = (-4, 4): cos = (-12 + 16) / (5 * sqrt(32)); row 2: (6, 8), same direction
    var_mean = 2.0
    nmse = torch.tensor([0.0, (49 + 0) / 2 / var_mean, (9 + 16) / 2 / var_mean])
    cos1 = 4 / (5 * math.sqrt(32))
    r = reward_from_reconstruction(a_hat, a, var_mean, mu, "nmse")
    assert torch.allclose(r, -nmse)
    r = reward_from_reconstruction(a_hat, a, var_mean, mu, "direction")
    assert torch.allclose(r, torch.tensor([0.0, -2 * (1 - cos1), 0.0]), atol=1e-6)
    r = reward_from_reconstruction(a_hat, a, var_mean, mu, "log_nmse")
    assert r[0] == -math.log(1e-8)  # a perfect row is floored, not infinite
    assert torch.allclose(r[1:], -torch.log(nmse[1:]))
    with pytest.raises(ValueError, match="needs train_mean"):
        reward_from_reconstruction(a_hat, a, var_mean, None, "direction")
    with pytest.raises(ValueError, match="reward_type must be one of"):
        reward_from_reconstruction(a_hat, a, var_mean, mu, "mse")  # type: ignore[arg-type]


def test_best_of_group_and_zero_std_groups():
    r = torch.tensor([[0.1, 0.3, 0.3, -1.0], [float("nan"), -2.0, float("nan"), -3.0], [0.5] * 4])
    best = best_of_group(r)
    assert best.tolist() == [[0, 1, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]]  # first on ties; NaN never best
    assert best_of_group(torch.full((1, 3), float("nan"))).sum() == 0
    std = torch.tensor([[0.2], [0.7], [0.0]]).expand(3, 4)
    flat = zero_std_groups(std, r)
    assert flat[:, 0].tolist() == [False, False, True]
    one = torch.tensor([[float("nan"), 1.0, float("nan"), float("nan")]])
    assert zero_std_groups(torch.full((1, 4), float("nan")), one).all()  # one scorable reward: no signal


@pytest.mark.parametrize("reward_type", ["direction", "log_nmse"])
def test_trainer_rewards_follow_reward_type(grpo_parts, tmp_path, tiny_model_dir, tiny_dump, reward_type):
    """The rewards TRL's loss sees are the chosen variant of the rollouts' reconstructions,
    recomputed with torch's cosine_similarity / the NMSE formula written out."""
    trainer = _trainer(grpo_parts, _config(tmp_path, tiny_model_dir, tiny_dump, reward_type=reward_type))
    index, out = _rollout(trainer)
    a_hat = _a_hat(trainer, index, out["completion_ids"])
    a, mu = trainer.store.A[torch.tensor(index)].float(), trainer.store.mean.float()
    if reward_type == "direction":
        expected = -2 * (1 - torch.nn.functional.cosine_similarity(a_hat - mu, a - mu, dim=-1))
    else:
        expected = -torch.log(((a_hat - a) ** 2).mean(-1) / trainer.store.var.double().mean().float())
    got = torch.tensor(list(trainer._logs["rewards"]["reconstruction"])[-len(index) :])
    # float32 throughout; measured max difference 2.4e-7 (direction) and 0 (log_nmse), on AVX-512,
    # avx2 and default alike
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert got.std() > 1e-3  # the rollouts differ, so the check is not vacuous


def test_zero_std_groups_are_left_out_of_the_loss(grpo_parts, tmp_path, tiny_model_dir, tiny_dump):
    """A custom reward constant on the first group (the reconstruction reward weighted 0): that
    group's advantages are 0 either way; with the filter its rows leave the completion mask
    and the token count TRL normalises by."""

    def first_group_flat(prompts, completions, completion_ids, index, **kwargs):
        return [
            0.5 if i == index[0] else float(sum(ids)) for i, ids in zip(index, completion_ids, strict=True)
        ]

    outs = {}
    for filt in (False, True):
        cfg = _config(
            tmp_path, tiny_model_dir, tiny_dump, filter_zero_std_groups=filt, reward_weights=[0.0, 1.0]
        )
        trainer = _trainer(grpo_parts, cfg, reward_funcs=[first_group_flat])
        _, outs[filt] = _rollout(trainer)
    for out in outs.values():
        assert torch.all(out["advantages"][:GROUP] == 0) and out["advantages"][GROUP:].abs().sum() > 0
    assert outs[False]["completion_mask"].all()
    assert not outs[True]["completion_mask"][:GROUP].any() and outs[True]["completion_mask"][GROUP:].all()
    assert int(outs[True]["num_items_in_batch"]) == GROUP * T_TEXT
    assert int(outs[False]["num_items_in_batch"]) == 2 * GROUP * T_TEXT


def test_encoder_learns_from_the_best_rollout_of_each_group(grpo_parts, tmp_path, tiny_model_dir, tiny_dump):
    """encoder_rollouts=best: the encoder's rows are each group's highest-reward rollout (argmax
    of the logged rewards), and its loss is their mean NMSE, recomputed here."""
    cfg = _config(tmp_path, tiny_model_dir, tiny_dump, encoder_mse_weight=1.0, encoder_rollouts="best")
    trainer = _trainer(grpo_parts, cfg)
    index, out = _rollout(trainer)
    rewards = torch.tensor(list(trainer._logs["rewards"]["reconstruction"])[-len(index) :]).view(-1, GROUP)
    expected = torch.zeros_like(rewards)
    expected[torch.arange(len(rewards)), rewards.argmax(1)] = 1
    assert torch.equal(out["encoder_rows"], expected.flatten())
    trainer.current_gradient_accumulation_steps = 1
    trainer._compute_loss(trainer.model, out)
    a_hat = _a_hat(trainer, index, out["completion_ids"])
    nmse = reconstruct(a_hat, out["activation"], train_var=trainer.store.var).nmse.float()
    rows = expected.flatten().bool()
    # the trainer's float32 mean of the selected rows vs float64 here: measured relative 1.2e-7
    assert float(trainer._encoder_mse) == pytest.approx(float(nmse[rows].mean()), rel=1e-5)
    assert abs(float(nmse[rows].mean()) - float(nmse.mean())) > 1e-4  # differs from the all-rows mean


def test_initial_policy_reference_is_the_starting_decoder(grpo_parts, tmp_path, tiny_model_dir, tiny_dump):
    """beta_reference=initial_policy: after the decoder moves, the reference log q are those of a
    copy of the decoder taken before it moved (SamplingPolicy.log_probs on its logits), not the
    current ones and not the base LM's."""
    cfg = _config(
        tmp_path,
        tiny_model_dir,
        tiny_dump,
        beta=0.01,
        beta_reference="initial_policy",
        top_p=1.0,
        temperature=1.3,
    )
    trainer = _trainer(grpo_parts, cfg)
    start = copy.deepcopy(trainer.lens)
    g = torch.Generator().manual_seed(1)
    moved = [p for p in trainer.lens.decoder.parameters() if p.requires_grad]
    assert moved
    with torch.no_grad():
        for p in moved:
            p.add_(3e-2 * torch.randn(p.shape, generator=g))
    _, out = _rollout(trainer)
    ids, acts = out["completion_ids"], out["activation"]

    def logq(lens):
        with torch.no_grad():
            logits = lens.decoder.fwd_tokens(acts, ids, scores=False).logits
        return cfg.policy.log_probs(logits).gather(-1, ids[..., None])[..., 0]

    ref = out["ref_per_token_logps"]
    # same decoder, same tokens, float32: measured max difference 9.5e-7 (AVX-512, avx2, default)
    assert torch.allclose(ref, logq(start), atol=1e-5), (ref - logq(start)).abs().max()
    assert (ref - logq(trainer.lens)).abs().max() > 1e-3  # not the moved decoder
    # the live parameters are back after the reference pass (the moved decoder scores as moved)
    live = [p for p in trainer.lens.decoder.parameters() if p.requires_grad]
    assert len(live) == len(moved) and all(p is q for p, q in zip(live, moved, strict=True))


def test_encoder_learning_rate_is_its_own_group(tiny_model_dir, tiny_dump, tmp_path):
    """learning_rate 0 and encoder_learning_rate 1e-2: after 2 steps the decoder's trainable
    tensors are bit-identical to a run that did not train at all, while the encoder's moved."""
    common = dict(max_steps=2, encoder_mse_weight=1.0, learning_rate=0.0, save_strategy="no")
    run_rl(
        tiny_grpo_config(tiny_model_dir, tiny_dump, tmp_path / "enc", encoder_learning_rate=1e-2, **common)
    )
    run_rl(tiny_grpo_config(tiny_model_dir, tiny_dump, tmp_path / "none", **common))
    enc = load_file(str(tmp_path / "enc" / "lens" / "lens.safetensors"))
    none = load_file(str(tmp_path / "none" / "lens" / "lens.safetensors"))
    assert enc.keys() == none.keys()
    dec_keys = [k for k in enc if k.startswith("decoder.")]
    enc_keys = [k for k in enc if k.startswith("encoder.")]
    assert dec_keys and enc_keys
    assert all(torch.equal(enc[k], none[k]) for k in dec_keys)
    assert max(float((enc[k] - none[k]).abs().max()) for k in enc_keys) > 1e-4


def test_optimizer_groups(grpo_parts, tmp_path, tiny_model_dir, tiny_dump):
    cfg = _config(tmp_path, tiny_model_dir, tiny_dump, encoder_mse_weight=1.0, encoder_learning_rate=5e-3)
    trainer = _trainer(grpo_parts, cfg)
    opt = trainer.create_optimizer()
    encoder = {id(p) for p in trainer.lens.encoder.parameters()}
    trainable = [p for p in trainer.lens.parameters() if p.requires_grad]
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted({id(p) for p in trainable})  # each trainable tensor once
    for group in opt.param_groups:
        kinds = {id(p) in encoder for p in group["params"]}
        assert len(kinds) == 1
        assert group["lr"] == (5e-3 if kinds == {True} else cfg.learning_rate)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(encoder_learning_rate=1e-3), "encoder_learning_rate=0.001 needs the encoder to co-train"),
        (dict(encoder_rollouts="best"), "encoder_rollouts='best' needs the encoder to co-train"),
        (dict(beta_reference="initial_policy"), "beta_reference='initial_policy' has no effect with beta=0"),
        (dict(reward_type="mse"), "reward_type must be one of"),
        (dict(encoder_rollouts="worst", encoder_mse_weight=1.0), "encoder_rollouts must be"),
        (dict(beta_reference="sft", beta=0.1, top_p=1.0), "beta_reference must be"),
        (dict(encoder_learning_rate=-1.0, encoder_mse_weight=1.0), "encoder_learning_rate must be >= 0"),
        (
            dict(
                encoder_learning_rate=1e-3,
                encoder_mse_weight=1.0,
                deepspeed={"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}},
            ),
            "DeepSpeed config defines its 'optimizer'",
        ),
    ],
)
def test_levers_refused_where_they_would_do_nothing(tmp_path, tiny_model_dir, tiny_dump, kw, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, tiny_model_dir, tiny_dump, **kw)
