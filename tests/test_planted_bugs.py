"""Checks that catch the bugs a careless edit would plant where the hand-worked unit tests do not reach:
every clipped loss against one reference version written here from the formula, the KL term's gradient,
the diagnostics every file logs, each file's wiring of its main loop (spied on in a two-step run: the
advantage it trains on, pi_old frozen for every epoch, the reference model frozen at the base), and the
pieces of each method that only its smoke run used to reach (DAPO's overlong shaping, OPD's two
estimators and teacher columns, DG's Kondo normaliser, the pedagogical student's view, --shared). The
bugs planted to prove each test can fail, and which test caught each, are listed in
tests/planted_bugs.md."""
import copy

import pytest
import torch

import microbatch as mbt
import minimal_dapo as dapo
import minimal_dg as dg
import minimal_dpo as dpo
import minimal_drgrpo as drgrpo
import minimal_grpo as grpo
import minimal_opd as opd
import minimal_pedagogical as ped
import minimal_pg as pg
import minimal_ppo as ppo
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
    # PPO: per-token advantages, its KL in the reward (not the loss), the logged kl to the reference
    "ppo": (lambda lp, old, ref, a, m, n, tok: ppo.policy_loss(lp, old, ref, a, m, EPS, n),
            EPS, EPS, 0.0, lambda m, n, tok: seq_mean(m, n), "k3_ref"),
}
PER_TOKEN = ("tree_grpo", "ppo")  # one advantage per token, not per completion


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
    logp, old, ref, adv, mask, n, tokens = clip_batch(adv_kind, per_token=name in PER_TOKEN)
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
       "tree_grpo": tree, "pedagogical": ped, "ppo": ppo, "dpo": dpo}
# pedagogical computes its k3 inline (the shared clip check reads its logged kl); SFT logs the drift to
# the policy before the step and has no k3
WITH_K3 = [name for name in ALL if name != "pedagogical"]


@pytest.mark.parametrize("name", WITH_K3)
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


# ---------------------------------------------------------------------------------------------
# Each file's main loop, spied on in a two-step run: what the update is given. pi_old must be the
# policy that sampled, the same in every epoch; the reference the base model, frozen (at step 1 the
# policy and the base are equal, so the check reads step 2); the advantage the file's own function of
# the rewards just scored. --temperature 0.7 makes a log-prob taken at the wrong temperature show.

FAST = ["--steps", 2, "--warmup_steps", 2, "--eval_every", 0, "--prompts_per_step", 4]


class Spy:
    """Records a run's calls: the policy as setup() returned it (and a frozen copy, the base), each
    sampling call with a copy of the model that sampled, and each call of the patched functions."""

    def __init__(self, monkeypatch):
        self.monkeypatch, self.samples, self.calls = monkeypatch, [], {}
        setup = tt.setup

        def spy_setup(*a, **k):
            out = setup(*a, **k)
            self.live, self.base = out[1], copy.deepcopy(out[1])
            return out
        monkeypatch.setattr(tt, "setup", spy_setup)

    def sampler(self, owner, name):
        """Record every call of owner.name with a copy of the model (its first argument) beforehand."""
        real = getattr(owner, name)

        def spy(model, *a, **k):
            before = copy.deepcopy(model)
            out = real(model, *a, **k)
            self.samples.append({"model": model, "before": before, "args": a, "kwargs": k, "out": out})
            return out
        self.monkeypatch.setattr(owner, name, spy)

    def record(self, owner, name):
        """Record every call of owner.name: its positional arguments and what it returned. An update
        (name "update") also records a copy of the model it was given, as it was before the call."""
        real = getattr(owner, name)
        calls = self.calls.setdefault(name, [])

        def spy(*a, **k):
            before = copy.deepcopy(a[0]) if name == "update" else None
            out = real(*a, **k)
            calls.append((a, out) if before is None else (a, out, before))
            return out
        self.monkeypatch.setattr(owner, name, spy)


def score(model, rollout):
    return tt.score(model, rollout)[0]


