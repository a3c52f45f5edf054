"""Checks that catch the bugs a careless edit would plant where the hand-worked unit tests do not reach:
every clipped loss against one reference version written here from the formula, the KL term's gradient,
the diagnostics every file logs, each file's wiring of its main loop (spied on in a two-step run: the
advantage it trains on, pi_old frozen for every epoch, the reference model frozen at the base), and the
pieces of each method that only its smoke run used to reach (DAPO's overlong shaping, OPD's two
estimators and teacher columns, DG's Kondo normaliser, the pedagogical student's view, --shared). The
bugs planted to prove each test can fail, and which test caught each, are listed in
notes/planted_bugs.md."""
import copy
import math

import pytest
import torch

import microbatch as mbt
import minimal_dapo as dapo
import minimal_dg as dg
import minimal_drgrpo as drgrpo
import minimal_grpo as grpo
import minimal_opd as opd
import minimal_pedagogical as ped
import minimal_pg as pg
import minimal_tpo as tpo
import minimal_tree_grpo as tree
import minimal_vpo as vpo
import toy_tasks as tt

EPS, EPS_HIGH, BETA, L_MAX = 0.2, 0.28, 0.04, 9
N, T = 10, 7
LENGTHS = [1, 7, 3, 5, 2, 7, 4, 6, 1, 3]  # ragged: one-token completions, full ones, everything between


# ---------------------------------------------------------------------------------------------
# One reference clipped surrogate, written from the formula (and verl's pg_clipfrac), against every
# file's policy_loss: loss, gradient, clip fraction, ratio and kl, on a batch built so that each wrong
# reading gives a different number.


def clip_batch(adv_kind, per_token):
    """Random log-probs with ratios from about 0.3 to 4, drifting upwards, and advantages that lean
    positive: the four clip regions (above or below the band, times the sign of A) hold four different
    token counts, so a clip counted on the wrong side, on both sides, or at the wrong edge reads
    differently. `n` and `tokens` are a larger whole batch's counts (this is one micro-batch of it)."""
    g = torch.Generator().manual_seed(11)
    mask = (torch.arange(T)[None] < torch.tensor(LENGTHS)[:, None]).float()
    old = -3 * torch.rand(N, T, generator=g)  # log-probs in (-3, 0), padding included: finite, as in a rollout
    logp = (old + 0.08 + 0.35 * torch.randn(N, T, generator=g)).requires_grad_()
    ref = old + 0.4 * torch.randn(N, T, generator=g)
    adv = torch.randn(N, T, generator=g) + 0.3 if per_token else torch.randn(N, generator=g) + 0.3
    if adv_kind == "zero":
        adv = torch.zeros_like(adv)
    elif per_token:
        adv[2] = 0.0  # a flat row, and single zero tokens
        adv[5, ::2] = 0.0
    else:
        adv[2] = 0.0  # a completion of a flat group
    return logp, old, ref, adv, mask, N + 3, mask.sum() + 11


def reference_clip(logp, old, ref, adv, mask, eps_low, eps_high, beta, weight):
    """The PPO clipped surrogate per token, max(-A rho, -A clip(rho)), plus beta k3(pi || ref), summed with
    each token's weight in the aggregation. Returns the loss, its gradient in closed form (no autograd),
    and verl's pg_clipfrac: the share of real tokens where the clipped term is the larger loss."""
    a = adv if adv.dim() == 2 else adv[:, None].expand_as(old)
    ratio = (logp.detach() - old).exp()
    unclipped, clipped = -a * ratio, -a * ratio.clamp(1 - eps_low, 1 + eps_high)
    d = ref - logp.detach()
    k3 = d.exp() - d - 1
    loss = ((torch.maximum(unclipped, clipped) + beta * k3) * weight).sum()
    took_clip = clipped > unclipped  # (N, T) the clip removed this token's gradient
    # d/dlogp: -A rho where the unclipped term is active, 0 where clipped; beta (1 - pi_ref / pi) for k3
    grad = (-a * ratio * ~took_clip + beta * (1 - d.exp())) * weight
    mean = lambda x: (x * mask).sum() / mask.sum()
    return loss, grad, {"clip_frac": mean(took_clip.float()), "ratio": mean(ratio), "k3_ref": mean(k3),
                        "k3_old": mean(((old - logp.detach()).exp() - (old - logp.detach()) - 1))}


def seq_mean(mask, n):
    return mask / mask.sum(1, keepdim=True).clamp(min=1) / n  # per-sequence token mean, then / n


