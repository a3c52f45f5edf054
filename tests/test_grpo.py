"""Tests of minimal_grpo.py: the standardised advantage, the per-completion mean, the clipped surrogate at
both edges, the clip fraction verl and TRL count and the KL term against hand-worked numbers, the limit where
GRPO is PG, and the file run as a user runs it. (The reference clipped surrogate, k3, the wiring of its main
loop, micro-batches, repeatability and bad flags: test_every_file.py.)"""
import math

import pytest
import torch

import minimal_grpo as grpo
import minimal_pg as pg
from conftest import SHORT, check_two_steps_end_to_end


# ---------------------------------------------------------------------------------------------------------
# Advantage, aggregation, clipping and the KL term against numbers worked out by hand.


def test_grpo_standardised_advantage():
    # r = [1, 0, 0, 0]: mean 0.25, population std sqrt(0.25 * 0.75) = 0.4330127.
    # A_0 = 0.75 / (0.4330127 + 1e-4) = 1.731651;  A_1 = -0.25 / 0.4331127 = -0.577217.
    adv = grpo.group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.3, 0.3, 0.3, 0.3]]))
    assert torch.allclose(adv[0], torch.tensor([1.731651, -0.577217, -0.577217, -0.577217]), atol=1e-5)
    assert torch.equal(adv[1], torch.zeros(4))  # all-equal group: zero, not 0/0
    # the 1/std amplification: a tiny gap gets the same advantages as a large one (up to eps)
    tiny = grpo.group_advantages(torch.tensor([[0.51, 0.5, 0.5, 0.5]]), eps=0.0)
    assert torch.allclose(tiny[0], torch.tensor([1.732051, -0.577350, -0.577350, -0.577350]), atol=1e-4)


def test_aggregation():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert pg.aggregate(per_token, mask, n=2).item() == pytest.approx((3 + 4) / 2)  # sums 3 and 4
    assert grpo.aggregate(per_token, mask, n=2).item() == pytest.approx((1.5 + 4) / 2)  # means 1.5 and 4


def test_grpo_clipped_surrogate_at_both_edges():
    # one token per completion; ratio 1.5 and 0.5, advantage +1 and -1, eps 0.2, no KL.
    # min(rho A, clip(rho) A): (1.5, +1) -> 1.2; (1.5, -1) -> -1.5; (0.5, +1) -> 0.5; (0.5, -1) -> -0.8
    old = torch.zeros(4, 1)
    logp = torch.log(torch.tensor([[1.5], [1.5], [0.5], [0.5]])).requires_grad_()
    adv, mask = torch.tensor([1.0, -1.0, 1.0, -1.0]), torch.ones(4, 1)
    loss, stats = grpo.policy_loss(logp, old, old, adv, mask, clip_eps=0.2, beta=0.0, n=4)
    assert loss.item() == pytest.approx(-(1.2 - 1.5 + 0.5 - 0.8) / 4)
    # every ratio lies outside [0.8, 1.2], but the clip removed the gradient of two tokens only:
    # (1.5, +1) and (0.5, -1). That is what TRL (clip_ratio/region_mean) and verl (pg_clipfrac) count.
    assert stats["clip_frac"].item() == pytest.approx(0.5)
    loss.backward()
    # the clipped side has no gradient; the unclipped side has d(-rho A / 4)/dlogp = -rho A / 4
    assert torch.allclose(logp.grad.view(-1), torch.tensor([0.0, 1.5 / 4, -0.5 / 4, 0.0]))


def verl_pg_clipfrac(ratio, adv, mask, eps_low, eps_high):
    """verl 0.9.1 core_algos.compute_policy_loss_vanilla's pg_clipfrac, restated: the share of tokens
    where the clipped loss term exceeds the unclipped one."""
    pg_losses1 = -adv[:, None] * ratio
    pg_losses2 = -adv[:, None] * ratio.clamp(1 - eps_low, 1 + eps_high)
    return ((pg_losses2 > pg_losses1).float() * mask).sum() / mask.sum()


def test_grpo_clip_frac_is_what_verl_and_trl_count():
    # random ratios up to about 3, both signs of advantage, a zero advantage, ragged masks: the logged
    # clip_frac equals verl's pg_clipfrac, and equals the share of tokens left with no gradient
    torch.manual_seed(0)
    old = torch.randn(16, 12)
    logp = (old + 0.5 * torch.randn(16, 12)).requires_grad_()
    adv = torch.randn(16)
    adv[3] = 0.0
    mask = (torch.rand(16, 12) < 0.8).float()
    loss, stats = grpo.policy_loss(logp, old, old, adv, mask, clip_eps=0.2, beta=0.0, n=16)
    ratio = torch.exp(logp.detach() - old)
    expected = verl_pg_clipfrac(ratio, adv, mask, 0.2, 0.2)
    assert 0.1 < expected < 0.5 and stats["clip_frac"].item() == pytest.approx(expected.item(), abs=1e-7)
    outside = (((ratio - 1).abs() > 0.2).float() * mask).sum() / mask.sum()
    assert outside > expected + 0.1  # the old count, every ratio outside the band, reads much higher
    loss.backward()
    no_grad = ((logp.grad == 0) & (adv[:, None] != 0)).float()
    assert stats["clip_frac"].item() == pytest.approx(((no_grad * mask).sum() / mask.sum()).item(), abs=1e-7)


def test_grpo_kl_term_enters_the_loss():
    logp = torch.zeros(1, 2, requires_grad=True)
    ref = torch.full((1, 2), math.log(0.5))  # k3 = exp(log .5) - log .5 - 1 = 0.193147 per token
    loss, stats = grpo.policy_loss(logp, logp.detach(), ref, torch.zeros(1), torch.ones(1, 2), 0.2, beta=0.1, n=1)
    assert loss.item() == pytest.approx(0.1 * 0.193147, abs=1e-6)
    assert stats["kl"].item() == pytest.approx(0.193147, abs=1e-6)


def test_grpo_equals_pg_in_the_limit():
    """The limit: one inner epoch (rho = 1, so the clip is inactive), beta = 0, one group and every
    completion of the same length L. Then GRPO's gradient is PG's times the constant
    c = (G - 1) / (G * (std + eps) * L): the same direction, so the same Adam step up to Adam's eps."""
    g, length = 4, 5
    rewards = torch.tensor([[1.0, 0.2, 0.6, 0.0]])
    logp_pg = torch.randn(g, length).requires_grad_()
    logp_grpo = logp_pg.detach().clone().requires_grad_()
    mask = torch.ones(g, length)
    pg.policy_loss(logp_pg, logp_pg.detach(), pg.group_advantages(rewards).view(-1), mask, g)[0].backward()
    grpo.policy_loss(logp_grpo, logp_grpo.detach(), logp_grpo.detach(), grpo.group_advantages(rewards).view(-1),
                     mask, clip_eps=0.2, beta=0.0, n=g)[0].backward()
    std = rewards.std(unbiased=False).item()
    c = (g - 1) / (g * (std + 1e-4) * length)
    assert torch.allclose(logp_grpo.grad, c * logp_pg.grad, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------
# The file as a user runs it.


def test_two_steps_end_to_end(short_run):
    check_two_steps_end_to_end(short_run("minimal_grpo.py", *SHORT["grpo"]))
