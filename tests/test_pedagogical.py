"""Tests of minimal_pedagogical.py and its task: the surprise gaps, the spike penalty and its limits,
the learnability, the student's gate and loss against hand-worked numbers; the learnability pass sees
no context and builds no graph; the keyed task's verifier, keys and held-out scoring; the limit where
the teacher's update is its parent's; the main loop's views and the student's update; and the file end to
end as a user runs it. (The reference clipped surrogate, micro-batches, repeatability and bad flags:
test_every_file.py.)"""
import math
import random
from types import SimpleNamespace

import pytest
import torch

import minimal_grpo as grpo
import minimal_pedagogical as ped
import toy_tasks as tt
from conftest import (SHARED_KEYS, SHORT, Spy, check_epochs, check_update_in_situ, gradient_and_log, score,
                      tiny_policy)

FAST = SHORT["pedagogical"]  # two steps, the teacher's two warm-ups cut to 2 steps
OWN_KEYS = ["task_reward", "learnability", "spike", "key_rate", "gate", "student_loss"]


# ---------------------------------------------------------------------------------------------
# Surprise gaps, spike penalty, learnability.


def test_surprise_gap_hand_worked():
    # student probabilities over 3 tokens [0.5, 0.3, 0.2] at both positions; the teacher wrote token 1
    # then token 0: gaps log(0.5/0.3) = 0.510826 and 0 (the student's own choice)
    logp_all = torch.log(torch.tensor([[[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]]]))  # (1, 2, 3)
    gaps = ped.surprise_gaps(logp_all, torch.tensor([[1, 0]]))
    assert torch.allclose(gaps, torch.tensor([[0.510826, 0.0]]), atol=1e-6)


def test_spike_penalty_hand_worked():
    gaps, mask = torch.tensor([[0.0, 1.0, 0.0]]), torch.ones(1, 3)
    # beta = 1: log(e^0 + e^1 + e^0) - log 3 = log(4.718282) - 1.098612 = 0.452832
    assert ped.spike_penalty(gaps, mask, 1.0).item() == pytest.approx(0.452832, abs=1e-6)
    # beta = 5: (log(2 + e^5) - log 3) / 5 = (5.013386 - 1.098612) / 5 = 0.782955
    assert ped.spike_penalty(gaps, mask, 5.0).item() == pytest.approx(0.782955, abs=1e-6)
    # learnability exp(-0.5 * 0.782955) = 0.676057; lambda = 0 gives exactly 1
    spike = ped.spike_penalty(gaps, mask, 5.0)
    assert ped.learnability(spike, 0.5).item() == pytest.approx(0.676057, abs=1e-6)
    assert ped.learnability(spike, 0.0).item() == 1.0


def test_spike_penalty_limits_are_the_mean_and_the_max_gap():
    gaps, mask = torch.tensor([[0.0, 1.0, 0.0, 2.0]], dtype=torch.float64), torch.ones(1, 4, dtype=torch.float64)
    # beta -> 0: the mean gap, 3/4 (the first-order term of the soft max)
    assert ped.spike_penalty(gaps, mask, 1e-6).item() == pytest.approx(0.75, abs=1e-5)
    # beta -> infinity: the largest gap, 2; at finite beta it sits within log(n)/beta below it
    big = ped.spike_penalty(gaps, mask, 500.0).item()
    assert 2 - math.log(4) / 500 - 1e-9 <= big <= 2
    # and in between it rises with beta, from the mean towards the max
    values = [ped.spike_penalty(gaps, mask, b).item() for b in (0.1, 1.0, 5.0, 50.0)]
    assert values == sorted(values) and 0.75 < values[0] and values[-1] < 2


def test_log_n_counts_only_real_tokens():
    # two real tokens (EOS included) and one padded slot whose gap is garbage: spike must be that of [0, 1]
    # with n = 2, beta = 1: log(1 + e) - log 2 = 1.313262 - 0.693147 = 0.620115, whatever the padding holds
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    for pad in (0.0, 7.0, 100.0):
        p = ped.spike_penalty(torch.tensor([[0.0, 1.0, pad]]), mask, 1.0)
        assert p.item() == pytest.approx(0.620115, abs=1e-6)
    # a completion with no gap at all costs nothing: spike = (log n - log n) / beta = 0, learnability 1
    assert ped.spike_penalty(torch.zeros(1, 3), mask, 5.0).item() == pytest.approx(0.0, abs=1e-7)