# name: (call, eps_low, eps_high, beta, token weight, the kl logged is to the reference or to pi_old)
CLIPPED = {
    "grpo": (lambda lp, old, ref, a, m, n, tok: grpo.policy_loss(lp, old, ref, a, m, EPS, BETA, n),
             EPS, EPS, BETA, lambda m, n, tok: seq_mean(m, n), "k3_ref"),
    "drgrpo": (lambda lp, old, ref, a, m, n, tok: drgrpo.policy_loss(lp, old, ref, a, m, EPS, BETA, L_MAX, n),
               EPS, EPS, BETA, lambda m, n, tok: m / L_MAX / n, "k3_ref"),
    "dapo": (lambda lp, old, ref, a, m, n, tok: dapo.policy_loss(lp, old, a, m, EPS, EPS_HIGH, tok),
             EPS, EPS_HIGH, 0.0, lambda m, n, tok: m / tok, "k3_old"),
    "vpo": (lambda lp, old, ref, a, m, n, tok: vpo.policy_loss(lp, old, ref, a, m, EPS, BETA, n),
            EPS, EPS, BETA, lambda m, n, tok: seq_mean(m, n), "k3_ref"),
    "tree_grpo": (lambda lp, old, ref, a, m, n, tok: tree.policy_loss(lp, old, ref, a, m, EPS, BETA, n),
                  EPS, EPS, BETA, lambda m, n, tok: seq_mean(m, n), "k3_ref"),
    "pedagogical": (lambda lp, old, ref, a, m, n, tok: ped.policy_loss(lp, old, a, m, EPS, n),
                    EPS, EPS, 0.0, lambda m, n, tok: seq_mean(m, n), "k3_old"),
}


def test_the_clip_batch_tells_every_wrong_clip_count_apart():
    logp, old, _, adv, mask, _, _ = clip_batch("mixed", per_token=False)
    ratio, a = (logp.detach() - old).exp(), adv[:, None]
    count = lambda region: int((region * mask).sum())
    up_pos, low_neg = count((ratio > 1 + EPS) & (a > 0)), count((ratio < 1 - EPS) & (a < 0))  # clipped
    up_neg, low_pos = count((ratio > 1 + EPS) & (a < 0)), count((ratio < 1 - EPS) & (a > 0))  # not clipped
    between = count((ratio > 1 + EPS) & (ratio <= 1 + EPS_HIGH) & (a > 0))  # clipped by GRPO, not by DAPO
    low_high = count((ratio < 1 - EPS_HIGH) & (a < 0))  # DAPO's eps_high used at the lower edge
    right = up_pos + low_neg
    wrong = [up_neg + low_pos, right + up_neg + low_pos, up_pos + up_neg, low_neg + low_pos, up_pos, low_neg,
             up_pos + low_pos, up_neg + low_neg]  # the other side, both sides, one edge, ...
    assert right not in wrong, (right, wrong)
    dapo_right = up_pos - between + low_neg
    assert dapo_right not in [right, up_pos - between + low_high, up_neg + low_pos], (dapo_right, right)


@pytest.mark.parametrize("adv_kind", ["mixed", "zero"])
@pytest.mark.parametrize("name", list(CLIPPED))
def test_every_clipped_loss_matches_the_reference(name, adv_kind):
    call, eps_low, eps_high, beta, weight, kl_to = CLIPPED[name]
    logp, old, ref, adv, mask, n, tokens = clip_batch(adv_kind, per_token=name == "tree_grpo")
    loss, stats = call(logp, old, ref, adv, mask, n, tokens)
    want_loss, want_grad, want = reference_clip(logp, old, ref, adv, mask, eps_low, eps_high, beta,
                                                weight(mask, n, tokens))
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-5, abs=1e-7)
    loss.backward()
    assert torch.allclose(logp.grad, want_grad, atol=1e-6), (logp.grad - want_grad).abs().max()
    assert stats["clip_frac"].item() == pytest.approx(want["clip_frac"].item(), abs=1e-7)
    assert stats["ratio"].item() == pytest.approx(want["ratio"].item(), rel=1e-6)
    assert stats["kl"].item() == pytest.approx(want[kl_to].item(), rel=1e-5)
    if adv_kind == "zero":
        assert stats["clip_frac"].item() == 0  # nothing to clip where nothing pushes
    else:
        assert 0.1 < want["clip_frac"] < 0.5


def test_tree_per_token_advantages_are_not_averaged_over_the_row():
    # the reference above with each row's tokens given their own advantage: a file that took one advantage
    # per row (the first token's, or the row mean) would match on a row-constant batch, not on this one
    logp, old, ref, adv, mask, n, _ = clip_batch("mixed", per_token=True)
    assert (adv * mask).std(1).max() > 0.5
    loss, _ = tree.policy_loss(logp, old, ref, adv, mask, EPS, BETA, n)
    row_mean = (adv * mask).sum(1) / mask.sum(1)
    other, _ = tree.policy_loss(logp, old, ref, row_mean[:, None].expand_as(adv), mask, EPS, BETA, n)
    assert abs(loss.item() - other.item()) > 1e-3


