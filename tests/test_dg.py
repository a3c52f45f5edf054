"""Tests of minimal_dg.py: the DG gate's limits and its stop-gradient, the Kondo gate's price and screens
against hand-worked numbers, the Kondo update's normaliser, and the file run as a user runs it. (Its
unclipped diagnostics, its wiring in the main loop, micro-batches, repeatability and bad flags:
test_every_file.py.)"""
import math
from types import SimpleNamespace

import pytest
import torch

import minimal_dg as dg
import toy_tasks as tt
from conftest import SHORT, check_run, gradient_and_log, ragged_rollout, tiny_policy


# ---------------------------------------------------------------------------------------------------------
# The gate, its stop-gradient, and the Kondo gate.


def test_dg_gate_limits_and_a_hand_worked_value():
    adv = torch.tensor([1.0, -1.0, 5.0, -5.0, 2.0])
    logp = torch.tensor([[-100.0], [-100.0], [0.0], [0.0], [-math.log(2.0)]])  # (N, T) = (5, 1)
    w = dg.delight_gate(adv, logp, 1.0).squeeze(1)
    assert w[0] == pytest.approx(1.0)  # rare success: delight +100, gate -> 1
    assert w[1] == pytest.approx(0.0, abs=1e-12)  # rare failure: delight -100, gate -> 0
    assert w[2] == 0.5 and w[3] == 0.5  # a sure token (surprisal 0) gets 1/2 whatever the advantage
    # A = 2, surprisal ln 2: delight 2 ln 2 = ln 4, sigmoid(ln 4) = 4 / (4 + 1) = 0.8
    assert w[4] == pytest.approx(0.8)
    # eta = 2 halves the delight: sigmoid(ln 2) = 2 / 3
    assert dg.delight_gate(adv[4:], logp[4:], 2.0).item() == pytest.approx(2 / 3)


def test_dg_no_gradient_through_the_gate():
    # d loss / d logp must be exactly -sg(w A) * mask / N: the gate is a weight, not part of the
    # objective. (Letting gradient through sigmoid(-A logp) would add a second term.)
    torch.manual_seed(1)
    logp = (-torch.rand(4, 3) * 3).requires_grad_()  # (N, T) = (4, 3)
    adv = torch.tensor([1.5, -0.5, 0.0, -1.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.float)
    loss, stats = dg.policy_loss(logp, logp.detach(), adv, mask, 1.0, 4)
    loss.backward()
    w = torch.sigmoid(adv[:, None] * -logp.detach())  # (N, T)
    assert torch.equal(logp.grad, -(w * adv[:, None]) * mask / 4)
    assert stats["ratio"] == 1 and stats["kl"] == 0  # one update per batch, no importance ratio


def test_dg_flat_group_advantage_is_exactly_zero():
    rewards = torch.tensor([[0.6] * 8, [1 / 3] * 8, [5 / 6] * 8])  # float32 means one rounding step off
    assert torch.equal(dg.group_advantages(rewards), torch.zeros(3, 8))
    # and so a flat group's delight is exactly 0 (the screen's middle), not a sliver above the price
    chi = (dg.token_delight(dg.group_advantages(rewards).view(-1), -torch.rand(24, 5)) * torch.ones(24, 5)).sum(1)
    assert torch.equal(chi, torch.zeros(24))


def test_kondo_price_hits_the_keep_rate_in_expectation():
    # chi = [-2, 0, 2], eta = 1, rate 1/2: by symmetry lambda = 0, and the keep probabilities are
    # sigmoid(-2) = 0.119203, 1/2, sigmoid(2) = 0.880797, whose mean is exactly 1/2.
    chi = torch.tensor([-2.0, 0.0, 2.0])
    assert dg.kondo_price(chi, 0.5, 1.0).item() == pytest.approx(0.0, abs=1e-5)
    # rate 0.8 on a random batch: the bisection's lambda gives mean keep probability 0.8
    torch.manual_seed(0)
    chi = torch.randn(64) * 2
    for eta, rate in ((1.0, 0.8), (0.3, 0.25)):
        lam = dg.kondo_price(chi, rate, eta)
        assert torch.sigmoid((chi - lam) / eta).mean().item() == pytest.approx(rate, abs=1e-5)


def test_kondo_stochastic_screen_keeps_the_rate_and_some_negative_delight():
    # eta = 1 on delights -3..3: over many screens the kept share averages the rate, and a completion
    # with negative delight is kept sometimes (the hard screen never keeps it)
    chi = torch.linspace(-3, 3, 16)
    torch.manual_seed(1)
    keeps = torch.stack([dg.kondo_keep(chi, 0.5, 1.0) for _ in range(1000)]).float()  # (1000, 16)
    assert keeps.mean().item() == pytest.approx(0.5, abs=0.02)  # 16000 coin flips: std 0.004
    assert 0.02 < keeps[:, 0].mean().item() < 0.2  # chi = -3: p = sigmoid(-3 - lambda), lambda = 0
    assert not dg.kondo_keep(chi, 0.5, 1.0, hard=True)[:8].any()


def test_kondo_hard_screen_keeps_exactly_the_top_share_even_with_ties():
    chi = torch.tensor([3.0, 1.0, 2.0, 0.0])
    assert dg.kondo_keep(chi, 0.5, 1.0, hard=True).tolist() == [True, False, True, False]
    assert dg.kondo_keep(chi, 0.3, 1.0, hard=True).sum() == 2  # ceil(1.2) = 2
    assert dg.kondo_keep(chi, 1.0, 1.0, hard=True).all()
    # six completions of a flat group (chi = 0) and two others: rate 1/2 keeps ceil(4) = 4, the
    # positive one and the first three ties by position (a strict price of 0 would keep only 1)
    chi = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.5, -1.5])
    assert dg.kondo_keep(chi, 0.5, 1.0, hard=True).tolist() == [True, True, True, False, False, False, True, False]


