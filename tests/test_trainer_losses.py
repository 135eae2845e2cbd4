"""Loss functions against hand-computed numbers, and the exact reduction of Mix-PPG to PPO/GRPO."""

import math

import numpy as np
import pytest
import torch

from sponge.groups import group_advantages
from sponge.trainer import losses as L

torch.set_num_threads(1)


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


def test_group_advantages_hand_computed():
    rewards = np.array([1, 0, 0, 0, 1, 1], dtype=np.float32)
    groups = np.array([7, 7, 7, 7, 3, 3])
    adv = group_advantages(rewards, groups)
    # group 7: mean 0.25, population std sqrt(0.1875) = 0.4330
    std = math.sqrt(0.1875)
    assert adv[:4].tolist() == pytest.approx([0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std], rel=1e-5)
    # group 3 has no reward variance: zero advantage, no division by zero
    assert adv[4:].tolist() == [0.0, 0.0]
    centred = group_advantages(rewards, groups, scale=False)
    assert centred.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25, 0, 0])


def test_ppo_clip_loss_hand_computed():
    logp_old = torch.zeros(4, 1)
    logp = torch.log(t(1.5, 1.5, 0.5, 0.5))[:, None]
    adv = t(1, -1, 1, -1)
    mask = torch.ones(4, 1)
    loss = L.ppo_clip_loss(logp, logp_old, adv, mask, clip_eps=0.2)[:, 0]
    # r=1.5,A=+1: min(1.5,1.2)=1.2 ; r=1.5,A=-1: min(-1.5,-1.2)=-1.5
    # r=0.5,A=+1: min(0.5,0.8)=0.5 ; r=0.5,A=-1: min(-0.5,-0.8)=-0.8 ; loss = -surrogate
    assert loss.tolist() == pytest.approx([-1.2, 1.5, -0.5, 0.8], rel=1e-5)


def test_mix_ppg_clip_centred_at_current_over_behaviour():
    # behaviour π_{k-i} = 0.5, current π_k = 0.6 → centre c = 1.2, clip range [1.0, 1.4]
    logp_b = torch.log(torch.full((4, 1), 0.5))
    logp_k = torch.log(torch.full((4, 1), 0.6))
    logp = torch.log(t(0.75, 0.75, 0.45, 0.45))[:, None]  # r = 1.5, 1.5, 0.9, 0.9
    adv = t(1, -1, 1, -1)
    loss = L.mix_ppg_loss(logp, logp_b, logp_k, adv, torch.ones(4, 1), clip_eps=0.2)[:, 0]
    # r=1.5: A=+1 → min(1.5, 1.4) = 1.4 ; A=-1 → min(-1.5, -1.4) = -1.5
    # r=0.9: A=+1 → min(0.9, 1.0) = 0.9 ; A=-1 → min(-0.9, -1.0) = -1.0
    assert loss.tolist() == pytest.approx([-1.4, 1.5, -0.9, 1.0], rel=1e-5)


def test_mix_ppg_equals_ppo_exactly_for_fresh_samples():
    g = torch.Generator().manual_seed(0)
    logp_old = -torch.rand(6, 5, generator=g) * 3
    logp = (logp_old + torch.randn(6, 5, generator=g) * 0.3).requires_grad_(True)
    adv = torch.randn(6, generator=g)
    mask = (torch.rand(6, 5, generator=g) > 0.2).float()
    ppo = L.aggregate(L.ppo_clip_loss(logp, logp_old, adv, mask, 0.2), mask)
    (g_ppo,) = torch.autograd.grad(ppo, logp)
    mix = L.aggregate(L.mix_ppg_loss(logp, logp_old, logp_old, adv, mask, 0.2), mask)
    (g_mix,) = torch.autograd.grad(mix, logp)
    assert torch.equal(ppo, mix)
    assert torch.equal(g_ppo, g_mix)
    # per-token advantages (PPO with GAE) too
    adv_tok = torch.randn(6, 5, generator=g)
    assert torch.equal(L.ppo_clip_loss(logp, logp_old, adv_tok, mask),
                       L.mix_ppg_loss(logp, logp_old, logp_old, adv_tok, mask))