# ---------------------------------------------------------------------------------------------
# The KL penalty: k3's value, and its gradient beta (1 - pi_ref / pi) per token times the aggregation's
# weight, through every file's loss that carries it.

ALL = {"pg": pg, "grpo": grpo, "drgrpo": drgrpo, "dapo": dapo, "tpo": tpo, "dg": dg, "opd": opd, "vpo": vpo,
       "tree_grpo": tree, "pedagogical": ped}


@pytest.mark.parametrize("name", list(ALL))
def test_k3_value_and_gradient_in_every_file(name):
    # pi = 0.5 against ref 0.25 and the other way round (k3 is not symmetric):
    # d = ln(0.25/0.5) = -ln 2: e^d - d - 1 = 0.5 + 0.693147 - 1 = 0.193147;  d/dlogp = 1 - e^d = 0.5
    # d = ln(0.5/0.25) = +ln 2: 2 - 0.693147 - 1 = 0.306853;                 d/dlogp = 1 - 2 = -1
    logp = torch.log(torch.tensor([0.5, 0.25])).requires_grad_()
    ref = torch.log(torch.tensor([0.25, 0.5]))
    k3 = ALL[name].kl_k3(logp, ref)
    assert torch.allclose(k3, torch.tensor([0.193147, 0.306853]), atol=1e-6)
    k3.sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([0.5, -1.0]), atol=1e-6)


@pytest.mark.parametrize("name", ["grpo", "drgrpo", "vpo", "tree_grpo"])
def test_kl_penalty_gradient_is_beta_one_minus_ref_over_pi(name):
    # A = 0: the surrogate contributes nothing, and the gradient is the KL term's alone,
    # beta (1 - pi_ref / pi) at each real token, times the aggregation's 1/|y_i| (1/L_max) and 1/n
    call, *_ = CLIPPED[name]
    logp, old, ref, adv, mask, n, tokens = clip_batch("zero", per_token=name == "tree_grpo")
    loss, _ = call(logp, old, ref, adv, mask, n, tokens)
    loss.backward()
    per_token = BETA * (1 - torch.exp(ref - logp.detach()))
    length = torch.full((N, 1), float(L_MAX)) if name == "drgrpo" else mask.sum(1, keepdim=True)
    assert torch.allclose(logp.grad, per_token * mask / length / n, atol=1e-7)
    assert (logp.grad * mask).abs().min() < (logp.grad * mask).abs().max() / 5  # the weights differ by token


# ---------------------------------------------------------------------------------------------
# The files with no clip: ratio, clip_frac and kl are diagnostics to pi_old, logged with the same
# definitions (masked means of exp(logp - old), |ratio - 1| > 0.2 and k3(pi || pi_old)).


def unclipped_stats(name, logp, old, mask):
    adv = torch.randn(N)
    if name == "pg":
        return pg.policy_loss(logp, old, adv, mask, N)[1]
    if name == "dg":
        return dg.policy_loss(logp, old, adv, mask, 1.0, N)[1]
    if name == "opd":
        return opd.policy_loss(logp, old, adv[:, None].expand(N, T), mask, N)[1]
    return tpo.policy_loss(logp, old, torch.full((2, 5), 0.2), mask, 2)[1]


@pytest.mark.parametrize("name", ["pg", "tpo", "dg", "opd"])
def test_diagnostics_of_the_unclipped_files(name):
    logp, old, _, _, mask, _, _ = clip_batch("mixed", per_token=False)
    stats = unclipped_stats(name, logp.detach(), old, mask)
    ratio = (logp.detach() - old).exp()
    d = old - logp.detach()
    mean = lambda x: ((x * mask).sum() / mask.sum()).item()
    assert stats["ratio"].item() == pytest.approx(mean(ratio), rel=1e-6)
    assert stats["clip_frac"].item() == pytest.approx(mean(((ratio - 1).abs() > 0.2).float()), abs=1e-7)
    assert stats["kl"].item() == pytest.approx(mean(d.exp() - d - 1), rel=1e-5)
    assert 0.2 < stats["clip_frac"] < 0.95


def test_pg_update_takes_pi_old_from_the_same_pass():
    # one update per batch: the ratio is exactly 1, nothing drifts and the kl to pi_old is exactly 0,
    # as the update itself computes them (not as a test that feeds logp as old_logp would)
    task, tok, model = mbt.tiny_policy()
    rollout, _ = mbt.ragged_rollout(tok, task, 3, 4)
    args = pg.Args(group_size=4, prompts_per_step=3, max_grad_norm=1e9)
    _, log = mbt.gradient_and_log(model, lambda opt: pg.update(model, opt, rollout, torch.randn(12), 1, args))
    assert log["ratio"] == 1.0 and log["clip_frac"] == 0.0 and log["kl"] == 0.0