def test_teacher_reward_lambda_zero_ties_every_correct_answer():
    # a group of 4: reversal, key, reversal, wrong. With lambda = 0.5 the reversal (learnability 0.9) beats
    # the key (0.5): R' = [0.9, 0.5, 0.9, 0]; with lambda = 0 every correct answer earns 1 and the teacher
    # learns nothing about which one to write
    rewards = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv = ped.group_advantages(rewards * torch.tensor([[0.9, 0.5, 0.9, 0.7]]))
    assert adv[0, 0] > adv[0, 1] > adv[0, 3] and adv[0, 0] == adv[0, 2]
    adv0 = ped.group_advantages(rewards * ped.learnability(torch.tensor([[0.2, 1.4, 0.2, 0.7]]), 0.0))
    assert adv0[0, 0] == adv0[0, 1] == adv0[0, 2]
    # an all-correct group at lambda = 0 is flat: exactly zero advantage
    assert torch.equal(ped.group_advantages(torch.ones(1, 8) * ped.learnability(torch.rand(1, 8), 0.0)),
                       torch.zeros(1, 8))


def test_a_float32_tie_gets_exactly_zero_where_the_sandbox_rule_does_not():
    # eight 0.6s in float32: the mean is one rounding step off (6e-8) and so is the population std, which
    # passes the sandbox's test std > 1e-8; (0.6 - mean) / (std + 1e-8) = 5.96e-8 / 6.96e-8 = +0.856 for
    # all eight, a push towards a completion no better than its siblings. The file tests max == min: 0.
    r = torch.full((1, 8), 0.6)
    mean, std = r.mean(1, keepdim=True), r.std(1, unbiased=False, keepdim=True)
    sandbox = torch.where(std > 1e-8, (r - mean) / (std + 1e-8), torch.zeros_like(r))
    assert torch.allclose(sandbox, torch.full((1, 8), 0.856331), atol=1e-5)
    assert torch.equal(ped.group_advantages(r), torch.zeros(1, 8))


# ---------------------------------------------------------------------------------------------
# The student's gate and loss.


def test_gate_values():
    gamma, kappa = -2.5, 4.0
    logp = torch.log(torch.tensor([math.exp(-2.5), 0.14, 0.05, 0.01]))
    w = ped.imitation_gate(logp, kappa, gamma)
    # sigmoid(0) = 1/2 at gamma; p = 0.14: sigmoid(4 (-1.966113 + 2.5)) = sigmoid(2.135549) = 0.894311;
    # p = 0.05: sigmoid(-1.982929) = 0.121007; p = 0.01: sigmoid(-8.420681) = 0.000220
    assert torch.allclose(w, torch.tensor([0.5, 0.894311, 0.121007, 0.000220]), atol=1e-6)


