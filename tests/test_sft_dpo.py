"""Tests of minimal_sft.py and minimal_dpo.py: the SFT loss and its normaliser, rejection sampling's choice,
DPO's pairs, loss, gradient and preference accuracy against hand-worked numbers; where each meets a
policy gradient and where it stops meeting it; micro-batches that add up exactly; both files end to end."""

import pytest
import torch

import microbatch as mbt
import minimal_dpo as dpo
import minimal_pg as pg
import minimal_sft as sft
import toy_tasks as tt

FAST = ["--steps", 2, "--warmup_steps", 2, "--eval_every", 0, "--prompts_per_step", 4]
SHARED_KEYS = ["step", "reward", "loss", "entropy", "ratio", "clip_frac", "kl", "grad_norm", "len", "gen_tokens"]
P, G = 3, 4


# ---------------------------------------------------------------------------------------------
# SFT: the token-mean NLL, the best-of-group choice, and the empty step.


def test_sft_loss_is_one_token_mean_over_the_batch():
    # Two targets of 1 and 3 tokens, log-probs [-1] and [-2, -1, -3]: the NLL summed over the 4 target
    # tokens is 1 + 6 = 7, so the token mean is 7/4 = 1.75 (a mean of per-sequence means would be
    # (1 + 2)/2 = 1.5). Every target token gets gradient -1/4, padding 0.
    logp = torch.tensor([[-1.0, -5.0, -5.0], [-2.0, -1.0, -3.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    loss, stats = sft.sft_loss(logp, logp.detach(), mask, mask.sum())
    assert loss.item() == pytest.approx(1.75)
    loss.backward()
    assert torch.equal(logp.grad, -mask / 4)
    assert stats["ratio"] == 1 and stats["clip_frac"] == 0 and stats["kl"] == 0  # one step per batch


def test_best_of_group_keeps_the_first_fully_right_completion():
    rewards = torch.tensor([[0.5, 1.0, 1.0, 0.0],  # two right: the first, column 1
                            [0.2, 0.8, 0.8, 0.1],  # best 0.8 is not fully right: skipped
                            [1.0, 1.0, 1.0, 1.0],  # all right (PG's advantage is 0 here): column 0
                            [0.0, 0.0, 0.0, 1.0]])
    keep = sft.best_of_group(rewards)
    assert keep.tolist() == [[False, True, False, False], [False] * 4, [True, False, False, False],
                             [False, False, False, True]]


def test_best_of_group_can_keep_nothing():
    assert not sft.best_of_group(torch.tensor([[0.5, 0.75], [0.0, 0.0]])).any()


def test_a_step_with_nothing_to_imitate_takes_no_optimizer_step():
    task, tok, model = mbt.tiny_policy()
    rollout, _ = mbt.ragged_rollout(tok, task, P, G)
    empty = rollout.select(torch.zeros(P * G, dtype=torch.bool))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    for _ in range(2):  # the second call would move the weights through AdamW's momentum and weight decay
        loss, stats, entropy = sft.update(model, optimizer, empty, 1, sft.Args())
    assert loss.item() == 0 and stats["grad_norm"].item() == 0 and entropy.item() == 0  # logged as 0, kept=0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not optimizer.state  # AdamW never stepped


def test_demo_rollout_is_answer_then_eos():
    task, tok, model = mbt.tiny_policy()
    examples = [tt.Example("abc=", "cba", "cba"), tt.Example("dabcd=", "dcbad", "dcbad")]
    r = sft.demo_rollout(tok, task, examples, "cpu")
    assert r.lengths.tolist() == [4.0, 6.0] and r.texts == ["cba", "dcbad"]
    assert r.completion_ids[0, 3].item() == tok.eos_token_id and r.completion_mask[0, 4:].sum() == 0
    assert tok.decode(r.completion_ids[1, :5]) == "dcbad" and not r.truncated.any()
    assert task.rewards(r.texts, examples).tolist() == [1.0, 1.0]  # what the step trains on earns reward 1


def binary_batch():
    """3 groups of 4 completions with ragged lengths and a binary reward, exactly one right per group."""
    torch.manual_seed(0)
    logp = (-torch.rand(P * G, 5) * 2).requires_grad_()  # (N, T)
    mask = (torch.arange(5)[None, :] < torch.randint(1, 6, (P * G, 1))).float()  # lengths 1..5
    rewards = torch.zeros(P, G)
    rewards[0, 2] = rewards[1, 0] = rewards[2, 3] = 1.0
    return logp, mask, rewards


def test_rejection_sampling_is_pg_on_the_right_completions_without_the_wrong_ones():
    # With exactly one right completion in a group of G, PG's leave-one-out advantage is
    # G/(G-1) (1 - 1/G) = 1 on it and G/(G-1) (0 - 1/G) = -1/(G-1) on the G - 1 wrong ones. So PG's gradient
    # = SFT's on the kept completions times tokens/n (SFT divides by the kept tokens, PG by the n
    # completions) + the push down on the wrong ones, which SFT does not have.
    logp, mask, rewards = binary_batch()
    n = P * G
    adv = pg.group_advantages(rewards).view(-1)
    pg.policy_loss(logp, logp.detach(), adv, mask, n)[0].backward()
    pg_grad, logp.grad = logp.grad.clone(), None
    keep = sft.best_of_group(rewards).view(-1)
    tokens = mask[keep].sum()
    sft.sft_loss(logp[keep], logp[keep].detach(), mask[keep], tokens)[0].backward()
    negatives = torch.where(keep[:, None], 0.0, 1 / (G - 1)) * mask / n  # d(-A logp)/dlogp, A = -1/(G-1)
    assert torch.allclose(pg_grad, logp.grad * tokens / n + negatives, atol=1e-7)


def test_where_rejection_sampling_and_pg_part():
    # Two right completions of four: PG weights each by G/(G-1) (1 - 2/G) = 2/3; SFT imitates the first
    # with weight 1 and ignores the second. All four right: PG's advantage is 0, SFT still imitates one.
    rewards = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    adv = pg.group_advantages(rewards)
    assert torch.allclose(adv[0], torch.tensor([2 / 3, -2 / 3, 2 / 3, -2 / 3])) and torch.equal(adv[1], torch.zeros(4))
    assert sft.best_of_group(rewards).float().tolist() == [[1, 0, 0, 0], [1, 0, 0, 0]]


# ---------------------------------------------------------------------------------------------
# DPO: pairs, the loss and its gradient, the preference accuracy.


def test_make_pairs_best_against_worst_ties_and_flat_groups():
    rewards = torch.tensor([[0.5, 1.0, 1.0, 0.0, 0.0],  # best: first of the two 1s (row 1); worst: first 0 (row 3)
                            [0.3, 0.3, 0.3, 0.3, 0.3],  # all tie: no pair
                            [0.0, 0.2, 0.2, 0.1, 0.0]])  # rows 10-14: best row 11, worst row 10
    chosen, rejected, formed = dpo.make_pairs(rewards)
    assert chosen.tolist() == [1, 11] and rejected.tolist() == [3, 10] and formed.tolist() == [True, False, True]
    flat = torch.tensor([[0.6] * 8])  # a float32 mean of eight 0.6s is off by a rounding step: max == min still
    assert not dpo.make_pairs(flat)[2].any()


def test_pair_rows_interleave_chosen_and_rejected():
    task, tok, model = mbt.tiny_policy()
    rollout, _ = mbt.ragged_rollout(tok, task, P, G)
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
    task, tok, model = mbt.tiny_policy()
    rollout, _ = mbt.ragged_rollout(tok, task, P, G)
    pairs = dpo.pair_rows(rollout, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    loss, stats, entropy, prefs = dpo.update(model, optimizer, pairs, pairs.completion_mask,
                                             pairs.completion_mask, 1, dpo.Args())
    assert loss.item() == 0 and stats["grad_norm"].item() == 0 and not optimizer.state
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ---------------------------------------------------------------------------------------------
# Micro-batches: the whole batch's gradient and log whatever --micro_batch is.


def compare(model, run, args_for):
    results = {mb: mbt.gradient_and_log(model, lambda opt: run(opt, args_for(mb))) for mb in (0, 1, 2)}
    return mbt.assert_same_update(results)


def test_sft_micro_batches_are_exact_and_a_per_micro_batch_token_mean_is_not(monkeypatch):
    # one target per prompt: 12 targets of 1 to 10 tokens, micro-batches of 1 and 2 targets
    task, tok, model = mbt.tiny_policy()
    rollout, _ = mbt.ragged_rollout(tok, task, P, G)
    args = lambda mb: sft.Args(prompts_per_step=P * G, micro_batch=mb, max_grad_norm=1e9)
    run = lambda opt, a: sft.update(model, opt, rollout, 1, a)
    compare(model, run, args)
    monkeypatch.setattr(sft, "aggregate", lambda per_token, mask, tokens: (per_token * mask).sum() / mask.sum())
    with pytest.raises(AssertionError, match="gradient differs"):
        compare(model, run, args)


def test_dpo_micro_batches_are_exact_and_a_per_micro_batch_pair_mean_is_not(monkeypatch):
    # pairs from a batch whose first group's completions are 1 token long and last group's 10
    task, tok, model = mbt.tiny_policy()
    rollout, _ = mbt.ragged_rollout(tok, task, P, G)
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


# ---------------------------------------------------------------------------------------------
# End to end, in process.


def lines(p):
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().splitlines()


def step_record(line):
    return dict(kv.split("=") for kv in line.split())


@pytest.mark.parametrize("source,extra", [("demo", []), ("best", ["sampled_reward", "kept"])])
def test_sft_runs_end_to_end(run_fast, source, extra):
    out = lines(run_fast("minimal_sft.py", *FAST, "--source", source))
    assert out[0].startswith("eval step=0") and out[-1].startswith("final test_acc=")
    rec = step_record(out[1])
    assert list(rec) == SHARED_KEYS + ["nll"] + extra
    assert rec["ratio"] == "1.0000" and rec["clip_frac"] == "0.0000" and rec["kl"] == "0.0000"
    assert rec["nll"] == rec["loss"]
    if source == "demo":
        assert rec["reward"] == "1.0000" and rec["gen_tokens"] == "0"
    else:
        assert int(rec["gen_tokens"]) > 0 and 0 <= float(rec["kept"]) <= 1


@pytest.mark.parametrize("offline", [False, True])
def test_dpo_runs_end_to_end(run_fast, offline):
    out = lines(run_fast("minimal_dpo.py", *FAST, *(["--offline"] if offline else [])))
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


def test_online_and_offline_share_their_first_step(run_fast):
    # the offline pool draws the same prompts and samples from the same base in the same order
    online, offline = lines(run_fast("minimal_dpo.py", *FAST)), lines(run_fast("minimal_dpo.py", *FAST, "--offline"))
    same = lambda line: {k: v for k, v in step_record(line).items() if k != "gen_tokens"}  # offline sampled before step 1
    assert same(online[1]) == same(offline[2]) and same(online[2]) != same(offline[3])


@pytest.mark.parametrize("script,flags", [("minimal_sft.py", ["--source", "demo"]), ("minimal_sft.py", ["--source", "best"]),
                                          ("minimal_dpo.py", []), ("minimal_dpo.py", ["--offline"])])
def test_one_step_with_micro_batches_prints_the_same_line(run_fast, script, flags):
    args = ["--steps", 1, "--warmup_steps", 2, "--eval_every", 0, "--prompts_per_step", 4, *flags]
    first_step = lambda out: step_record(next(ln for ln in out if ln.startswith("step=1 ")))
    whole = first_step(lines(run_fast(script, *args)))
    split = first_step(lines(run_fast(script, *args, "--micro_batch", 1)))
    assert whole.keys() == split.keys()
    for key in whole:  # 0 where a step kept nothing (--source best on a 2-step warm-up)
        assert float(split[key]) == pytest.approx(float(whole[key]), rel=5e-4, abs=1e-4), key


@pytest.mark.parametrize("script,flags", [("minimal_sft.py", ["--source", "best"]), ("minimal_dpo.py", ["--offline"])])
def test_same_seed_same_lines(run_fast, script, flags):
    args = [*FAST, "--steps", 3, "--eval_every", 2, *flags]
    strip = lambda out: [ln.split(" time_s=")[0] for ln in out.splitlines()]
    a, b = run_fast(script, *args), run_fast(script, *args)
    assert a.returncode == 0 and strip(a.stdout) == strip(b.stdout)
    assert strip(run_fast(script, *args, "--seed", 1).stdout) != strip(a.stdout)


@pytest.mark.parametrize("script,flags,flag", [
    ("minimal_sft.py", ["--source", "teacher"], "--source"),
    ("minimal_sft.py", ["--group_size", 0], "--group_size"),
    ("minimal_dpo.py", ["--beta", 0], "--beta"),
    ("minimal_dpo.py", ["--beta", -0.1], "--beta"),
    ("minimal_dpo.py", ["--group_size", 1], "--group_size"),
    ("minimal_dpo.py", ["--offline_batches", 3], "--offline_batches"),
    ("minimal_dpo.py", ["--epochs", 0], "--epochs"),
])
def test_bad_flags_stop_with_one_sentence(run_fast, script, flags, flag):
    p = run_fast(script, *FAST, *flags)
    assert p.returncode == 2 and p.stdout == ""  # before any work: not even the base evaluation
    assert p.stderr.startswith(f"error: {flag}") and p.stderr.count("\n") == 1


def test_offline_with_nothing_to_pair_stops_with_one_sentence(run_fast):
    # from random weights the add task's exact-match reward is 0 for every sample: every group ties
    p = run_fast("minimal_dpo.py", *FAST, "--offline", "--task", "add", "--warmup_steps", 0)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith("error: --offline: every group") and p.stderr.count("\n") == 1


@pytest.mark.slow
@pytest.mark.parametrize("script,flags", [("minimal_sft.py", ["--source", "best"]), ("minimal_dpo.py", [])])
def test_same_seed_same_lines_across_processes(run, script, flags):
    args = [*FAST, "--steps", 3, "--eval_every", 2, *flags]
    strip = lambda out: [ln.split(" time_s=")[0] for ln in out.splitlines()]
    a, b = run(script, *args), run(script, *args)
    assert a.returncode == 0 and strip(a.stdout) == strip(b.stdout)
