"""Tests of minimal_drgrpo.py and minimal_dapo.py: each change from GRPO against hand-worked numbers,
the limit where Dr. GRPO and GRPO coincide, DAPO's dynamic sampling with a stand-in sampler, and both
files run end to end as a user would run them."""
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the minimal_*.py files live at the top

import minimal_dapo as dapo  # noqa: E402
import minimal_drgrpo as drgrpo  # noqa: E402
import minimal_grpo as grpo  # noqa: E402
import toy_tasks as tt  # noqa: E402

FAST = ["--steps", 2, "--warmup_steps", 2, "--eval_every", 0, "--prompts_per_step", 4]
SHARED_KEYS = ["step", "reward", "loss", "entropy", "ratio", "clip_frac", "kl", "grad_norm", "len",
               "gen_tokens"]


# ---------------------------------------------------------------------------------------------
# Dr. GRPO: the two changes, on numbers worked out by hand.


def test_drgrpo_advantage_is_centred_not_scaled():
    # r = [1, 0, 0, 0]: mean 0.25, so A = [0.75, -0.25, -0.25, -0.25] (GRPO: [1.73, -0.58, ...]).
    # r = [0.51, 0.5, 0.5, 0.5]: mean 0.5025, A = [0.0075, -0.0025, ...]: a tiny gap stays tiny,
    # where GRPO's 1/std blows it up to the same [1.73, -0.58, ...] as the large gap.
    adv = drgrpo.group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.51, 0.5, 0.5, 0.5],
                                                [0.3, 0.3, 0.3, 0.3]]))
    assert torch.allclose(adv[0], torch.tensor([0.75, -0.25, -0.25, -0.25]))
    assert torch.allclose(adv[1], torch.tensor([0.0075, -0.0025, -0.0025, -0.0025]), atol=1e-6)
    assert torch.equal(adv[2], torch.zeros(4))  # no signal when the group agrees


@pytest.mark.parametrize("module", [drgrpo, dapo])
def test_flat_group_advantage_is_exactly_zero(module):
    # equal rewards whose float32 mean is one rounding step off (see test_foundation.RESIDUE_GROUPS)
    rewards = torch.tensor([[0.6] * 8, [1 / 3] * 8, [5 / 6] * 8])
    assert (rewards - rewards.mean(1, keepdim=True)).abs().amax(1).min() > 0
    assert torch.equal(module.group_advantages(rewards), torch.zeros(3, 8))


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


# ---------------------------------------------------------------------------------------------
# DAPO: clip-higher, token-mean loss, overlong shaping and dynamic sampling.


def test_dapo_asymmetric_clip_at_both_edges():
    # one token per completion, eps_low 0.2, eps_high 0.28: the band is [0.8, 1.28].
    # min(rho A, clip(rho) A): (1.35, +1) -> 1.28 clipped; (1.35, -1) -> -1.35; (0.7, +1) -> 0.7;
    # (0.7, -1) -> -0.8 clipped; (1.25, +1) -> 1.25, inside the band (GRPO's symmetric 1.2 would clip it).
    # loss = -(1.28 - 1.35 + 0.7 - 0.8 + 1.25) / 5 = -0.216
    old = torch.zeros(5, 1)
    logp = torch.log(torch.tensor([[1.35], [1.35], [0.7], [0.7], [1.25]])).requires_grad_()
    adv, mask = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0]), torch.ones(5, 1)
    loss, stats = dapo.policy_loss(logp, old, adv, mask, clip_eps=0.2, clip_eps_high=0.28, tokens=mask.sum())
    assert loss.item() == pytest.approx(-0.216)
    # four ratios lie outside [0.8, 1.28], but the clip removed the gradient of two only, (1.35, +1)
    # and (0.7, -1): TRL's clip_ratio/region_mean and verl's pg_clipfrac count those
    assert stats["clip_frac"].item() == pytest.approx(2 / 5)
    loss.backward()
    # the clipped tokens get no gradient; the others get d(-rho A / 5)/dlogp = -rho A / 5
    assert torch.allclose(logp.grad.view(-1), torch.tensor([0.0, 1.35 / 5, -0.7 / 5, 0.0, -1.25 / 5]))
    grpo_loss, _ = grpo.policy_loss(logp[4:].detach(), old[4:], old[4:], adv[4:], mask[4:], 0.2, 0.0, 1)
    assert grpo_loss.item() == pytest.approx(-1.2)  # the symmetric clip stops the same token at 1.2


