"""Tests of minimal_tpo.py and minimal_dg.py: the TPO target and its gradient against hand-worked
numbers, the DG gate's limits and its stop-gradient, the Kondo gate's price, and both files run end
to end as a user would run them."""
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the minimal_*.py files live at the top

import minimal_dg as dg  # noqa: E402
import minimal_tpo as tpo  # noqa: E402
import toy_tasks as tt  # noqa: E402

FAST = ["--steps", "2", "--warmup_steps", "2", "--eval_every", "0", "--prompts_per_step", "4"]
SHARED_KEYS = ["step", "reward", "loss", "entropy", "ratio", "clip_frac", "kl", "grad_norm", "len",
               "gen_tokens"]


# ---------------------------------------------------------------------------------------------
# TPO: z-scored rewards, the target over the candidates, and the gradient p - q.


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


# ---------------------------------------------------------------------------------------------
# DG: the gate, its stop-gradient, and the Kondo gate.


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
    torch.manual_seed(3)
    task = tt.make_task("reverse")
    tok = tt.build_char_tokenizer(task.alphabet)
    model = tt.build_tiny_model(tok)
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


# ---------------------------------------------------------------------------------------------
# End to end, as a user runs them, and one loud failure each.


def check_run(p, extra_keys):
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert lines[-1].startswith("final") and "test_acc=" in lines[-1]
    step_line = next(line for line in lines if line.startswith("step="))
    keys = [kv.split("=")[0] for kv in step_line.split()]
    assert keys[:len(SHARED_KEYS)] == SHARED_KEYS and keys[-len(extra_keys):] == extra_keys


def test_tpo_runs_end_to_end(run_fast):
    check_run(run_fast("minimal_tpo.py", *FAST), ["target_entropy", "max_q"])


def test_dg_runs_end_to_end(run_fast):
    check_run(run_fast("minimal_dg.py", *FAST), ["gate", "kept"])


@pytest.mark.parametrize("hard", [False, True])
def test_dg_kondo_runs_end_to_end(run_fast, hard):
    p = run_fast("minimal_dg.py", *FAST, "--kondo", *(["--kondo_hard"] if hard else []))
    check_run(p, ["gate", "kept"])
    kept = [float(line.split("kept=")[1]) for line in p.stdout.splitlines() if line.startswith("step=")]
    if hard:
        assert all(k == 0.5 for k in kept)  # exactly the top ceil(0.5 * 32) = 16 of 4 x 8 completions
    else:
        assert all(0.2 < k < 0.8 for k in kept)  # about half, by 32 coin flips (16 +- 2.8)


@pytest.mark.parametrize("script,args,flag", [
    ("minimal_tpo.py", ["--eta", "0"], "--eta"),
    ("minimal_dg.py", ["--kondo", "--kondo_keep_rate", "1.5"], "--kondo_keep_rate"),
    ("minimal_dg.py", ["--kondo", "--kondo_keep_rate", "0"], "--kondo_keep_rate"),
    ("minimal_dg.py", ["--kondo_hard"], "--kondo_hard"),
])
def test_bad_method_flag_fails_loudly(run_fast, script, args, flag):
    p = run_fast(script, *args)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and flag in err[0]
