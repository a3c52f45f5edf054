"""Tests of minimal_drgrpo.py: its two changes from GRPO against hand-worked numbers, the limit where Dr.
GRPO and GRPO coincide, and the file run as a user runs it. (Flat groups, the reference clipped surrogate,
k3, wiring, micro-batches, repeatability and bad flags: test_every_file.py.)"""
import pytest
import torch

import minimal_drgrpo as drgrpo
import minimal_grpo as grpo
from conftest import SHARED_KEYS, SHORT


# ---------------------------------------------------------------------------------------------------------
# The two changes, on numbers worked out by hand.


def test_drgrpo_advantage_is_centred_not_scaled():
    # r = [1, 0, 0, 0]: mean 0.25, so A = [0.75, -0.25, -0.25, -0.25] (GRPO: [1.73, -0.58, ...]).
    # r = [0.51, 0.5, 0.5, 0.5]: mean 0.5025, A = [0.0075, -0.0025, ...]: a tiny gap stays tiny,
    # where GRPO's 1/std blows it up to the same [1.73, -0.58, ...] as the large gap.
    adv = drgrpo.group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.51, 0.5, 0.5, 0.5],
                                                [0.3, 0.3, 0.3, 0.3]]))
    assert torch.allclose(adv[0], torch.tensor([0.75, -0.25, -0.25, -0.25]))
    assert torch.allclose(adv[1], torch.tensor([0.0075, -0.0025, -0.0025, -0.0025]), atol=1e-6)
    assert torch.equal(adv[2], torch.zeros(4))  # no signal when the group agrees


def test_drgrpo_constant_length_aggregation():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # token sums 1 + 2 = 3 and 4, each over L_max = 4: (3/4 + 4/4) / 2 = 0.875
    assert drgrpo.aggregate(per_token, mask, max_len=4, n=2).item() == pytest.approx(0.875)
    # GRPO divides by each completion's own length instead: (3/2 + 4/1) / 2 = 2.75
    assert grpo.aggregate(per_token, mask, n=2).item() == pytest.approx(2.75)


def test_drgrpo_every_token_gets_the_same_weight():
    # ratio 1 (first epoch), A = [+1, -1], lengths 2 and 1, L_max = 4, two completions.
    # loss = -(1 * 2 / 4 - 1 * 1 / 4) / 2 = -0.125; d loss / d logp_t = -A_i / (L_max * N) = -A_i / 8
    # for every token, whatever the length of its completion. GRPO: -A_i / (|y_i| * N) = -1/4 and +1/2.
    logp = torch.zeros(2, 2, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, _ = drgrpo.policy_loss(logp, logp.detach(), logp.detach(), torch.tensor([1.0, -1.0]), mask,
                                 clip_eps=0.2, beta=0.0, max_len=4, n=2)
    assert loss.item() == pytest.approx(-0.125)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.125, -0.125], [0.125, 0.0]]))


def test_drgrpo_equals_grpo_in_the_limit():
    """The limit where the two coincide: every completion exactly L_max tokens long (so GRPO's 1/|y_i|
    is Dr. GRPO's 1/L_max), every group's rewards with population std exactly 1 (so GRPO's z-score is
    r - mean(r) divided by 1 + eps), and beta = 0. The clipped surrogate is positively homogeneous in A,
    so GRPO's loss and gradient are Dr. GRPO's divided by (1 + eps): identical with eps = 0, and within
    1e-4 with GRPO's default eps. This holds at any ratio, clipped or not."""
    length = 5
    rewards = torch.tensor([[2.0, 0.0, 2.0, 0.0], [3.0, 1.0, 1.0, 3.0]])  # means 1 and 2, deviations +-1
    assert torch.allclose(rewards.std(1, unbiased=False), torch.ones(2))
    torch.manual_seed(0)
    old = torch.randn(8, length)
    logp_dr = (old + 0.3 * torch.randn(8, length)).requires_grad_()  # ratios spread across the clip band
    logp_grpo = logp_dr.detach().clone().requires_grad_()
    mask = torch.ones(8, length)
    loss_dr, _ = drgrpo.policy_loss(logp_dr, old, old, drgrpo.group_advantages(rewards).view(-1), mask,
                                    clip_eps=0.2, beta=0.0, max_len=length, n=8)
    loss_grpo, stats = grpo.policy_loss(logp_grpo, old, old, grpo.group_advantages(rewards, eps=0.0).view(-1),
                                        mask, clip_eps=0.2, beta=0.0, n=8)
    assert 0 < stats["clip_frac"].item() < 1  # the clip is active on some tokens, not all
    assert loss_grpo.item() == pytest.approx(loss_dr.item(), rel=1e-6)
    loss_dr.backward()
    loss_grpo.backward()
    assert torch.allclose(logp_grpo.grad, logp_dr.grad, atol=1e-7)
    # with GRPO's default eps = 1e-4 the losses differ by exactly the factor 1 + eps
    loss_eps, _ = grpo.policy_loss(logp_grpo, old, old, grpo.group_advantages(rewards).view(-1), mask, 0.2, 0.0, 8)
    assert loss_eps.item() * (1 + 1e-4) == pytest.approx(loss_dr.item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------
# The file as a user runs it.


def test_two_steps_end_to_end(short_run):
    p = short_run("minimal_drgrpo.py", *SHORT["drgrpo"])
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    keys = [kv.split("=")[0] for kv in lines[1].split()]
    assert keys == SHARED_KEYS + ["len_wrong"]  # the shared keys first, the method's own after them
    assert lines[-1].startswith("final") and "test_acc=" in lines[-1]