def test_dapo_token_mean_aggregation():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # every real token of the batch, one mean: (1 + 2 + 4) / 3 = 7/3 (GRPO: 2.75, Dr. GRPO at L_max 4: 0.875)
    assert dapo.aggregate(per_token, mask, tokens=mask.sum()).item() == pytest.approx(7 / 3)


@pytest.mark.parametrize("max_len,cache,expected", [
    # L_max 10, L_cache 3 (the defaults): the ramp covers 8, 9, 10 tokens.
    # |y| = 7 = L_max - L_cache -> 0; 8 -> (7 - 8)/3 = -1/3; 9 -> -2/3; 10 = L_max -> -1; 11 -> -1
    (10, 3, {4: 0.0, 7: 0.0, 8: -1 / 3, 9: -2 / 3, 10: -1.0, 11: -1.0}),
    # L_max 8, L_cache 4: 4 -> 0; 5 -> (4 - 5)/4 = -0.25; 8 -> -1; 9 -> -1
    (8, 4, {4: 0.0, 5: -0.25, 8: -1.0, 9: -1.0}),
])
def test_dapo_overlong_ramp_at_its_boundaries(max_len, cache, expected):
    lengths = torch.tensor(list(expected), dtype=torch.float)  # rollout.lengths is a float tensor
    penalty = dapo.overlong_penalty(lengths, max_len, cache)
    assert torch.allclose(penalty, torch.tensor(list(expected.values())), atol=1e-6)


def test_dapo_informative_groups():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.5],  # all equal: dropped
                            [1.0, 0.0, 1.0], [0.2, 0.4, 0.4],  # mixed: kept
                            [2 / 6, 1 / 3, 1 / 3]])  # equal scores reached two ways are still equal
    assert dapo.informative_groups(rewards).tolist() == [False, False, False, True, True, False]


def stand_in_sampler(schedule, group_size=2):
    """Replaces tt.rollout_groups: round k returns one group per entry of schedule[k], mixed ([1, 0])
    where it is True and all right ([1, 1]) where False. Prompts and completions get wider each
    round, so the stacking has padding to do; texts name the round, group and completion."""
    def rollout_groups(model, tok, task, examples, g, args, device):
        k = rollout_groups.calls
        rollout_groups.calls += 1
        assert g == group_size and len(examples) == len(schedule[k])
        n, p, t = len(examples) * g, 2 + k, 3 + k
        rollout = tt.Rollout(torch.full((n, p), 7), torch.ones(n, p, dtype=torch.long), torch.full((n, t), 5),
                             torch.ones(n, t), torch.zeros(n, dtype=torch.bool),
                             [f"r{k}g{i}c{j}" for i in range(len(examples)) for j in range(g)])
        rewards = torch.tensor([[1.0, 0.0] if mixed else [1.0, 1.0] for mixed in schedule[k]])
        return rollout, rewards
    rollout_groups.calls = 0
    return rollout_groups


def dynamic_args(max_rounds):
    return SimpleNamespace(prompts_per_step=4, group_size=2, max_rounds=max_rounds)


def test_dynamic_sampling_fills_the_batch_with_mixed_groups(monkeypatch):
    # round 0 keeps groups 0, 1, 3 (3 of 4); round 1 keeps groups 1, 2, so 5 >= 4 and sampling stops.
    # The batch is the first 4 kept groups: r0g0, r0g1, r0g3, r1g1; kept = 5/8; rounds = 2.
    sampler = stand_in_sampler([[True, True, False, True], [False, True, True, False], [True] * 4])
    monkeypatch.setattr(tt, "rollout_groups", sampler)
    task, tok = tt.make_task("reverse"), SimpleNamespace(pad_token_id=0)
    rollout, rewards, stats = dapo.dynamic_sample(None, tok, task, random.Random(0), 1, dynamic_args(10), "cpu")
    assert sampler.calls == 2 and stats["rounds"] == 2 and stats["kept"] == pytest.approx(5 / 8)
    assert rewards.tolist() == [[1.0, 0.0]] * 4 and dapo.informative_groups(rewards).all()
    assert [t[:4] for t in rollout.texts[::2]] == ["r0g0", "r0g1", "r0g3", "r1g1"]
    # the logged reward averages every sampled group, kept or not: 5 mixed groups (reward sum 1 each)
    # and 3 all-right groups (sum 2 each) over 16 completions -> (5 + 6) / 16 = 0.6875
    assert float(stats["reward"]) == pytest.approx(0.6875)
    # every sampled token is paid for, kept or not: round 0 has 8 completions of 3 tokens, round 1 8 of 4
    assert float(stats["gen_tokens"]) == 8 * 3 + 8 * 4
    # round 0 was narrower: its prompts gain masked padding on the left, its completions on the right
    assert rollout.prompt_ids.shape == (8, 3) and rollout.completion_ids.shape == (8, 4)
    assert rollout.prompt_mask[0].tolist() == [0, 1, 1] and rollout.prompt_mask[-1].tolist() == [1, 1, 1]
    assert rollout.completion_mask[0].tolist() == [1, 1, 1, 0] and rollout.lengths.tolist() == [3] * 6 + [4] * 2