def test_kl_k3_and_kl_convex_hand_computed():
    logp = torch.log(t(0.5))[:, None]
    ref = torch.log(t(0.25))[:, None]
    mask = torch.ones(1, 1)
    # x = log(0.25/0.5) = -log 2: e^x - x - 1 = 0.5 + log 2 - 1
    k3 = 0.5 + math.log(2) - 1
    assert L.kl_k3(logp, ref, mask).item() == pytest.approx(k3, rel=1e-6)
    assert L.kl_k3(logp, logp, mask).item() == 0.0
    # λ = 0.7 toward base (=ref), 0.3 toward prev (= logp itself → 0)
    assert L.kl_convex(logp, ref, logp, mask, 0.7).item() == pytest.approx(0.7 * k3, rel=1e-6)
    assert L.kl_k3(logp, ref, torch.zeros(1, 1)).item() == 0.0


@pytest.mark.parametrize("step,expected", [
    (0, 1.0), (50, 1.0), (51, 0.9), (60, 0.9), (61, 0.8), (70, 0.8), (90, 0.6), (91, 0.5),
    (100, 0.5), (101, 0.5), (1000, 0.5),
])
def test_lambda_schedule_published_values(step, expected):
    assert L.kl_convex_lambda(step) == pytest.approx(expected)


def test_lambda_schedule_custom_and_bad_input():
    assert L.kl_convex_lambda(12, hold=10, every=1, decrement=0.25, floor=0.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="every"):
        L.kl_convex_lambda(5, every=0)


def test_aggregation_modes_and_weights():
    x = t(1, 2, 0, 3, 0, 0).reshape(2, 3)
    mask = t(1, 1, 0, 1, 0, 0).reshape(2, 3)
    assert L.aggregate(x, mask, "token_mean").item() == pytest.approx(6 / 3)
    assert L.aggregate(x, mask, "seq_mean").item() == pytest.approx((1.5 + 3) / 2)
    w = t(2, 0)
    assert L.aggregate(x, mask, "token_mean", w).item() == pytest.approx(2 * 3 / 3)
    assert L.aggregate(x, mask, "seq_mean", w).item() == pytest.approx(2 * 1.5 / 2)
    with pytest.raises(ValueError, match="aggregation"):
        L.aggregate(x, mask, "sum")


def test_entropy_bonus_is_masked():
    ent = t(0.5, 0.7, 9.0).reshape(1, 3)
    assert L.entropy_bonus(ent, t(1, 1, 0).reshape(1, 3)).tolist() == [[0.5, pytest.approx(0.7), 0.0]]


def test_decoupled_ppo_is_ppo_when_proximal_is_behaviour_and_weights_scale_it():
    g = torch.Generator().manual_seed(1)
    logp_old = -torch.rand(5, 4, generator=g) * 2
    logp = (logp_old + torch.randn(5, 4, generator=g) * 0.3).requires_grad_(True)
    adv, mask = torch.randn(5, generator=g), (torch.rand(5, 4, generator=g) > 0.2).float()
    ones = torch.ones(5, 4)
    assert torch.equal(L.decoupled_ppo_loss(logp, logp_old, ones, adv, mask), L.ppo_clip_loss(logp, logp_old, adv, mask))
    w = torch.rand(5, 4, generator=g) * 2
    assert torch.allclose(L.decoupled_ppo_loss(logp, logp_old, w, adv, mask),
                          w * L.ppo_clip_loss(logp, logp_old, adv, mask))


def test_clip_higher_bounds():
    logp_old = torch.zeros(2, 1)
    logp = torch.log(t(1.5, 0.5))[:, None]
    adv = t(1, -1)
    loss = L.ppo_clip_loss(logp, logp_old, adv, torch.ones(2, 1), clip_eps=0.2, clip_eps_high=0.28)[:, 0]
    # r=1.5, A=+1: min(1.5, 1.28) = 1.28 ; r=0.5, A=-1: min(-0.5, -0.8) = -0.8
    assert loss.tolist() == pytest.approx([-1.28, 0.8], rel=1e-5)