def test_kondo_pass_and_row_selection_on_the_tiny_model():
    # The hard pricing pass on a real rollout keeps the top half by delight, here the positive-advantage
    # rows, and the sub-Rollout of the kept rows gives the same per-token log-probs as the same rows of
    # the full batch.
    task, tok, model = tiny_policy(seed=3, warmup=0)
    ids, pmask = tt.encode(tok, ["abc=", "abcdab=", "dd=", "cab="], "cpu")
    rollout = tt.sample(model, tok, ids, pmask, 10)
    adv = torch.tensor([0.5, -0.5, 1.0, -1.0])
    keep, entropy = dg.kondo_pass(model, rollout, adv, SimpleNamespace(kondo_keep_rate=0.5, eta=1.0, kondo_hard=True,
                                                                        micro_batch=0, group_size=1))
    assert keep.tolist() == [True, False, True, False] and entropy.shape == rollout.completion_ids.shape
    sub = rollout.select(keep)
    with torch.no_grad():
        full, _ = tt.token_logprobs(model, rollout)
        part, _ = tt.token_logprobs(model, sub)
    assert torch.allclose(part * sub.completion_mask, (full * rollout.completion_mask)[keep], atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# The Kondo update: the screen keeps the top completions by chi_i = sum_t A_i l_i,t, and the loss still
# divides by all N completions, the kept ones not reweighted.


def test_kondo_update_divides_by_every_completion_sampled():
    task, tok, model = tiny_policy()
    rollout, _ = ragged_rollout(tok, task, 3, 4)
    torch.manual_seed(3)
    adv = torch.randn(12)
    args = dg.Args(group_size=4, prompts_per_step=3, micro_batch=1, max_grad_norm=1e9, kondo=True,
                   kondo_hard=True, kondo_keep_rate=0.4, eta=0.7)
    grad, log = gradient_and_log(model, lambda opt: dg.update(model, opt, rollout, adv, 1, args))
    model.zero_grad()
    logp, _ = tt.token_logprobs(model, rollout)
    mask = rollout.completion_mask
    chi = (adv[:, None] * -logp.detach() * mask).sum(1)  # the whole completion's delight
    keep = torch.zeros(12, dtype=torch.bool)
    keep[chi.argsort(descending=True, stable=True)[:5]] = True  # ceil(0.4 * 12) = 5
    w = torch.sigmoid(adv[:, None] * -logp.detach() / 0.7)
    loss = -((w * adv[:, None]) * logp * mask)[keep].sum() / 12  # / N, not / the 5 kept
    loss.backward()
    want = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.allclose(grad, want, atol=1e-6), ((grad - want).norm() / want.norm()).item()
    assert log["kept"] == pytest.approx(5 / 12) and log["value0"] == pytest.approx(loss.item(), rel=1e-5)
    kept_mask = mask * keep[:, None]
    assert log["gate"] == pytest.approx(((w * kept_mask).sum() / kept_mask.sum()).item(), rel=1e-5)
    # the batch tells the sum of the delights from their mean and from a sum that counts padding
    top = lambda c: set(c.argsort(descending=True, stable=True)[:5].tolist())
    delight = adv[:, None] * -logp.detach()
    assert top(chi) != top(chi / mask.sum(1)) and top(chi) != top(delight.sum(1))


# ---------------------------------------------------------------------------------------------------------
# The file as a user runs it.


def test_dg_runs_end_to_end(short_run):
    check_run(short_run("minimal_dg.py", *SHORT["dg"]), ["gate", "kept"])


@pytest.mark.parametrize("hard", [False, True])
def test_dg_kondo_runs_end_to_end(run_fast, hard):
    p = run_fast("minimal_dg.py", *SHORT["dg"], "--kondo", *(["--kondo_hard"] if hard else []))
    check_run(p, ["gate", "kept"])
    kept = [float(line.split("kept=")[1]) for line in p.stdout.splitlines() if line.startswith("step=")]
    if hard:
        assert all(k == 0.5 for k in kept)  # exactly the top ceil(0.5 * 32) = 16 of 4 x 8 completions
    else:
        assert all(0.2 < k < 0.8 for k in kept)  # about half, by 32 coin flips (16 +- 2.8)