def test_dynamic_sampling_honours_its_cap(monkeypatch, capsys):
    # one mixed group per round, cap 3 rounds: the step trains on the 3 groups it has; kept = 3/12.
    sampler = stand_in_sampler([[False, False, True, False]] * 5)
    monkeypatch.setattr(tt, "rollout_groups", sampler)
    task, tok = tt.make_task("reverse"), SimpleNamespace(pad_token_id=0)
    rollout, rewards, stats = dapo.dynamic_sample(None, tok, task, random.Random(0), 1, dynamic_args(3), "cpu")
    assert sampler.calls == 3 and stats["rounds"] == 3 and stats["kept"] == pytest.approx(3 / 12)
    assert rewards.shape == (3, 2) and len(rollout.texts) == 6
    # nothing informative at all within the cap: the run stops with one sentence naming the flag
    monkeypatch.setattr(tt, "rollout_groups", stand_in_sampler([[False] * 4] * 3))
    with pytest.raises(SystemExit) as e:
        dapo.dynamic_sample(None, tok, task, random.Random(0), 7, dynamic_args(3), "cpu")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--max_rounds" in err and "step 7" in err


def test_stacked_rounds_score_as_they_did_apart():
    """Padding two real rounds to a common width must not change a single log-prob."""
    torch.manual_seed(0)
    task = tt.make_task("reverse")
    tok = tt.build_char_tokenizer(task.alphabet)
    model = tt.build_tiny_model(tok)
    args = SimpleNamespace(max_new_tokens=10, temperature=1.0)
    short, _ = tt.rollout_groups(model, tok, task, [tt.Example("abc=", "cba", "cba")], 2, args, "cpu")
    longer, _ = tt.rollout_groups(model, tok, task, [tt.Example("abcdab=", "badcba", "badcba")], 2, args, "cpu")
    both = dapo.cat_rollouts([short, longer], tok.pad_token_id)  # what dynamic_sample stacks rounds with
    logp_both, _ = tt.token_logprobs(model, both)
    for part, rows in ((short, slice(0, 2)), (longer, slice(2, 4))):
        logp_part, _ = tt.token_logprobs(model, part)
        t = part.completion_ids.size(1)
        m = part.completion_mask.bool()
        assert torch.allclose(logp_both[rows, :t][m], logp_part[m], atol=1e-5)
        assert both.completion_mask[rows, t:].sum() == 0  # the new padding is masked out


# ---------------------------------------------------------------------------------------------
# Both files as a user runs them.


@pytest.mark.parametrize("script,extra", [("minimal_drgrpo.py", ["len_wrong"]),
                                          ("minimal_dapo.py", ["len_wrong", "kept", "rounds", "overlong"])])
def test_two_steps_end_to_end(run_fast, script, extra):
    p = run_fast(script, *FAST)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    keys = [kv.split("=")[0] for kv in lines[1].split()]
    assert keys == SHARED_KEYS + extra  # the shared keys first, the method's own after them
    assert lines[-1].startswith("final") and "test_acc=" in lines[-1]


@pytest.mark.parametrize("script,args,flag", [
    ("minimal_drgrpo.py", ["--beta", "-0.1"], "--beta"),  # the flag whose default Dr. GRPO changes
    ("minimal_dapo.py", ["--clip_eps_high", "0.1"], "--clip_eps_high"),  # below eps_low: not clip-higher
    ("minimal_dapo.py", ["--max_rounds", "0"], "--max_rounds"),
    ("minimal_dapo.py", ["--overlong_cache", "10"], "--overlong_cache"),  # the whole budget would be penalised
])
def test_bad_method_flags_fail_cleanly(run_fast, script, args, flag):
    p = run_fast(script, *args)
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and flag in err[0], p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""
