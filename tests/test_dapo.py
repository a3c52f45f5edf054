"""Tests of minimal_dapo.py: clip-higher, the token-mean loss and the overlong ramp against hand-worked
numbers, dynamic sampling with a stand-in sampler, the overlong-shaped advantage in the main loop, and the
file run as a user runs it. (Flat groups, the reference clipped surrogate, micro-batches and a
per-micro-batch token mean, repeatability and bad flags: test_every_file.py.)"""
import random
from types import SimpleNamespace

import pytest
import torch

import minimal_dapo as dapo
import minimal_grpo as grpo
import toy_tasks as tt
from conftest import SHARED_KEYS, SHORT, Spy, check_epochs, check_update_in_situ, score, tiny_policy


# ---------------------------------------------------------------------------------------------------------
# Clip-higher, token-mean loss, overlong shaping and dynamic sampling.


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
    task, tok, model = tiny_policy(warmup=0)
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


# ---------------------------------------------------------------------------------------------------------
# The main loop, spied on in a two-step run (--epochs 2 --temperature 0.7): the update trains on the
# overlong-shaped advantage, against pi_old frozen for both epochs.


def test_dapo_trains_on_the_overlong_shaped_advantage(monkeypatch, run_fast):
    spy = Spy(monkeypatch)
    spy.sampler(dapo, "dynamic_sample")
    spy.record(dapo, "update")
    p = run_fast("minimal_dapo.py", *SHORT["dapo"], "--epochs", 2, "--temperature", 0.7)
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


# ---------------------------------------------------------------------------------------------------------
# The file as a user runs it.


def test_two_steps_end_to_end(short_run):
    p = short_run("minimal_dapo.py", *SHORT["dapo"])
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    keys = [kv.split("=")[0] for kv in lines[1].split()]
    assert keys == SHARED_KEYS + ["len_wrong", "kept", "rounds", "overlong"]  # the shared keys first, the method's own after them
    assert lines[-1].startswith("final") and "test_acc=" in lines[-1]
