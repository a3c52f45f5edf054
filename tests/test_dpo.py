"""Tests of minimal_dpo.py: its pairs, loss, gradient and preference accuracy against hand-worked numbers; the
limit where DPO is a pairwise policy gradient and where it stops being one; the empty step; micro-batches
that add up exactly (a per-micro-batch pair mean would not); the file end to end, online and offline; and
its temperature: pi and pi_ref are scored at temperature 1, as TRL's DPO and online-DPO trainers score them,
whatever --temperature sampled the pairs; the logged entropy stays that of the distribution the tokens were
sampled from. (At the default --temperature 1 the two are the same numbers, so the default run prints what
it printed before.)"""
import copy

import pytest
import torch

import minimal_dpo as dpo
import minimal_pg as pg
import toy_tasks as tt
from conftest import SHARED_KEYS, SHORT, compare, gradient_and_log, ragged_rollout, step_record, tiny_policy

FAST = ["--steps", 2, "--warmup_steps", 10, "--eval_every", 0, "--prompts_per_step", 4]
P, G = 3, 4


# ---------------------------------------------------------------------------------------------------------
# Pairs, the loss and its gradient, the preference accuracy, the empty step.


def test_make_pairs_best_against_worst_ties_and_flat_groups():
    rewards = torch.tensor([[0.5, 1.0, 1.0, 0.0, 0.0],  # best: first of the two 1s (row 1); worst: first 0 (row 3)
                            [0.3, 0.3, 0.3, 0.3, 0.3],  # all tie: no pair
                            [0.0, 0.2, 0.2, 0.1, 0.0]])  # rows 10-14: best row 11, worst row 10
    chosen, rejected, formed = dpo.make_pairs(rewards)
    assert chosen.tolist() == [1, 11] and rejected.tolist() == [3, 10] and formed.tolist() == [True, False, True]
    flat = torch.tensor([[0.6] * 8])  # a float32 mean of eight 0.6s is off by a rounding step: max == min still
    assert not dpo.make_pairs(flat)[2].any()


def test_pair_rows_interleave_chosen_and_rejected():
    task, tok, model = tiny_policy()
    rollout, _ = ragged_rollout(tok, task, P, G)
    pairs = dpo.pair_rows(rollout, torch.tensor([1, 11]), torch.tensor([3, 8]))
    assert pairs.texts == [rollout.texts[i] for i in (1, 3, 11, 8)]
    assert torch.equal(pairs.completion_ids, rollout.completion_ids[[1, 3, 11, 8]])


def test_dpo_loss_value_and_gradient_by_hand():
    # beta = 0.1, margins h = [0, 10, -10], 3 pairs: beta h = [0, 1, -1] and
    # -log sigmoid(0) = ln 2 = 0.693147, -log sigmoid(1) = ln(1 + e^-1) = 0.313262,
    # -log sigmoid(-1) = ln(1 + e) = 1.313262: sum 2.319671, mean 0.773224.
    # dL/dh = -beta sigmoid(-beta h) / 3 = -0.1 [0.5, 0.268941, 0.731059] / 3
    #       = [-0.0166667, -0.0089647, -0.0243686].
    margin = torch.tensor([0.0, 10.0, -10.0], requires_grad=True)
    loss = dpo.dpo_loss(margin, 0.1, 3)
    assert loss.item() == pytest.approx(0.773224, abs=1e-6)
    loss.backward()
    assert torch.allclose(margin.grad, torch.tensor([-0.0166667, -0.0089647, -0.0243686]), atol=1e-7)


def test_pref_acc_counts_strict_wins():
    assert dpo.pref_acc(torch.tensor([1.0, -1.0, 0.0, 2.0])).item() == 0.5  # a tie is not a win


def pair_batch(seed=0, k=3, t=4):
    torch.manual_seed(seed)
    logp = (-torch.rand(2 * k, t) * 2).requires_grad_()  # (2K, T)
    mask = (torch.arange(t)[None, :] < torch.randint(1, t + 1, (2 * k, 1))).float()
    return logp, mask


def test_dpo_gradient_reaches_each_token_through_the_sequence_sum():
    # Each unmasked token of a chosen completion gets dL/dh_k, each of a rejected one -dL/dh_k, padding
    # none; the logged k3 is to the reference and the ratio to the sampler.
    logp, mask = pair_batch()
    ref = logp.detach() + torch.randn(logp.shape)
    loss, stats, logratios = dpo.policy_loss(logp, logp.detach(), ref, mask, 0.1, 3)
    loss.backward()
    h = (((logp - ref) * mask).sum(1).view(3, 2) @ torch.tensor([1.0, -1.0])).detach()
    dh = -0.1 * torch.sigmoid(-0.1 * h) / 3  # (K,)
    expected = torch.stack([dh, -dh], 1).view(-1, 1) * mask
    assert torch.allclose(logp.grad, expected, atol=1e-7)
    assert torch.allclose(logratios[:, 0] - logratios[:, 1], h)
    assert stats["ratio"] == 1 and stats["clip_frac"] == 0
    assert stats["kl"].item() == pytest.approx(tt.masked_mean(dpo.kl_k3(logp, ref), mask).item())


