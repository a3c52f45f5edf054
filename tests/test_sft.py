"""Tests of minimal_sft.py: the SFT loss and its normaliser, rejection sampling's choice against hand-worked
numbers; where it meets a policy gradient and where it stops meeting it; micro-batches that add up exactly
(a per-micro-batch token mean would not); the file end to end; and its loop, spied on in a two-step run: the
loss's normaliser counts the target's tokens only (each answer's characters and its EOS), never the
prompt's, the padding, or one micro-batch's."""
import pytest
import torch

import minimal_pg as pg
import minimal_sft as sft
import toy_tasks as tt
from conftest import SHARED_KEYS, SHORT, compare, ragged_rollout, step_record, tiny_policy

# demos: they need no competent base, and their answers are ragged. --source best trains through the same
# update() (test_every_file.py runs it); its targets need a base that gets one of 8 samples fully right.
FAST = ["--steps", 2, "--warmup_steps", 2, "--eval_every", 0, "--prompts_per_step", 4, "--micro_batch", 2]
P, G = 3, 4


# ---------------------------------------------------------------------------------------------------------
# The token-mean NLL, the best-of-group choice, the empty step, and where rejection sampling meets PG.


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
    task, tok, model = tiny_policy()
    rollout, _ = ragged_rollout(tok, task, P, G)
    empty = rollout.select(torch.zeros(P * G, dtype=torch.bool))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    for _ in range(2):  # the second call would move the weights through AdamW's momentum and weight decay
        loss, stats, entropy = sft.update(model, optimizer, empty, 1, sft.Args())
    assert loss.item() == 0 and stats["grad_norm"].item() == 0 and entropy.item() == 0  # logged as 0, kept=0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not optimizer.state  # AdamW never stepped


def test_demo_rollout_is_answer_then_eos():
    task, tok, model = tiny_policy()
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


# ---------------------------------------------------------------------------------------------------------
# Micro-batches: the whole batch's gradient and log whatever --micro_batch is.


def test_sft_micro_batches_are_exact_and_a_per_micro_batch_token_mean_is_not(monkeypatch):
    # one target per prompt: 12 targets of 1 to 10 tokens, micro-batches of 1 and 2 targets
    task, tok, model = tiny_policy()
    rollout, _ = ragged_rollout(tok, task, P, G)
    args = lambda mb: sft.Args(prompts_per_step=P * G, micro_batch=mb, max_grad_norm=1e9)
    run = lambda opt, a: sft.update(model, opt, rollout, 1, a)
    compare(model, run, args)
    monkeypatch.setattr(sft, "aggregate", lambda per_token, mask, tokens: (per_token * mask).sum() / mask.sum())
    with pytest.raises(AssertionError, match="gradient differs"):
        compare(model, run, args)


# ---------------------------------------------------------------------------------------------------------
# The file as a user runs it.


def lines(p):
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().splitlines()


@pytest.mark.parametrize("source,extra", [("demo", []), ("best", ["sampled_reward", "kept"])])
def test_sft_runs_end_to_end(short_run, source, extra):
    out = lines(short_run("minimal_sft.py", *SHORT["sft"], "--source", source))
    assert out[0].startswith("eval step=0") and out[-1].startswith("final test_acc=")
    rec = step_record(out[1])
    assert list(rec) == SHARED_KEYS + ["nll"] + extra
    assert rec["ratio"] == "1.0000" and rec["clip_frac"] == "0.0000" and rec["kl"] == "0.0000"
    assert rec["nll"] == rec["loss"]
    if source == "demo":
        assert rec["reward"] == "1.0000" and rec["gen_tokens"] == "0"
    else:
        assert int(rec["gen_tokens"]) > 0 and 0 <= float(rec["kept"]) <= 1


# ---------------------------------------------------------------------------------------------------------
# The loop, spied on in a two-step run.


def test_the_normaliser_counts_only_the_targets_tokens(monkeypatch, run_fast):
    updates, losses = [], []
    update, sft_loss = sft.update, sft.sft_loss

    def spy_update(model, optimizer, rollout, step, args):
        before, first = {k: v.clone() for k, v in model.state_dict().items()}, len(losses)
        out = update(model, optimizer, rollout, step, args)
        updates.append((model, before, rollout, out[0], first))
        return out
    monkeypatch.setattr(sft, "update", spy_update)
    monkeypatch.setattr(sft, "sft_loss", lambda *a: losses.append(a[3]) or sft_loss(*a))
    p = run_fast("minimal_sft.py", *FAST, "--source", "demo")
    assert p.returncode == 0, p.stderr
    for model, before, rollout, loss, first in updates:
        # the target's tokens, counted from its text: one token per character, plus the EOS it ends with
        targets = sum(len(t) + (not cut) for t, cut in zip(rollout.texts, rollout.truncated.tolist()))
        assert targets == rollout.completion_mask.sum()
        assert targets < rollout.completion_mask.numel()  # ragged targets: the padding would count otherwise
        parts = losses[first:first + len(tt.micro_batches(len(rollout.texts), 2))]  # this update's micro-batches
        assert parts and all(tokens == targets for tokens in parts), \
            f"the normaliser is {parts}, the targets hold {targets} tokens"
        # and the loss the update reports is the mean NLL over those tokens, under the policy it started from
        after = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(before)
        logp, _ = tt.score(model, rollout)
        model.load_state_dict(after)
        assert float(loss) == pytest.approx(-(logp * rollout.completion_mask).sum().item() / targets, rel=1e-5)
    assert len(updates) == 2