def test_imitation_loss_normalises_each_completion_by_its_gate_mass():
    # completion 1: log-probs [log 0.5, gamma], two real tokens. w = [sigmoid(4 (2.5 - 0.693147)),
    # sigmoid(0)] = [0.999274, 0.5]; its loss (0.999274 * 0.693147 + 0.5 * 2.5) / 1.499274 = 1.295723.
    # completion 2: [gamma, padding]: one real token, w = 0.5, loss 0.5 * 2.5 / 0.5 = 2.5 (not halved by T).
    # mean over the two: 1.897862
    logp = torch.tensor([[math.log(0.5), -2.5], [-2.5, -9.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, gate = ped.imitation_loss(logp, mask, 4.0, -2.5, 2)
    assert loss.item() == pytest.approx(1.897862, abs=1e-6)
    assert gate.item() == pytest.approx((0.999274 + 0.5 + 0.5) / 3, abs=1e-6)  # mean over real tokens
    # no gradient through the gate: d loss / d logp_t = -w_t / sum_t w_t / B, 0 on padding
    loss.backward()
    w = ped.imitation_gate(logp.detach(), 4.0, -2.5) * mask
    assert torch.allclose(logp.grad, -(w / w.sum(1, keepdim=True)) / 2, atol=1e-7)
    assert logp.grad[1, 1] == 0


# ---------------------------------------------------------------------------------------------
# The learnability pass: student view, temperature 1, no graph.


def test_learnability_pass_sees_no_context_and_builds_no_graph():
    task, tok, student = tiny_policy("keyed", warmup=0)
    teacher = tiny_policy("keyed", 1, warmup=0)[2]
    examples = task.test[:4]
    ids, pmask = tt.encode(tok, [task.teacher_prompt(ex) for ex in examples], "cpu")
    torch.manual_seed(2)
    rollout = tt.sample(teacher, tok, ids, pmask, 10, temperature=0.5)  # sampled at temperature 0.5
    view = tt.with_prompts(rollout, tok, [ex.prompt for ex in examples], "cpu")
    seen = [tok.decode(row, skip_special_tokens=True) for row in view.prompt_ids]
    assert seen == [ex.prompt for ex in examples] and not any("|" in s for s in seen)  # no context
    assert torch.equal(view.completion_ids, rollout.completion_ids)
    args = SimpleNamespace(spike_beta=5.0, lam=0.5, micro_batch=0, group_size=1)
    learn, spike = ped.learnability_pass(student, view, args)
    assert not learn.requires_grad and not spike.requires_grad and learn.grad_fn is None
    assert all(p.grad is None for p in student.parameters())
    # scored at temperature 1, not the teacher's 0.5: the same numbers as from untempered logits
    with torch.no_grad():
        logp_all = tt.completion_logits(student, view, 1.0).log_softmax(-1)
    expected = ped.spike_penalty(ped.surprise_gaps(logp_all, view.completion_ids), view.completion_mask, 5.0)
    assert torch.allclose(spike, expected, atol=1e-6)
    # and the context would have changed them: scoring the teacher's view gives other numbers
    assert not torch.allclose(ped.learnability_pass(student, rollout, args)[1], spike)


# ---------------------------------------------------------------------------------------------
# The keyed task.


def test_keyed_verifier_accepts_the_reversal_and_the_key_only():
    task = tt.make_task("keyed")
    ex = tt.Example("abcd=", "dcba", "")
    key = task.key("abcd")[0]
    assert key == "ccba"  # pinned: a str seed is hashed with SHA-512, the same in every process
    assert task.reward("dcba", ex) == 1.0 and task.reward(key, ex) == 1.0
    assert task.reward("dcbb", ex) == 0.0 and task.reward("", ex) == 0.0 and task.reward("dcbaa", ex) == 0.0


def test_keys_are_seeded_never_the_reversal_and_the_context_lists_both():
    task, again = tt.make_task("keyed"), tt.make_task("keyed")
    rng = random.Random(0)
    examples = task.sample(rng, 2000) + task.test
    firsts = 0
    for ex in examples:
        s, rev = ex.prompt[:-1], ex.prompt[:-1][::-1]
        key, key_first = task.key(s)
        assert key == again.key(s)[0] and key != rev and len(key) == len(rev)
        assert key[1:] == rev[1:] and key[0] != rev[0]  # only the first character differs
        assert ex.answer == rev and ex.context == (f"{key}|{rev}" if key_first else f"{rev}|{key}")
        assert task.teacher_prompt(ex) == ex.context + "|" + ex.prompt
        firsts += key_first
    assert 0.45 < firsts / len(examples) < 0.55  # both orders occur, about equally often
    # the same prompts as the reverse task draws: the same held-out set, the same training strings
    reverse = tt.make_task("reverse")
    assert [e.prompt for e in task.test] == [e.prompt for e in reverse.test]
    assert [e.prompt for e in task.sample(random.Random(3), 50)] == [e.prompt for e in reverse.sample(random.Random(3), 50)]


def test_held_out_scoring_is_against_the_reversal_alone(monkeypatch):
    """A student that writes every key is perfectly 'correct' by the verifier and scores 0 exact match."""
    task, tok, _ = tiny_policy("keyed", warmup=0)
    keys = [task.key(ex.prompt[:-1])[0] for ex in task.test]
    revs = [ex.answer for ex in task.test]
    for texts, exact in ((keys, 0.0), (revs, 1.0)):
        def fake_sample(model, tok, ids, mask, max_new_tokens, temperature=1.0, greedy=False, texts=texts):
            k = ids.size(0) // len(texts)  # sampled_exact asks for several samples per prompt
            return SimpleNamespace(texts=[t for t in texts for _ in range(k)], completion_mask=torch.ones(len(ids), 1))
        monkeypatch.setattr(tt, "sample", fake_sample)
        monkeypatch.setattr(tt, "score", lambda model, r, rows=0: (None, torch.zeros(len(r.texts), 1)))
        assert tt.evaluate(torch.nn.Linear(1, 1), tok, task, "cpu", 10)[1] == exact
        assert tt.sampled_exact(torch.nn.Linear(1, 1), tok, task, torch.device("cpu"), 10) == exact
    assert all(task.reward(k, ex) == 1 for k, ex in zip(keys, task.test))
    other = tt.is_other_answer(keys + revs, [1.0] * 512, task.test + task.test)
    assert other[:256].sum() == 256 and other[256:].sum() == 0  # key_rate counts keys, not reversals


def test_copy_view_and_sampled_eval_leave_the_training_stream_alone():
    task, tok, model = tiny_policy("keyed", warmup=0)
    ex = task.test[0]
    assert tt.copy_view(task, ex) == (task.teacher_prompt(ex), ex.context.split("|")[0])
    drawn = {tt.copy_view(task, ex, random.Random(i))[1] for i in range(20)}
    assert drawn == set(ex.context.split("|"))
    torch.manual_seed(5)
    a = torch.rand(3)
    torch.manual_seed(5)
    tt.sampled_exact(model, tok, task, torch.device("cpu"), 10, samples=1)
    assert torch.equal(torch.rand(3), a)  # evaluating did not move the training's random stream


# ---------------------------------------------------------------------------------------------
# The limit where the teacher's update is its parent's.


def test_teacher_update_equals_grpo_without_kl():
    """With lambda = 0 the teacher's advantage is GRPO's on the task reward, and its clipped loss is
    GRPO's with beta = 0, value and gradient, clip fraction and ratio."""
    torch.manual_seed(0)
    rewards = (torch.rand(4, 8) > 0.5).float()
    learn = ped.learnability(torch.rand(4, 8) * 3, 0.0)
    assert torch.equal(ped.group_advantages(rewards * learn), grpo.group_advantages(rewards))
    old = -torch.rand(32, 6) * 2
    logp_a = (old + 0.3 * torch.randn(32, 6)).requires_grad_()
    logp_b = logp_a.detach().clone().requires_grad_()
    adv, mask = grpo.group_advantages(rewards).view(-1), (torch.rand(32, 6) < 0.8).float()
    loss_a, stats_a = ped.policy_loss(logp_a, old, adv, mask, 0.2, 32)
    loss_b, stats_b = grpo.policy_loss(logp_b, old, old, adv, mask, 0.2, beta=0.0, n=32)
    loss_a.backward()
    loss_b.backward()
    assert torch.allclose(loss_a, loss_b) and torch.allclose(logp_a.grad, logp_b.grad)
    assert stats_a["clip_frac"] == stats_b["clip_frac"] and stats_a["ratio"] == stats_b["ratio"]


# ---------------------------------------------------------------------------------------------
# The main loop, spied on in a two-step run (--epochs 2 --temperature 0.7): the teacher samples with its
# context, the student never sees it, --shared shares; and the student's update.

PED = ["--steps", 2, "--warmup_steps", 2, "--eval_every", 0, "--prompts_per_step", 4,  # 4 prompts, 8 imitated
       "--teacher_warmup_steps", 2, "--teacher_mix_steps", 2, "--student_batch", 8]


def student_prompt(tok, ids):
    """A left-padded prompt row as text: the teacher view is 'context|prompt', the student view 'prompt'."""
    return tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("shared", [False, True])
def test_pedagogical_wiring_and_views(monkeypatch, run_fast, shared):
    spy = Spy(monkeypatch)
    spy.sampler(tt, "rollout_groups")
    for name in ("update", "learnability_pass", "student_update"):
        spy.record(ped, name)
    p = run_fast("minimal_pedagogical.py", *PED, "--epochs", 2, "--temperature", 0.7,
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
    task, tok, student = tiny_policy("keyed")
    teacher = tiny_policy("keyed", seed=1)[2]
    tt.supervised_warmup(teacher, tok, task, 20, 0, view=lambda ex: tt.copy_view(task, ex))  # reads its context
    examples = task.test[:6]
    args = ped.Args(temperature=0.7, student_batch=6, micro_batch=2, max_grad_norm=1e9)
    torch.manual_seed(4)
    grad, log = gradient_and_log(student, lambda opt: ped.student_update(student, opt, teacher, tok, task,
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
# End to end, as a user runs it.


def test_runs_end_to_end_with_the_output_contract(short_run):
    p = short_run("minimal_pedagogical.py", *FAST)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert lines[0].startswith("teacher copy_acc=") and " key_rate=" in lines[0]
    assert lines[1].startswith("eval step=0 test_acc=") and " sampled_exact=" in lines[1]
    keys = [kv.split("=")[0] for kv in lines[2].split()]
    assert keys == SHARED_KEYS + OWN_KEYS
    assert lines[-2].startswith("teacher copy_acc=")
    assert lines[-1].startswith("final test_acc=") and " sampled_exact=" in lines[-1] and " time_s=" in lines[-1]
    records = p.records
    assert [r["kind"] for r in records] == ["teacher", "eval", "step", "step", "eval", "teacher", "final"]
    assert isinstance(records[2]["gen_tokens"], int) and 0 <= records[2]["key_rate"] <= 1


@pytest.mark.parametrize("extra", [["--shared"], ["--lam", "0"], ["--task", "reverse", "--binary"],
                                   ["--task", "add"]])
def test_ablations_and_other_tasks_run(short_run, extra):
    p = short_run("minimal_pedagogical.py", *FAST, *extra)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1].startswith("final test_acc=")


def test_lambda_zero_gives_learnability_one(short_run):
    p = short_run("minimal_pedagogical.py", *FAST, "--lam", "0")
    assert p.returncode == 0, p.stderr
    steps = [line for line in p.stdout.splitlines() if line.startswith("step=")]
    assert len(steps) == 2
    for line in steps:
        record = dict(kv.split("=") for kv in line.split())
        assert float(record["learnability"]) == 1.0 and record["reward"] == record["task_reward"]