def test_dpo_at_the_reference_is_beta_times_a_pairwise_policy_gradient():
    # At pi = pi_ref every margin is 0, sigmoid(0) = 1/2, and DPO's gradient is
    # -(beta / 2K) sum_k (grad log pi(y_w) - grad log pi(y_l)): PG's loss on the 2K completions with
    # advantage +1 on y_w and -1 on y_l, times beta. Away from it, pair k is weighted 2 sigmoid(-beta h_k).
    logp, mask = pair_batch(1)
    adv = torch.tensor([1.0, -1.0] * 3)
    pg.policy_loss(logp, logp.detach(), adv, mask, 6)[0].backward()
    pg_grad, logp.grad = logp.grad.clone(), None
    dpo.policy_loss(logp, logp.detach(), logp.detach(), mask, 0.1, 3)[0].backward()
    assert torch.allclose(logp.grad, 0.1 * pg_grad, atol=1e-8)
    logp.grad = None
    ref = logp.detach() - torch.tensor([[3.0], [0.0], [0.0], [3.0], [0.0], [0.0]]) * mask  # h = 3 L_w, -3 L_l, 0
    _, _, logratios = dpo.policy_loss(logp, logp.detach(), ref, mask, 0.1, 3)
    dpo.policy_loss(logp, logp.detach(), ref, mask, 0.1, 3)[0].backward()
    h = logratios[:, 0] - logratios[:, 1]
    weight = (2 * torch.sigmoid(-0.1 * h)).repeat_interleave(2)[:, None]  # (2K, 1)
    assert torch.allclose(logp.grad, 0.1 * pg_grad * weight, atol=1e-8)
    assert not torch.allclose(logp.grad, 0.1 * pg_grad, atol=1e-4)  # the limit is honest: it holds only at h = 0


