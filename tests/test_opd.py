"""Tests of minimal_opd.py: the divergences, both estimators' gradients and their common expectation
against hand-worked numbers, the update's loss and teacher columns, the frozen teacher (no gradient, eval
mode, scored at temperature 1, its own seeds), the loud failures, and the file run end to end as a user
would run it. (Its k3, micro-batches, repeatability and bad flags: test_every_file.py.)"""
import math

import pytest
import torch

import minimal_opd as opd
import toy_tasks as tt
from conftest import SHARED_KEYS, SHORT, gradient_and_log, ragged_rollout, tiny_policy

FAST = SHORT["opd"]  # two steps, a teacher trained for 2 steps and held to no accuracy
OPD_KEYS = ["teacher_kl", "reverse_kl", "forward_kl", "teacher_entropy", "top1_agree"]


# ---------------------------------------------------------------------------------------------
# The divergences and both estimators against numbers worked out by hand.


def test_reverse_and_forward_kl_hand_worked():
    # pi_S = [0.5, 0.25, 0.25], pi_T = [0.8, 0.1, 0.1]:
    # KL(S||T) = 0.5 ln(0.5/0.8) + 2 * 0.25 ln(0.25/0.1) = -0.2350018 + 0.4581454 = 0.2231436
    # KL(T||S) = 0.8 ln(0.8/0.5) + 2 * 0.1 ln(0.1/0.25) = 0.3760029 - 0.1832581 = 0.1927448
    # H(S) = -(0.5 ln 0.5 + 0.5 ln 0.25) = 0.3465736 + 0.6931472 = 1.0397208
    student = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))  # (N=1, T=1, V=3)
    teacher = torch.log(torch.tensor([[[0.8, 0.1, 0.1]]]))
    assert opd.kl(student, teacher).item() == pytest.approx(0.2231436, abs=1e-6)
    assert opd.kl(teacher, student).item() == pytest.approx(0.1927448, abs=1e-6)
    assert opd.entropy(student).item() == pytest.approx(1.0397208, abs=1e-6)
    assert opd.kl(student, student).item() == pytest.approx(0.0, abs=1e-7)


def test_sampled_advantage_and_its_gradient_is_minus_a():
    # One completion, tokens with pi_S = 0.5, 0.25 (and a padded third), pi_T = 0.25, 0.5:
    # A = -(ln 0.5 - ln 0.25) = -ln 2 = -0.693147, then -(ln 0.25 - ln 0.5) = +0.693147.
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.9]])).requires_grad_()
    teacher_logp = torch.log(torch.tensor([[0.25, 0.5, 0.1]]))
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv = opd.distill_advantages(logp, teacher_logp)
    assert not adv.requires_grad  # detached whole, the student's own log-prob included
    assert torch.allclose(adv[0, :2], torch.tensor([-math.log(2), math.log(2)]))
    loss, stats = opd.policy_loss(logp, logp.detach(), adv, mask, 1)
    loss.backward()
    # d loss / d log pi_S(a_t) = -A_t exactly: not -A_t + (log pi_S - log pi_T), which an undetached
    # advantage would add (the gradient of (log pi_S)^2 / 2); 0 on the padded token.
    assert torch.allclose(logp.grad, torch.tensor([[math.log(2), -math.log(2), 0.0]]))
    assert stats["ratio"].item() == 1.0 and stats["clip_frac"].item() == 0.0 and stats["kl"].item() == 0.0


def test_full_gradient_wrt_logits_is_analytic():
    # d/dz_k sum_v p_v (log p_v - log q_v) = p_k (log p_k - log q_k - KL), at every visited position;
    # the aggregate (sum over tokens, mean over N completions) scales it by 1/N and masks padding.
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, requires_grad=True)  # (N, T, V)
    teacher = torch.randn(2, 3, 5).log_softmax(-1)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    logp_all = logits.log_softmax(-1)
    opd.aggregate(opd.kl(logp_all, teacher), mask, 2).backward()
    with torch.no_grad():
        p, kl = logp_all.exp(), opd.kl(logp_all, teacher)
        analytic = p * (logp_all - teacher - kl[..., None]) * mask[..., None] / 2
    assert torch.allclose(logits.grad, analytic, atol=1e-6)
    assert torch.equal(logits.grad[1, 2], torch.zeros(5))