# each clipped file's update, as its Args set it: eps_low, eps_high, beta, token weights, kl logged against
IN_SITU = {"grpo": (0.2, 0.2, 0.04, lambda m, n, tok: seq_mean(m, n), "k3_ref"),
           "drgrpo": (0.2, 0.2, 0.04, lambda m, n, tok: m / 10 / n, "k3_ref"),  # L_max: the budget, 10
           "vpo": (0.2, 0.2, 0.04, lambda m, n, tok: seq_mean(m, n), "k3_ref"),
           "tree_grpo": (0.2, 0.2, 0.04, lambda m, n, tok: seq_mean(m, n), "k3_ref"),
           "dapo": (0.2, 0.28, 0.0, lambda m, n, tok: m / tok, "k3_old"),
           "pedagogical": (0.2, 0.2, 0.0, lambda m, n, tok: seq_mean(m, n), "k3_old")}


def check_update_in_situ(name, before, rollout, adv, old_logp, ref_logp, out):
    """What one update call returned (loss, stats, entropy) against the reference clipped surrogate on the
    policy as it was before the call: the file's own clip range, beta and aggregation, in the run."""
    eps_low, eps_high, beta, weight, kl_to = IN_SITU[name]
    mask = rollout.completion_mask
    logp, entropy = tt.score(before, rollout)
    n, tokens = mask.size(0), mask.sum()
    want_loss, _, want = reference_clip(logp, old_logp, ref_logp, adv, mask, eps_low, eps_high, beta,
                                        weight(mask, n, tokens))
    loss, stats, got_entropy = out[:3]
    assert float(loss) == pytest.approx(want_loss.item(), rel=1e-4, abs=1e-6)
    assert float(stats["clip_frac"]) == pytest.approx(want["clip_frac"].item(), abs=1e-6)
    assert float(stats["ratio"]) == pytest.approx(want["ratio"].item(), rel=1e-5)
    assert float(stats["kl"]) == pytest.approx(want[kl_to].item(), rel=1e-4, abs=1e-7)
    assert float(got_entropy) == pytest.approx(((entropy * mask).sum() / mask.sum()).item(), rel=1e-5)
    return want["clip_frac"].item()


def test_sampling_draws_at_the_temperature_asked_for():
    # 4000 one-token completions of one prompt at temperature 0.5: the share of each token is
    # softmax(logits / 0.5), not softmax(logits); greedy takes the argmax
    task, tok, model = mbt.tiny_policy(warmup=0)
    ids, mask = tt.encode(tok, ["abc="] * 4000, "cpu")
    with torch.no_grad():
        logits = model(input_ids=ids[:1], attention_mask=mask[:1]).logits[0, -1]
    torch.manual_seed(0)
    first = tt.sample(model, tok, ids, mask, 1, temperature=0.5).completion_ids[:, 0]
    share = torch.bincount(first, minlength=len(tok)).float() / 4000
    assert (share - (logits / 0.5).softmax(-1)).abs().sum() < 0.05 < (share - logits.softmax(-1)).abs().sum()
    assert tt.sample(model, tok, ids[:2], mask[:2], 1, greedy=True).completion_ids[0, 0] == logits.argmax()


def check_epochs(calls, epochs, frozen):
    """Every epoch of a step gets the same batch: the first call's arguments at the `frozen` positions."""
    assert len(calls) == epochs
    for later in calls[1:]:
        for i in frozen:
            assert later[i] is calls[0][i] or torch.equal(later[i], calls[0][i]), f"argument {i} moved between epochs"


@pytest.mark.parametrize("name", ["grpo", "drgrpo", "vpo"])
def test_grpo_family_trains_against_frozen_pi_old_and_the_frozen_base(monkeypatch, run_fast, name):
    module = ALL[name]
    spy = Spy(monkeypatch)
    spy.sampler(tt, "rollout_groups")
    spy.record(module, "update")
    if name == "vpo":
        spy.record(vpo, "completion_scores")  # the set scores use fresh Dirichlet draws: read the ones the run drew
    p = run_fast(f"minimal_{name}.py", *FAST, "--epochs", 2, "--temperature", 0.7)
    assert p.returncode == 0, p.stderr
    assert len(spy.samples) == 2
    clipped = []
    for step, sampled in zip((1, 2), spy.samples):
        calls = [c[0] for c in spy.calls["update"] if c[0][6] == step]
        check_epochs(calls, 2, frozen=(2, 3, 4, 5))
        model, _, rollout, adv, old_logp, ref_logp, _, _ = calls[0]
        assert model is spy.live and rollout is sampled["out"][0]
        assert torch.allclose(old_logp, score(sampled["before"], rollout), atol=1e-6)  # the policy that sampled
        assert torch.allclose(ref_logp, score(spy.base, rollout), atol=1e-6)  # the base, never moved
        rewards = spy.calls["completion_scores"][step - 1][1] if name == "vpo" else sampled["out"][1]
        assert torch.equal(adv, module.group_advantages(rewards).view(-1))
        for a, out, before in [c for c in spy.calls["update"] if c[0][6] == step]:
            clipped.append(check_update_in_situ(name, before, rollout, adv, old_logp, ref_logp, out))
    assert not torch.allclose(old_logp, ref_logp, atol=1e-3)  # step 2: the policy has moved from the base
    assert clipped[0] == 0 and max(clipped) > 0  # the first epoch cannot clip (rho = 1), a later one did


