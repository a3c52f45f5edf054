"""Tests of minimal_tpo.py: the TPO target and its gradient against hand-worked numbers, the target frozen
for the step in the main loop, and the file run as a user runs it. (Its unclipped diagnostics,
micro-batches, repeatability and bad flags: test_every_file.py.)"""
import math

import pytest
import torch

import minimal_tpo as tpo
import toy_tasks as tt
from conftest import SHORT, Spy, check_epochs, check_run, score


# ---------------------------------------------------------------------------------------------------------
# z-scored rewards, the target over the candidates, and the gradient p - q.


def test_tpo_u_is_a_population_z_score():
    # r = [1, 0, 0]: mean 1/3, population std sqrt((4/9 + 1/9 + 1/9) / 3) = sqrt(2)/3, so
    # u = [(2/3) / (sqrt(2)/3), (-1/3) / (sqrt(2)/3), ...] = [sqrt(2), -1/sqrt(2), -1/sqrt(2)].
    u = tpo.group_advantages(torch.tensor([[1.0, 0.0, 0.0]]))
    assert torch.allclose(u, torch.tensor([[math.sqrt(2), -1 / math.sqrt(2), -1 / math.sqrt(2)]]))


def test_tpo_target_hand_worked():
    # p_old over the candidates = [1/2, 1/4, 1/4] (s_old shifted by -5: only differences matter).
    s_old = torch.log(torch.tensor([[0.5, 0.25, 0.25]])) - 5.0
    # u = [ln 4, 0, 0], eta = 1: q ~ [1/2 * 4, 1/4, 1/4] = [2, 0.25, 0.25] / 2.5 = [0.8, 0.1, 0.1].
    u = torch.tensor([[math.log(4.0), 0.0, 0.0]])
    assert torch.allclose(tpo.tpo_target(s_old, u, 1.0), torch.tensor([[0.8, 0.1, 0.1]]))
    # eta = 2 halves the tilt: exp(u/2) = [2, 1, 1], q ~ [1, 0.25, 0.25] / 1.5 = [2/3, 1/6, 1/6].
    assert torch.allclose(tpo.tpo_target(s_old, u, 2.0), torch.tensor([[2 / 3, 1 / 6, 1 / 6]]))


def test_tpo_target_from_rewards_hand_worked():
    # Equal old log-probs (p_old uniform) and r = [1, 0, 0], so u = [sqrt(2), -1/sqrt(2), -1/sqrt(2)]
    # (above). exp(u) = [4.113250, 0.493069, 0.493069], sum 5.099388,
    # q = [4.113250, 0.493069, 0.493069] / 5.099388 = [0.806615, 0.096692, 0.096692].
    u = tpo.group_advantages(torch.tensor([[1.0, 0.0, 0.0]]))
    q = tpo.tpo_target(torch.full((1, 3), -7.0), u, 1.0)
    assert torch.allclose(q, torch.tensor([[0.806615, 0.096692, 0.096692]]), atol=1e-6)


def test_tpo_zero_variance_group_gives_back_the_old_policy():
    # Eight equal rewards of 1/3: float rounding leaves the population std at about 3e-8, not 0,
    # so a plain (r - mean) / std would give u of order 1 out of pure noise. u must be exactly 0,
    # and the target exactly the old policy renormalised over the candidates, softmax(s_old).
    rewards = torch.tensor([[1 / 3] * 8, [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    u = tpo.group_advantages(rewards)
    assert torch.equal(u[0], torch.zeros(8))
    s_old = torch.tensor([[-3.0, -1.0, -2.0, -6.0, -2.5, -4.0, -1.5, -9.0]] * 2)
    q = tpo.tpo_target(s_old, u, 1.0)
    assert torch.allclose(q[0], s_old[0].softmax(0), atol=1e-7)
    assert not torch.allclose(q[1], s_old[1].softmax(0))  # the other group is tilted towards r = 1


def test_tpo_gradient_is_p_minus_q():
    # 2 groups of 3 candidates, 4 token slots with padding: s_i sums each row's unmasked tokens, the
    # loss is the cross-entropy H(q, softmax(s)) averaged over the 2 groups, so every unmasked token
    # of candidate i gets gradient (p_i - q_i) / 2 and every padded token gets 0.
    torch.manual_seed(0)
    logp = (-torch.rand(6, 4) * 2).requires_grad_()  # (N, T) = (6, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0],
                         [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.float)
    q = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])  # (P, G) a frozen target
    loss, _ = tpo.policy_loss(logp, logp.detach(), q, mask, 2)
    loss.backward()
    p = (logp.detach() * mask).sum(1).view(2, 3).softmax(1)  # (P, G)
    expected = ((p - q) / 2).reshape(6, 1) * mask  # (N, T)
    assert torch.allclose(logp.grad, expected, atol=1e-6)


def test_tpo_gradient_vanishes_at_the_target():
    # When the policy over the candidates already equals q, there is nothing left to learn.
    s = torch.tensor([[-2.0, -3.0, -1.0]])
    logp = s.view(3, 1).clone().requires_grad_()  # one token each: s_i = logp_i
    loss, _ = tpo.policy_loss(logp, logp.detach(), s.softmax(1), torch.ones(3, 1), 1)
    loss.backward()
    assert torch.allclose(logp.grad, torch.zeros(3, 1), atol=1e-7)


# ---------------------------------------------------------------------------------------------------------
# The main loop, spied on in a two-step run (--epochs 2 --temperature 0.7 --eta 0.5): the target q is
# frozen for the step, the loss is H(q, p) over the groups.


def test_tpo_trains_towards_a_target_frozen_for_the_step(monkeypatch, run_fast):
    spy = Spy(monkeypatch)
    spy.sampler(tt, "rollout_groups")
    spy.record(tpo, "update")
    p = run_fast("minimal_tpo.py", *SHORT["tpo"], "--epochs", 2, "--temperature", 0.7, "--eta", 0.5)
    assert p.returncode == 0, p.stderr
    for step, sampled in zip((1, 2), spy.samples):
        calls = [c[0] for c in spy.calls["update"] if c[0][5] == step]
        check_epochs(calls, 2, frozen=(2, 3, 4))
        model, _, rollout, q, old_logp, _, _ = calls[0]
        assert model is spy.live and rollout is sampled["out"][0]
        old = score(sampled["before"], rollout)
        assert torch.allclose(old_logp, old, atol=1e-6)
        u = tpo.group_advantages(sampled["out"][1])
        s_old = (old * rollout.completion_mask).sum(1).view_as(u)
        assert torch.allclose(q, torch.softmax(s_old.log_softmax(1) + u / 0.5, 1), atol=1e-6)
        for a, out, before in [c for c in spy.calls["update"] if c[0][5] == step]:  # H(q, p) over the groups
            s_now = (score(before, rollout) * rollout.completion_mask).sum(1).view_as(u)
            assert float(out[0]) == pytest.approx((-(q * s_now.log_softmax(1)).sum(1).mean()).item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------------------
# The file as a user runs it.


def test_tpo_runs_end_to_end(short_run):
    check_run(short_run("minimal_tpo.py", *SHORT["tpo"]), ["target_entropy", "max_q"])