def test_both_estimators_share_one_expected_gradient():
    # At one position, average the sampled estimator's gradient over every token a ~ pi_S exactly:
    # sum_a pi_S(a) * grad[-A(a) log pi_S(a)] = grad KL(pi_S || pi_T), because sum_v pi grad log pi = 0.
    torch.manual_seed(1)
    logits = torch.randn(1, 1, 4, requires_grad=True)
    teacher = torch.randn(1, 1, 4).log_softmax(-1)
    mask = torch.ones(1, 1)
    expected = torch.zeros(4)
    for a in range(4):
        logp = logits.log_softmax(-1)[..., a]  # (1, 1)
        loss, _ = opd.policy_loss(logp, logp.detach(), opd.distill_advantages(logp, teacher[..., a]), mask, 1)
        (grad,) = torch.autograd.grad(loss, logits)
        expected += logits.softmax(-1)[0, 0, a].detach() * grad[0, 0]
    (full,) = torch.autograd.grad(opd.aggregate(opd.kl(logits.log_softmax(-1), teacher), mask, 1), logits)
    assert torch.allclose(expected, full[0, 0], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The update: the full estimator trains on the exact KL, the sampled one on the detached log-ratio, and the
# teacher columns are what they are named.


def opd_batch():
    task, tok, student = tiny_policy()
    teacher = tiny_policy(seed=1, warmup=20)[2].eval().requires_grad_(False)
    rollout, _ = ragged_rollout(tok, task, 3, 4, temperature=0.7)
    return student, teacher, rollout


@pytest.mark.parametrize("estimator", ["sampled", "full"])
def test_opd_update_trains_on_its_estimator(estimator):
    student, teacher, rollout = opd_batch()
    args = opd.Args(group_size=4, prompts_per_step=3, micro_batch=1, max_grad_norm=1e9, estimator=estimator)
    grad, log = gradient_and_log(student, lambda opt: opd.update(student, opt, rollout, teacher, 1, args))
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
        grads[estimator] = gradient_and_log(student, lambda opt: opd.update(student, opt, rollout, teacher, 1, args))[0]
    assert torch.cosine_similarity(grads["sampled"], grads["full"], 0) < 0.99


# ---------------------------------------------------------------------------------------------
# The teacher: frozen, scored at temperature 1, trained from its own seeds, checked before any RL.


def test_teacher_is_frozen_and_scored_at_temperature_one(run_fast, monkeypatch):
    seen, calls = {"evaluating": False}, []
    load_teacher, completion_logits, evaluate = tt.load_teacher, tt.completion_logits, tt.evaluate

    def spy_load(*a, **k):
        teacher, record = load_teacher(*a, **k)
        seen["teacher"], seen["before"] = teacher, [p.detach().clone() for p in teacher.parameters()]
        return teacher, record

    def spy_eval(*a, **k):  # held-out evaluation scores greedy completions: not a training pass
        seen["evaluating"] = True
        try:
            return evaluate(*a, **k)
        finally:
            seen["evaluating"] = False

    def spy_logits(model, rollout, temperature):
        if "teacher" in seen and not seen["evaluating"]:  # the training passes, after the teacher's own
            calls.append((model is seen["teacher"], temperature))
        return completion_logits(model, rollout, temperature)

    monkeypatch.setattr(tt, "load_teacher", spy_load)
    monkeypatch.setattr(tt, "evaluate", spy_eval)
    monkeypatch.setattr(tt, "completion_logits", spy_logits)
    p = run_fast("minimal_opd.py", *FAST, "--temperature", "0.7", "--estimator", "full")
    assert p.returncode == 0, p.stderr
    teacher = seen["teacher"]
    assert not teacher.training and not any(q.requires_grad for q in teacher.parameters())
    assert all(q.grad is None for q in teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(seen["before"], teacher.parameters()))
    assert {t for is_teacher, t in calls if is_teacher} == {1.0}  # two steps, two teacher passes
    assert sum(is_teacher for is_teacher, _ in calls) == 2
    assert {t for is_teacher, t in calls if not is_teacher} == {0.7}  # the student as it sampled


def test_teacher_shifts_nothing_of_the_student(run_fast):
    """The teacher draws its weights and its data from its own seeds and restores the global RNG, so
    however long it trains, the student's base and first batch are those of the parent, minimal_pg.py."""
    args = ["--steps", "1", "--warmup_steps", "5", "--eval_every", "0", "--prompts_per_step", "4", "--group_size", "2"]
    first = lambda out: [ln for ln in out.splitlines() if ln.startswith(("eval step=0", "step=1 "))]
    shared = lambda line: {kv.split("=")[0]: kv for kv in line.split()}
    a = first(run_fast("minimal_opd.py", *args, "--teacher_steps", "2", "--teacher_min_acc", "0").stdout)
    b = first(run_fast("minimal_opd.py", *args, "--teacher_steps", "3", "--teacher_min_acc", "0").stdout)
    pg = first(run_fast("minimal_pg.py", *args).stdout)
    assert a[0] == b[0] == pg[0]  # the same base model
    for key in ("reward", "entropy", "len", "gen_tokens"):  # the same sampled batch
        assert shared(a[1])[key] == shared(b[1])[key] == shared(pg[1])[key]


def test_reward_is_logged_but_never_trained_on(run_fast):
    # --binary changes only how the samples are scored; the student's trajectory must not move.
    args = [*FAST, "--eval_every", "1"]
    dense, binary = run_fast("minimal_opd.py", *args).stdout, run_fast("minimal_opd.py", *args, "--binary").stdout
    no_reward = lambda out: [" ".join(kv for kv in ln.split() if not kv.startswith(("reward=", "time_s=")))
                             for ln in out.splitlines()]
    assert no_reward(dense) == no_reward(binary)
    assert dense != binary  # the logged reward did change


def test_weak_teacher_stops_before_any_rl(run_fast):
    p = run_fast("minimal_opd.py", "--warmup_steps", "2", "--teacher_steps", "1")
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "raise --teacher_steps" in err[0] and "0.97" in err[0], p.stderr
    assert "step=" not in p.stdout and p.stdout == ""


def save_tiny(path, alphabet):
    tok = tt.build_char_tokenizer(alphabet)
    tt.build_tiny_model(tok).save_pretrained(path)
    tok.save_pretrained(path)


def test_teacher_from_a_local_folder(run_fast, tmp_path, monkeypatch):
    save_tiny(tmp_path, tt.ReverseTask.alphabet)
    teachers, load_teacher = [], tt.load_teacher
    monkeypatch.setattr(tt, "load_teacher", lambda *a, **k: teachers.append(load_teacher(*a, **k)) or teachers[-1])
    p = run_fast("minimal_opd.py", *FAST, "--teacher", tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("teacher test_acc=")
    # the teacher that scored is the saved one, weight for weight, not the tiny teacher trained in memory
    saved, _ = tt.load_pretrained(str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(teachers[0][0].parameters(), saved.parameters()))


def test_teacher_with_another_vocabulary_stops(run_fast, tmp_path):
    save_tiny(tmp_path, tt.AddTask.alphabet)  # digits, not letters
    p = run_fast("minimal_opd.py", *FAST, "--teacher", tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]  # transformers' loading bar aside
    assert len(err) == 1 and "--teacher" in err[0] and "vocabulary" in err[0], p.stderr


# ---------------------------------------------------------------------------------------------
# The file as a user runs it.


@pytest.mark.parametrize("estimator", ["sampled", "full"])
def test_two_steps_end_to_end(short_run, estimator):
    # the sampled estimator is the default: its run is the short run other tests read
    p = short_run("minimal_opd.py", *FAST, *([] if estimator == opd.Args.estimator else ["--estimator", estimator]))
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert lines[0].startswith("teacher test_acc=") and " exact=" in lines[0] and " time_s=" in lines[0]
    assert lines[1].startswith("eval step=0 test_acc=")
    step = dict(kv.split("=") for kv in lines[2].split())
    assert list(step) == SHARED_KEYS + OPD_KEYS
    assert step["ratio"] == "1.0000" and step["clip_frac"] == "0.0000" and step["kl"] == "0.0000"
    assert step["gen_tokens"].isdigit() and float(step["top1_agree"]) <= 1
    assert lines[-1].startswith("final test_acc=") and " base_acc=" in lines[-1]
    assert [r["kind"] for r in p.records] == ["teacher", "eval", "step", "step", "eval", "final"]


def test_gradient_variance_measures_and_stops(run_fast):
    p = run_fast("minimal_opd.py", *FAST, "--grad_var_batches", "2")
    assert p.returncode == 0, p.stderr
    last = p.stdout.strip().splitlines()[-1]
    keys = [kv.split("=")[0] for kv in last.split()[1:]]
    assert last.startswith("grad ") and keys == ["sampled_var", "full_var", "sampled_mean_norm",
                                                 "full_mean_norm", "cos_of_means"]
    assert not any(ln.startswith("step=") for ln in p.stdout.splitlines())