def test_tree_grpo_trains_on_its_tree_advantage_against_frozen_pi_old_and_base(monkeypatch, run_fast):
    spy = Spy(monkeypatch)
    spy.sampler(tree, "grow_trees")
    spy.record(tree, "update")
    for key in list(tree.ADVANTAGES):  # main looks the function up in this dict, not in the module
        spy.record(tree, key + "_advantages")
        monkeypatch.setitem(tree.ADVANTAGES, key, getattr(tree, key + "_advantages"))
    p = run_fast("minimal_tree_grpo.py", *FAST, "--epochs", 2, "--temperature", 0.7)
    assert p.returncode == 0, p.stderr
    task, tok = tt.make_task("reverse"), tt.build_char_tokenizer(tt.ReverseTask.alphabet)
    for step, sampled in zip((1, 2), spy.samples):
        calls = [c[0] for c in spy.calls["update"] if c[0][6] == step]
        check_epochs(calls, 2, frozen=(2, 3, 4, 5))
        model, _, rollout, adv, old_logp, ref_logp, _, _ = calls[0]
        assert model is spy.live and rollout is sampled["out"][0]
        assert torch.allclose(old_logp, score(sampled["before"], rollout), atol=1e-6)
        assert torch.allclose(ref_logp, score(spy.base, rollout), atol=1e-6)
        (owner, rewards), out = spy.calls["treerl_advantages"][step - 1]
        assert torch.equal(adv, out.flatten(0, 2))
        assert torch.equal(owner.flatten(0, 1), sampled["out"][1])  # (P, M, K, T) the trees as grown
        # each leaf row scored against its own prompt's answer, in row order
        prompts = [tok.decode(row, skip_special_tokens=True) for row in rollout.prompt_ids]
        want = [task.reward(t, tt.Example(q, q[:-1][::-1], "")) for t, q in zip(rollout.texts, prompts)]
        assert torch.allclose(rewards.flatten(), torch.tensor(want))
        for a, out, before in [c for c in spy.calls["update"] if c[0][6] == step]:
            check_update_in_situ("tree_grpo", before, rollout, adv, old_logp, ref_logp, out)
    assert not torch.allclose(old_logp, ref_logp, atol=1e-3)


def test_dapo_trains_on_the_overlong_shaped_advantage(monkeypatch, run_fast):
    spy = Spy(monkeypatch)
    spy.sampler(dapo, "dynamic_sample")
    spy.record(dapo, "update")
    p = run_fast("minimal_dapo.py", *FAST, "--epochs", 2, "--temperature", 0.7)
    assert p.returncode == 0, p.stderr
    shaped = 0
    for step, sampled in zip((1, 2), spy.samples):
        calls = [c[0] for c in spy.calls["update"] if c[0][5] == step]
        check_epochs(calls, 2, frozen=(2, 3, 4))
        model, _, rollout, adv, old_logp, _, _ = calls[0]
        kept, rewards, _ = sampled["out"]
        assert model is spy.live and rollout is kept
        assert torch.allclose(old_logp, score(sampled["before"], rollout), atol=1e-6)
        # R = r + R_len(|y|) with L_max 10 and L_cache 3: a longer completion of the same task reward
        # gets a lower advantage
        penalty = dapo.overlong_penalty(rollout.lengths, 10, 3).view_as(rewards)
        assert torch.equal(adv, dapo.group_advantages(rewards + penalty).view(-1))
        shaped += int((penalty.amax(1) > penalty.amin(1)).sum())
        for a, out, before in [c for c in spy.calls["update"] if c[0][5] == step]:
            check_update_in_situ("dapo", before, rollout, adv, old_logp, old_logp, out)
    assert shaped > 0  # some group's completions were penalised differently: the shaping moved advantages