def test_dpo_update_with_no_pair_takes_no_optimizer_step():
    task, tok, model = tiny_policy()
    rollout, _ = ragged_rollout(tok, task, P, G)
    pairs = dpo.pair_rows(rollout, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    loss, stats, entropy, prefs = dpo.update(model, optimizer, pairs, pairs.completion_mask,
                                             pairs.completion_mask, 1, dpo.Args())
    assert loss.item() == 0 and stats["grad_norm"].item() == 0 and not optimizer.state
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ---------------------------------------------------------------------------------------------------------
# Micro-batches: the whole batch's gradient and log whatever --micro_batch is.


def test_dpo_micro_batches_are_exact_and_a_per_micro_batch_pair_mean_is_not(monkeypatch):
    # pairs from a batch whose first group's completions are 1 token long and last group's 10
    task, tok, model = tiny_policy()
    rollout, _ = ragged_rollout(tok, task, P, G)
    pairs = dpo.pair_rows(rollout, torch.tensor([0, 5, 8]), torch.tensor([1, 6, 11]))
    torch.manual_seed(1)
    with torch.no_grad():
        now = tt.token_logprobs(model, pairs)[0]
    old, ref = now + 0.3 * torch.randn(now.shape), now + 0.3 * torch.randn(now.shape)
    args = lambda mb: dpo.Args(prompts_per_step=P, micro_batch=mb, max_grad_norm=1e9)
    run = lambda opt, a: dpo.update(model, opt, pairs, old, ref, 1, a)
    compare(model, run, args)
    original = dpo.dpo_loss
    monkeypatch.setattr(dpo, "dpo_loss", lambda margin, beta, n: original(margin, beta, len(margin)))
    with pytest.raises(AssertionError, match="gradient differs"):
        compare(model, run, args)


# ---------------------------------------------------------------------------------------------------------
# The file as a user runs it, online and offline.


def lines(p):
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().splitlines()


@pytest.mark.parametrize("offline", [False, True])
def test_dpo_runs_end_to_end(short_run, offline):
    out = lines(short_run("minimal_dpo.py", *SHORT["dpo"], *(["--offline"] if offline else [])))
    if offline:
        assert out.pop(0).startswith("offline batches=2 pairs=")
    assert out[0].startswith("eval step=0") and out[-1].startswith("final test_acc=")
    first, second = step_record(out[1]), step_record(out[2])
    assert list(first) == SHARED_KEYS + ["chosen_logp", "rejected_logp", "margin", "pref_acc", "pairs"]
    # step 1: pi = pi_ref, every margin is exactly 0, the loss ln 2 and nothing is ranked right yet
    assert first["loss"] == "0.6931" and first["margin"] == "0.0000" and first["pref_acc"] == "0.0000"
    assert (second["gen_tokens"] == "0") == offline  # offline pairs were sampled before training
    if offline:
        assert second["ratio"] != "1.0000"  # ratio to the pairs' sampler, the base: the policy has moved


def test_online_and_offline_share_their_first_step(short_run):
    # the offline pool draws the same prompts and samples from the same base in the same order
    online, offline = lines(short_run("minimal_dpo.py", *SHORT["dpo"])), lines(short_run("minimal_dpo.py", *SHORT["dpo"], "--offline"))
    same = lambda line: {k: v for k, v in step_record(line).items() if k != "gen_tokens"}  # offline sampled before step 1
    assert same(online[1]) == same(offline[2]) and same(online[2]) != same(offline[3])


def test_offline_with_nothing_to_pair_stops_with_one_sentence(run_fast):
    # from random weights the add task's exact-match reward is 0 for every sample: every group ties
    p = run_fast("minimal_dpo.py", *SHORT["dpo"], "--offline", "--task", "add", "--warmup_steps", 0)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith("error: --offline: every group") and p.stderr.count("\n") == 1


# ---------------------------------------------------------------------------------------------------------
# The temperature pi and pi_ref are scored at.


def sampled_pairs(temperature):
    """Three pairs from a ragged batch said to be sampled at `temperature`: each group's best against its
    worst by a made-up reward."""
    task, tok, model = tiny_policy()
    rollout, _ = ragged_rollout(tok, task, 3, 4, temperature=temperature)
    rewards = torch.tensor([[0.0, 1.0, 0.5, 0.2], [0.9, 0.1, 0.3, 0.4], [0.2, 0.4, 0.0, 1.0]])
    chosen, rejected, _ = dpo.make_pairs(rewards)
    return model, dpo.pair_rows(rollout, chosen, rejected)


def dpo_loss_at(model, pairs, ref, temperature, beta=0.1):
    logp, entropy = tt.token_logprobs(model, pairs, temperature)
    margin = dpo.sequence_logratios(logp, ref, pairs.completion_mask) @ torch.tensor([1.0, -1.0])
    return -torch.nn.functional.logsigmoid(beta * margin).sum() / len(margin), entropy


def test_update_scores_the_policy_at_temperature_one_and_logs_the_sampling_entropy():
    model, pairs = sampled_pairs(0.7)
    mask = pairs.completion_mask
    torch.manual_seed(0)
    with torch.no_grad():
        old = tt.token_logprobs(model, pairs, 1.0)[0]
    ref = old + 0.3 * torch.randn_like(old)
    args = dpo.Args(group_size=4, prompts_per_step=3, micro_batch=1, max_grad_norm=1e9)
    grad, log = gradient_and_log(model, lambda opt: dpo.update(model, opt, pairs, old, ref, 1, args))
    grads = {}
    for temperature in (1.0, 0.7):
        model.zero_grad()
        loss, entropy = dpo_loss_at(model, pairs, ref, temperature)
        loss.backward()
        grads[temperature] = torch.cat([p.grad.flatten() for p in model.parameters()])
        if temperature == 1.0:
            assert log["value0"] == pytest.approx(loss.item(), rel=1e-5)
        else:  # the entropy logged: the distribution the tokens were sampled from, at 0.7
            assert log["value2"] == pytest.approx(((entropy * mask).sum() / mask.sum()).item(), rel=1e-5)
    assert torch.allclose(grad, grads[1.0], atol=1e-6), "the policy is not scored at temperature 1"
    assert ((grads[0.7] - grads[1.0]).norm() / grads[1.0].norm()) > 0.05  # 0.7 would read differently
    assert log["ratio"] == pytest.approx(1.0, abs=1e-6)  # pi_old and pi at the same temperature


def test_the_loop_scores_pi_old_and_the_reference_at_temperature_one(monkeypatch, run_fast):
    seen, setup, update = {}, tt.setup, dpo.update

    def spy_setup(*a, **k):
        out = setup(*a, **k)
        seen["base"] = copy.deepcopy(out[1])
        return out

    def spy_update(model, optimizer, pairs, old_logp, ref_logp, step, args):
        seen.setdefault("calls", []).append((copy.deepcopy(model), pairs, old_logp, ref_logp))
        return update(model, optimizer, pairs, old_logp, ref_logp, step, args)
    monkeypatch.setattr(tt, "setup", spy_setup)
    monkeypatch.setattr(dpo, "update", spy_update)
    p = run_fast("minimal_dpo.py", *FAST, "--temperature", 0.7)
    assert p.returncode == 0, p.stderr
    assert len(seen["calls"]) == 2
    gap = 0.0
    for sampler, pairs, old_logp, ref_logp in seen["calls"]:  # one epoch: the model that sampled
        mask = pairs.completion_mask
        assert pairs.temperature == 0.7 and mask.sum() > 0
        for got, model in ((old_logp, sampler), (ref_logp, seen["base"])):
            assert torch.allclose(got * mask, tt.score(model, pairs, temperature=1.0)[0] * mask, atol=1e-5)
            gap = max(gap, ((got - tt.score(model, pairs)[0]) * mask).abs().max().item())  # at 0.7
    assert gap > 0.1