def test_tpo_trains_towards_a_target_frozen_for_the_step(monkeypatch, run_fast):
    spy = Spy(monkeypatch)
    spy.sampler(tt, "rollout_groups")
    spy.record(tpo, "update")
    p = run_fast("minimal_tpo.py", *FAST, "--epochs", 2, "--temperature", 0.7, "--eta", 0.5)
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


@pytest.mark.parametrize("name", ["pg", "dg"])
def test_one_update_per_batch_on_the_leave_one_out_advantage(monkeypatch, run_fast, name):
    module = ALL[name]
    spy = Spy(monkeypatch)
    spy.sampler(tt, "rollout_groups")
    spy.record(module, "update")
    p = run_fast(f"minimal_{name}.py", *FAST)
    assert p.returncode == 0, p.stderr
    assert len(spy.calls["update"]) == 2
    for (args, out, before), sampled in zip(spy.calls["update"], spy.samples):
        model, _, rollout, adv = args[:4]
        assert model is spy.live and rollout is sampled["out"][0]
        rewards = sampled["out"][1]
        g = rewards.size(1)
        assert torch.allclose(adv, (g / (g - 1) * (rewards - rewards.mean(1, keepdim=True))).view(-1), atol=1e-6)
        # the loss: the sum of each completion's token log-probs (DG: each weighted by its gate) times A,
        # averaged over the batch's completions
        logp, entropy = tt.score(before, rollout)
        mask, weight = rollout.completion_mask, adv[:, None].expand_as(logp)
        if name == "dg":
            weight = torch.sigmoid(adv[:, None] * -logp) * adv[:, None]
        loss, stats, got_entropy = out
        assert float(loss) == pytest.approx((-(weight * logp * mask).sum() / len(adv)).item(), rel=1e-5)
        assert float(got_entropy) == pytest.approx(((entropy * mask).sum() / mask.sum()).item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Pedagogical RL: the teacher samples with its context, the student never sees it, --shared shares.

PED = ["--teacher_warmup_steps", 2, "--teacher_mix_steps", 2, "--student_batch", 8]


def student_prompt(tok, ids):
    """A left-padded prompt row as text: the teacher view is 'context|prompt', the student view 'prompt'."""
    return tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("shared", [False, True])
def test_pedagogical_wiring_and_views(monkeypatch, run_fast, shared):
    spy = Spy(monkeypatch)
    spy.sampler(tt, "rollout_groups")
    for name in ("update", "learnability_pass", "student_update"):
        spy.record(ped, name)
    p = run_fast("minimal_pedagogical.py", *FAST, *PED, "--epochs", 2, "--temperature", 0.7,
                 *(["--shared"] if shared else []))
    assert p.returncode == 0, p.stderr
    tok = tt.build_char_tokenizer(tt.KeyedReverseTask.alphabet)
    assert len(spy.samples) == 4 and all(s["kwargs"].get("teacher") or s["args"][-1] for s in spy.samples)
    student = spy.live  # setup() builds the student; the teacher is a copy of it, or itself with --shared
    for step in (1, 2):
        batch, fresh = spy.samples[2 * step - 2], spy.samples[2 * step - 1]  # the teacher's batch, the student's
        calls = [c[0] for c in spy.calls["update"] if c[0][5] == step]
        check_epochs(calls, 2, frozen=(2, 3, 4))
        teacher, _, rollout, adv, old_logp, _, _ = calls[0]
        assert (teacher is student) == shared
        assert batch["model"] is teacher and fresh["model"] is teacher and rollout is batch["out"][0]
        assert all("|" in student_prompt(tok, row) for row in rollout.prompt_ids)  # sampled with the context
        assert torch.allclose(old_logp, score(batch["before"], rollout), atol=1e-6)
        # the learnability pass: the student, on its own view of the same completions
        (scorer, view, _), (gain, _) = spy.calls["learnability_pass"][step - 1]
        assert scorer is student and torch.equal(view.completion_ids, rollout.completion_ids)
        assert [student_prompt(tok, row) for row in view.prompt_ids] == \
            [student_prompt(tok, row).split("|")[-1] for row in rollout.prompt_ids]
        assert torch.equal(adv, ped.group_advantages(batch["out"][1] * gain.view_as(batch["out"][1])).view(-1))
        for a, out, before in [c for c in spy.calls["update"] if c[0][5] == step]:
            check_update_in_situ("pedagogical", before, rollout, adv, old_logp, old_logp, out)
        s_args = spy.calls["student_update"][step - 1][0]
        assert s_args[0] is student and s_args[2] is teacher
        # the student imitates fresh prompts, --student_batch of them, not the batch the teacher trained on
        assert s_args[5] is fresh["args"][2] and len(s_args[5]) == 8 and s_args[5] is not batch["args"][2]


def test_student_imitates_fresh_teacher_samples_on_its_own_view_at_temperature_one():
    """The student's gradient is that of the gated imitation loss on the teacher's completions, sampled
    from the teacher view, scored on the student view (no context) at temperature 1 (the teacher
    sampled at 0.7), divided by the batch's completions."""
    task, tok, student = mbt.tiny_policy("keyed")
    teacher = mbt.tiny_policy("keyed", seed=1)[2]
    tt.supervised_warmup(teacher, tok, task, 20, 0, view=lambda ex: tt.copy_view(task, ex))  # reads its context
    examples = task.test[:6]
    args = ped.Args(temperature=0.7, student_batch=6, micro_batch=2, max_grad_norm=1e9)
    torch.manual_seed(4)
    grad, log = mbt.gradient_and_log(student, lambda opt: ped.student_update(student, opt, teacher, tok, task,
                                                                           examples, 1, args, "cpu")[:2])
    torch.manual_seed(4)
    prompts, mask = tt.encode(tok, [task.teacher_prompt(ex) for ex in examples], "cpu")
    sampled = tt.sample(teacher, tok, prompts, mask, args.max_new_tokens, 0.7)
    view = tt.with_prompts(sampled, tok, [ex.prompt for ex in examples], "cpu")
    student.zero_grad()
    logp = tt.completion_logits(student, view, 1.0).log_softmax(-1).gather(-1, view.completion_ids[..., None])[..., 0]
    m = view.completion_mask
    w = torch.sigmoid(4.0 * (logp.detach() + 2.5)) * m  # kappa 4, gamma -2.5
    loss = ((w * -logp).sum(1) / w.sum(1)).sum() / len(examples)
    loss.backward()
    want = torch.cat([p.grad.flatten() for p in student.parameters()])
    assert torch.allclose(grad, want, atol=1e-6) and log["value0"] == pytest.approx(loss.item(), rel=1e-5)
    assert log["value1"] == pytest.approx(((w * m).sum() / m.sum()).item(), rel=1e-5)  # the mean gate


# ---------------------------------------------------------------------------------------------
# OPD: the full estimator trains on the exact KL, the sampled one on the detached log-ratio, and the
# teacher columns are what they are named.


def opd_batch():
    task, tok, student = mbt.tiny_policy()
    teacher = mbt.tiny_policy(seed=1, warmup=20)[2].eval().requires_grad_(False)
    rollout, _ = mbt.ragged_rollout(tok, task, 3, 4, temperature=0.7)
    return student, teacher, rollout


@pytest.mark.parametrize("estimator", ["sampled", "full"])
def test_opd_update_trains_on_its_estimator(estimator):
    student, teacher, rollout = opd_batch()
    args = opd.Args(group_size=4, prompts_per_step=3, micro_batch=1, max_grad_norm=1e9, estimator=estimator)
    grad, log = mbt.gradient_and_log(student, lambda opt: opd.update(student, opt, rollout, teacher, 1, args))
    student.zero_grad()
    s = tt.completion_logits(student, rollout, 0.7).log_softmax(-1)  # the student as it sampled
    t = tt.completion_logits(teacher, rollout, 1.0).log_softmax(-1)  # the teacher untempered
    pick = lambda x: x.gather(-1, rollout.completion_ids[..., None])[..., 0]
    mask, n = rollout.completion_mask, 12
    if estimator == "full":  # KL(pi_S || pi_T) summed over the vocabulary at every position
        per_token = (s.exp() * (s - t)).sum(-1)
    else:  # REINFORCE on A_t = -(log pi_S - log pi_T), A a number
        per_token = (pick(s) - pick(t)).detach() * pick(s)
    loss = (per_token * mask).sum() / n
    loss.backward()
    want = torch.cat([p.grad.flatten() for p in student.parameters()])
    assert torch.allclose(grad, want, atol=1e-6), ((grad - want).norm() / want.norm()).item()
    assert log["value0"] == pytest.approx(loss.item(), rel=1e-5)
    # the teacher columns, as named: the sampled log-ratio log pi_S - log pi_T (positive when the student
    # is the more confident), and the exact divergences both ways
    s, t = s.detach(), t.detach()
    mean = lambda x: ((x * mask).sum() / mask.sum()).item()
    assert log["teacher_kl"] == pytest.approx(mean(pick(s) - pick(t)), rel=1e-5)
    assert log["reverse_kl"] == pytest.approx(mean((s.exp() * (s - t)).sum(-1)), rel=1e-5)
    assert log["forward_kl"] == pytest.approx(mean((t.exp() * (t - s)).sum(-1)), rel=1e-5)
    assert log["teacher_entropy"] == pytest.approx(mean(-(t.exp() * t).sum(-1)), rel=1e-5)
    assert log["top1_agree"] == pytest.approx(mean((s.argmax(-1) == t.argmax(-1)).float()), abs=1e-6)
    assert 0 < log["top1_agree"] < 1 and log["teacher_kl"] > 0.1


def test_opd_full_and_sampled_gradients_differ_on_one_batch():
    # the same expectation, not the same batch gradient: a file that ignored --estimator would pass a
    # test that checked only one of them
    student, teacher, rollout = opd_batch()
    grads = {}
    for estimator in ("sampled", "full"):
        args = opd.Args(group_size=4, prompts_per_step=3, max_grad_norm=1e9, estimator=estimator)
        grads[estimator] = mbt.gradient_and_log(student, lambda opt: opd.update(student, opt, rollout, teacher, 1, args))[0]
    assert torch.cosine_similarity(grads["sampled"], grads["full"], 0) < 0.99


# ---------------------------------------------------------------------------------------------
# DG's Kondo gate: the screen keeps the top completions by chi_i = sum_t A_i l_i,t, and the loss still
# divides by all N completions, the kept ones not reweighted.


def test_kondo_update_divides_by_every_completion_sampled():
    task, tok, model = mbt.tiny_policy()
    rollout, _ = mbt.ragged_rollout(tok, task, 3, 4)
    torch.manual_seed(3)
    adv = torch.randn(12)
    args = dg.Args(group_size=4, prompts_per_step=3, micro_batch=1, max_grad_norm=1e9, kondo=True,
                   kondo_hard=True, kondo_keep_rate=0.4, eta=0.7)
    grad, log = mbt.gradient_and_log(model, lambda opt: dg.update(model, opt, rollout, adv, 1, args))
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


# ---------------------------------------------------------------------------------------------
# Each clipped file's update() on a ragged batch (micro-batches of 4 and 40 tokens), against the
# reference: what the update passes to its loss (clip range, beta, L_max, the batch's counts) shows in
# the loss, the gradient and the logged values, whatever the run's completions happen to look like.


def reference_update_loss(logp, old, ref, adv, mask, eps_low, eps_high, beta, weight):
    """The reference clipped surrogate with its graph, for the gradient through the model."""
    a = adv if adv.dim() == 2 else adv[:, None].expand_as(old)
    ratio = (logp - old).exp()
    d = ref - logp
    per_token = torch.maximum(-a * ratio, -a * ratio.clamp(1 - eps_low, 1 + eps_high)) + beta * (d.exp() - d - 1)
    return (per_token * weight).sum()


@pytest.mark.parametrize("name", list(IN_SITU))
def test_each_clipped_update_on_a_ragged_batch(name):
    task, tok, model = mbt.tiny_policy()
    per_prompt = tree.leaves_per_prompt(tree.Args()) if name == "tree_grpo" else 4
    rollout, _ = mbt.ragged_rollout(tok, task, 3, per_prompt)
    n, t = rollout.completion_ids.shape
    torch.manual_seed(1)
    with torch.no_grad():
        now = tt.token_logprobs(model, rollout)[0]
    old, ref = now + 0.3 * torch.randn(n, t), now + 0.3 * torch.randn(n, t)
    adv = torch.randn(n, t) * rollout.completion_mask if name == "tree_grpo" else torch.randn(n) + 0.2
    common = dict(prompts_per_step=3, micro_batch=1, max_grad_norm=1e9)
    if name == "tree_grpo":
        args = tree.Args(**common)
        run = lambda opt: tree.update(model, opt, rollout, adv, old, ref, 1, args)
    elif name == "dapo":
        args, ref = dapo.Args(group_size=4, **common), old
        run = lambda opt: dapo.update(model, opt, rollout, adv, old, 1, args)
    elif name == "pedagogical":
        args, ref = ped.Args(group_size=4, **common), old
        run = lambda opt: ped.update(model, opt, rollout, adv, old, 1, args)
    else:  # L_max 16 for Dr. GRPO: wider than any completion of this batch (10), so the two cannot agree
        args = ALL[name].Args(group_size=4, max_new_tokens=16, **common)
        run = lambda opt: ALL[name].update(model, opt, rollout, adv, old, ref, 1, args)
    grad, log = mbt.gradient_and_log(model, run)
    eps_low, eps_high, beta, weight, kl_to = IN_SITU[name]
    mask = rollout.completion_mask
    w = mask / 16 / n if name == "drgrpo" else weight(mask, n, mask.sum())
    model.zero_grad()
    logp, entropy = tt.token_logprobs(model, rollout)
    loss = reference_update_loss(logp, old, ref, adv, mask, eps_low, eps_high, beta, w)
    loss.backward()
    want = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.allclose(grad, want, atol=1e-6), ((grad - want).norm() / want.norm()).item()
    _, _, stats = reference_clip(logp, old, ref, adv, mask, eps_low, eps_high, beta, w)
    assert log["value0"] == pytest.approx(loss.item(), rel=1e-5)
    for key, ref_key in (("clip_frac", "clip_frac"), ("ratio", "ratio"), ("kl", kl_to)):
        assert log[key] == pytest.approx(stats[ref_key].item(), rel=1e-5, abs=1e-7), key
    assert log["value2"] == pytest.approx(((entropy * mask).sum() / mask.sum()).item(), rel=1e-5)
    assert 0 < stats["clip_frac"] < 1


@pytest.mark.parametrize("name", ["pg", "grpo", "drgrpo", "dapo", "tpo", "dg", "vpo", "tree_grpo", "pedagogical"])
def test_micro_batches_hold_whole_groups(monkeypatch, name):
    # --micro_batch counts prompts: each forward pass with a graph holds whole groups (a tree's leaves),
    # here 1 prompt of 3, whatever that changes or not in the numbers
    task, tok, model = mbt.tiny_policy()
    per_prompt = tree.leaves_per_prompt(tree.Args()) if name == "tree_grpo" else 4
    rollout, _ = mbt.ragged_rollout(tok, task, 3, per_prompt)
    n, t = rollout.completion_ids.shape
    old = torch.zeros(n, t)
    adv = torch.randn(n, t) if name == "tree_grpo" else torch.randn(n)
    rows, token_logprobs = [], tt.token_logprobs
    monkeypatch.setattr(tt, "token_logprobs", lambda m, r, *a, **k: rows.append(len(r.completion_ids)) or token_logprobs(m, r, *a, **k))
    common = dict(prompts_per_step=3, micro_batch=1)
    if name == "tree_grpo":
        tree.update(model, mbt.KeepGradient(model), rollout, adv, old, old, 1, tree.Args(**common))
    elif name in ("pg", "dg"):
        ALL[name].update(model, mbt.KeepGradient(model), rollout, adv, 1, ALL[name].Args(group_size=4, **common))
    elif name in ("dapo", "pedagogical"):
        ALL[name].update(model, mbt.KeepGradient(model), rollout, adv, old, 1, ALL[name].Args(group_size=4, **common))
    elif name == "tpo":
        tpo.update(model, mbt.KeepGradient(model), rollout, torch.full((3, 4), 0.25), old, 1, tpo.Args(group_size=4, **common))
    else:
        ALL[name].update(model, mbt.KeepGradient(model), rollout, adv, old, old, 1, ALL[name].Args(group_size=4, **common))
    assert rows == [per_prompt] * 3
