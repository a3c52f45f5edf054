"""Tests of toy_tasks.py, minimal_pg.py and minimal_grpo.py: hand-worked math, the shared plumbing,
the command line, repeatability, and the default runs' accuracy."""
import json
import math
from pathlib import Path

import pytest
import torch

import minimal_grpo as grpo
import minimal_pg as pg
import toy_tasks as tt

SCRIPTS = ["minimal_pg.py", "minimal_grpo.py"]
FAST = ["--steps", 2, "--warmup_steps", 2, "--eval_every", 0, "--prompts_per_step", 4]


# ---------------------------------------------------------------------------------------------
# Advantages, KL, clipping and aggregation against numbers worked out by hand.


def test_pg_leave_one_out_advantage():
    # r = [1, 0, 0, 0]: A_0 = 1 - mean(0, 0, 0) = 1;  A_1 = 0 - mean(1, 0, 0) = -1/3.
    adv = pg.group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]]))
    assert torch.allclose(adv[0], torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))
    assert torch.equal(adv[1], torch.zeros(4))  # no signal when the group agrees


# Equal rewards whose float32 group mean is one rounding step off (r - mean = +-3e-8 or 6e-8): 9 of the
# 19 per-character reward values k/n with n <= 7 do this in a group of 8. The advantage must still be
# exactly 0, not 1e-8 (PG, Dr. GRPO) nor 6e-4 (GRPO: the residue divided by std + 1e-4).
RESIDUE_GROUPS = torch.tensor([[0.6] * 8, [1 / 3] * 8, [2 / 5] * 8, [5 / 6] * 8, [0.3] * 8])


@pytest.mark.parametrize("module", [pg, grpo])
def test_flat_group_advantage_is_exactly_zero(module):
    # the residue is real (else the test would prove nothing): r - mean is 3e-8 or 6e-8, not 0. The
    # population std of these groups comes out exactly 0 here, but a lone group's (one row) is 6e-8.
    assert (RESIDUE_GROUPS - RESIDUE_GROUPS.mean(1, keepdim=True)).abs().amax(1).min() > 0
    assert torch.equal(module.group_advantages(RESIDUE_GROUPS), torch.zeros(5, 8))
    for row in RESIDUE_GROUPS:  # one group at a time, as a batch of one prompt has it
        assert torch.equal(module.group_advantages(row[None]), torch.zeros(1, 8))


def test_grpo_standardised_advantage():
    # r = [1, 0, 0, 0]: mean 0.25, population std sqrt(0.25 * 0.75) = 0.4330127.
    # A_0 = 0.75 / (0.4330127 + 1e-4) = 1.731651;  A_1 = -0.25 / 0.4331127 = -0.577217.
    adv = grpo.group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.3, 0.3, 0.3, 0.3]]))
    assert torch.allclose(adv[0], torch.tensor([1.731651, -0.577217, -0.577217, -0.577217]), atol=1e-5)
    assert torch.equal(adv[1], torch.zeros(4))  # all-equal group: zero, not 0/0
    # the 1/std amplification: a tiny gap gets the same advantages as a large one (up to eps)
    tiny = grpo.group_advantages(torch.tensor([[0.51, 0.5, 0.5, 0.5]]), eps=0.0)
    assert torch.allclose(tiny[0], torch.tensor([1.732051, -0.577350, -0.577350, -0.577350]), atol=1e-4)


def test_k3_kl():
    # pi = 0.5, ref = 0.25: d = log(0.25/0.5) = -0.693147; exp(d) - d - 1 = 0.5 + 0.693147 - 1 = 0.193147
    logp, ref = torch.tensor([math.log(0.5), math.log(0.3)]), torch.tensor([math.log(0.25), math.log(0.3)])
    for module in (pg, grpo):
        assert torch.allclose(module.kl_k3(logp, ref), torch.tensor([0.193147, 0.0]), atol=1e-6)


def test_aggregation():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert pg.aggregate(per_token, mask, n=2).item() == pytest.approx((3 + 4) / 2)  # sums 3 and 4
    assert grpo.aggregate(per_token, mask, n=2).item() == pytest.approx((1.5 + 4) / 2)  # means 1.5 and 4


def test_grpo_clipped_surrogate_at_both_edges():
    # one token per completion; ratio 1.5 and 0.5, advantage +1 and -1, eps 0.2, no KL.
    # min(rho A, clip(rho) A): (1.5, +1) -> 1.2; (1.5, -1) -> -1.5; (0.5, +1) -> 0.5; (0.5, -1) -> -0.8
    old = torch.zeros(4, 1)
    logp = torch.log(torch.tensor([[1.5], [1.5], [0.5], [0.5]])).requires_grad_()
    adv, mask = torch.tensor([1.0, -1.0, 1.0, -1.0]), torch.ones(4, 1)
    loss, stats = grpo.policy_loss(logp, old, old, adv, mask, clip_eps=0.2, beta=0.0, n=4)
    assert loss.item() == pytest.approx(-(1.2 - 1.5 + 0.5 - 0.8) / 4)
    # every ratio lies outside [0.8, 1.2], but the clip removed the gradient of two tokens only:
    # (1.5, +1) and (0.5, -1). That is what TRL (clip_ratio/region_mean) and verl (pg_clipfrac) count.
    assert stats["clip_frac"].item() == pytest.approx(0.5)
    loss.backward()
    # the clipped side has no gradient; the unclipped side has d(-rho A / 4)/dlogp = -rho A / 4
    assert torch.allclose(logp.grad.view(-1), torch.tensor([0.0, 1.5 / 4, -0.5 / 4, 0.0]))


def verl_pg_clipfrac(ratio, adv, mask, eps_low, eps_high):
    """verl 0.9.1 core_algos.compute_policy_loss_vanilla's pg_clipfrac, restated: the share of tokens
    where the clipped loss term exceeds the unclipped one."""
    pg_losses1 = -adv[:, None] * ratio
    pg_losses2 = -adv[:, None] * ratio.clamp(1 - eps_low, 1 + eps_high)
    return ((pg_losses2 > pg_losses1).float() * mask).sum() / mask.sum()


def test_grpo_clip_frac_is_what_verl_and_trl_count():
    # random ratios up to about 3, both signs of advantage, a zero advantage, ragged masks: the logged
    # clip_frac equals verl's pg_clipfrac, and equals the share of tokens left with no gradient
    torch.manual_seed(0)
    old = torch.randn(16, 12)
    logp = (old + 0.5 * torch.randn(16, 12)).requires_grad_()
    adv = torch.randn(16)
    adv[3] = 0.0
    mask = (torch.rand(16, 12) < 0.8).float()
    loss, stats = grpo.policy_loss(logp, old, old, adv, mask, clip_eps=0.2, beta=0.0, n=16)
    ratio = torch.exp(logp.detach() - old)
    expected = verl_pg_clipfrac(ratio, adv, mask, 0.2, 0.2)
    assert 0.1 < expected < 0.5 and stats["clip_frac"].item() == pytest.approx(expected.item(), abs=1e-7)
    outside = (((ratio - 1).abs() > 0.2).float() * mask).sum() / mask.sum()
    assert outside > expected + 0.1  # the old count, every ratio outside the band, reads much higher
    loss.backward()
    no_grad = ((logp.grad == 0) & (adv[:, None] != 0)).float()
    assert stats["clip_frac"].item() == pytest.approx(((no_grad * mask).sum() / mask.sum()).item(), abs=1e-7)


def test_grpo_kl_term_enters_the_loss():
    logp = torch.zeros(1, 2, requires_grad=True)
    ref = torch.full((1, 2), math.log(0.5))  # k3 = exp(log .5) - log .5 - 1 = 0.193147 per token
    loss, stats = grpo.policy_loss(logp, logp.detach(), ref, torch.zeros(1), torch.ones(1, 2), 0.2, beta=0.1, n=1)
    assert loss.item() == pytest.approx(0.1 * 0.193147, abs=1e-6)
    assert stats["kl"].item() == pytest.approx(0.193147, abs=1e-6)


def test_pg_diagnostics_hand_worked():
    # the ratio, drift share and k3 are computed, not fed: pi_old = 0.5 and pi = 0.5, 0.75, 0.25 and a
    # padded token. ratio = 1, 1.5, 0.5 -> mean 1; |ratio - 1| > 0.2 on 2 of 3 tokens;
    # k3 = 0, (2/3 - ln(2/3) - 1) = 0.072132, (2 - ln 2 - 1) = 0.306853 -> mean 0.126328
    logp = torch.log(torch.tensor([[0.5, 0.75], [0.25, 0.9]]))
    stats = pg.policy_loss(logp, torch.full((2, 2), math.log(0.5)), torch.tensor([1.0, -1.0]),
                           torch.tensor([[1.0, 1.0], [1.0, 0.0]]), 2)[1]
    assert stats["ratio"].item() == pytest.approx(1.0) and stats["clip_frac"].item() == pytest.approx(2 / 3)
    assert stats["kl"].item() == pytest.approx(0.126328, abs=1e-6)
    # and the update takes pi_old from the same pass: test_planted_bugs.test_pg_update_takes_pi_old_from_the_same_pass


def test_grpo_equals_pg_in_the_limit():
    """The limit: one inner epoch (rho = 1, so the clip is inactive), beta = 0, one group and every
    completion of the same length L. Then GRPO's gradient is PG's times the constant
    c = (G - 1) / (G * (std + eps) * L): the same direction, so the same Adam step up to Adam's eps."""
    g, length = 4, 5
    rewards = torch.tensor([[1.0, 0.2, 0.6, 0.0]])
    logp_pg = torch.randn(g, length).requires_grad_()
    logp_grpo = logp_pg.detach().clone().requires_grad_()
    mask = torch.ones(g, length)
    pg.policy_loss(logp_pg, logp_pg.detach(), pg.group_advantages(rewards).view(-1), mask, g)[0].backward()
    grpo.policy_loss(logp_grpo, logp_grpo.detach(), logp_grpo.detach(), grpo.group_advantages(rewards).view(-1),
                     mask, clip_eps=0.2, beta=0.0, n=g)[0].backward()
    std = rewards.std(unbiased=False).item()
    c = (g - 1) / (g * (std + 1e-4) * length)
    assert torch.allclose(logp_grpo.grad, c * logp_pg.grad, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# The shared plumbing in toy_tasks.py.


def test_char_accuracy_and_rewards():
    assert tt.char_accuracy("dcba", "dcba") == 1.0
    assert tt.char_accuracy("dcb", "dcba") == 0.75  # a missing character costs credit
    assert tt.char_accuracy("dcbaa", "dcba") == 0.8  # so does an extra one
    assert tt.char_accuracy("", "dcba") == 0.0
    ex = tt.Example("abcd=", "dcba", "dcba")
    assert tt.make_task("reverse").reward("dcbb", ex) == 0.75
    assert tt.make_task("reverse", binary=True).reward("dcbb", ex) == 0.0
    add = tt.make_task("add")
    assert add.reward("42", tt.Example("37+5=", "42", "42")) == 1.0
    assert add.reward("41", tt.Example("37+5=", "42", "42")) == 0.0
    assert all(int(a) <= 99 and int(b) <= 9 and int(a) + int(b) == int(ex.answer)
               for ex in add.test for a, b in [ex.prompt[:-1].split("+")])
    sets = tt.AnswerSetTask(m=3)  # vector rewards: a (quality, brevity) row per answer, 0 for a copy
    rows = sets.rewards(["fed|f|fed"], [tt.Example("|abcdef=", "fedcba", "fedcba")])[0].tolist()
    assert rows == [pytest.approx([0.5, 0.75]), pytest.approx([1 / 6, 35 / 36]), [0.0, 0.0]]


def test_tasks_are_seeded_and_never_train_on_the_test_set():
    import random

    for name in tt.TASKS:
        task = tt.make_task(name)
        again = tt.make_task(name)
        assert [e.prompt for e in task.test] == [e.prompt for e in again.test]  # fixed held-out set
        train = task.sample(random.Random(0), 2000)
        assert [e.prompt for e in train[:50]] == [e.prompt for e in task.sample(random.Random(0), 50)]
        assert not {e.prompt for e in train} & task.test_prompts
        ds = task.dataset(task.test[:5])
        assert ds.column_names == ["prompt", "answer", "context"] and len(ds) == 5
    ex = tt.make_task("reverse").test[0]
    assert ex.answer == ex.prompt[:-1][::-1]


def test_char_tokenizer_round_trip():
    tok = tt.build_char_tokenizer(tt.ReverseTask.alphabet)
    ids = tok("abcd=").input_ids
    assert ids[0] == tok.bos_token_id and len(ids) == 6
    assert tok.decode(ids, skip_special_tokens=True) == "abcd="


def test_completion_mask_includes_the_first_eos_only():
    tokens = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 0, 0, 0]])
    mask = tt.completion_mask_from(tokens, eos_id=2)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def tiny_policy(seed=0):
    torch.manual_seed(seed)
    task = tt.make_task("reverse")
    tok = tt.build_char_tokenizer(task.alphabet)
    return task, tok, tt.build_tiny_model(tok)


def test_sampling_masks_and_left_padding():
    task, tok, model = tiny_policy()
    prompts = ["abc=", "abcdab="]  # different lengths: the first is left-padded
    ids, mask = tt.encode(tok, prompts, "cpu")
    assert mask[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    torch.manual_seed(1)
    r = tt.sample(model, tok, ids, mask, max_new_tokens=6)
    assert r.completion_ids.shape[0] == 2 and r.completion_mask.shape == r.completion_ids.shape
    for row, m, trunc in zip(r.completion_ids, r.completion_mask, r.truncated):
        n = int(m.sum())
        assert bool(trunc) == (tok.eos_token_id not in row[:n].tolist())
        if not trunc:
            assert row[n - 1] == tok.eos_token_id  # the mask stops right after the first EOS
    # padding must not change the log-probs: the padded row scores exactly as it does alone
    logp, ent = tt.token_logprobs(model, r)
    alone_ids, alone_mask = tt.encode(tok, prompts[:1], "cpu")
    alone = tt.Rollout(alone_ids, alone_mask, r.completion_ids[:1], r.completion_mask[:1], r.truncated[:1], r.texts[:1])
    logp_alone, _ = tt.token_logprobs(model, alone)
    m = r.completion_mask[0].bool()
    assert torch.allclose(logp[0][m], logp_alone[0][m], atol=1e-5)
    assert torch.isfinite(logp).all() and (ent >= 0).all() and (ent <= math.log(len(tok)) + 1e-5).all()


def test_teacher_prompt_and_prefix_continuation():
    task, tok, model = tiny_policy()
    ex = task.test[0]
    assert task.teacher_prompt(ex) == ex.answer + "|" + ex.prompt
    # tree-style continuation: any prefix (prompt plus part of a completion) can be sampled from
    ids, mask = tt.encode(tok, [ex.prompt + ex.answer[:2]], "cpu")
    r = tt.sample(model, tok, ids, mask, max_new_tokens=4)
    assert r.completion_ids.shape[1] <= 4


def test_scoring_temperature_is_explicit():
    """A rollout sampled at temperature 0.5: the policy's log-probs are taken at 0.5 by default (its
    pi_old), and a model that only scores the tokens, asked for temperature 1, is not tempered."""
    task, tok, model = tiny_policy()
    ids, mask = tt.encode(tok, ["abc=", "abcd="], "cpu")
    torch.manual_seed(0)
    r = tt.sample(model, tok, ids, mask, max_new_tokens=6, temperature=0.5)
    with torch.no_grad():
        raw = tt.completion_logits(model, r, 1.0)  # (N, T, V) untempered
        logp_policy, _ = tt.token_logprobs(model, r)
        logp_scorer, _ = tt.token_logprobs(model, r, temperature=1.0)
    pick = lambda logits: logits.log_softmax(-1).gather(-1, r.completion_ids[..., None]).squeeze(-1)
    assert torch.allclose(logp_policy, pick(raw / 0.5), atol=1e-6)
    assert torch.allclose(logp_scorer, pick(raw), atol=1e-6)
    assert not torch.allclose(logp_policy, logp_scorer)


def test_check_finite_stops_with_the_step(capsys):
    with pytest.raises(SystemExit) as e:
        tt.check_finite(torch.tensor(float("nan")), step=7)
    assert e.value.code == 2 and "step 7" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The files as a user runs them.


@pytest.mark.parametrize("script", SCRIPTS)
def test_two_steps_end_to_end(run_fast, script, tmp_path):
    log = tmp_path / "log.jsonl"
    p = run_fast(script, *FAST, "--log_jsonl", log)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert lines[1].startswith("step=1 reward=") and " loss=" in lines[1]
    keys = [kv.split("=")[0] for kv in lines[1].split()][:10]
    assert keys == ["step", "reward", "loss", "entropy", "ratio", "clip_frac", "kl", "grad_norm", "len", "gen_tokens"]
    assert lines[-1].startswith("final test_acc=") and " exact=" in lines[-1] and " time_s=" in lines[-1]
    records = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["kind"] for r in records] == ["eval", "step", "step", "eval", "final"]
    assert records[1]["step"] == 1 and "entropy" in records[1]


def same_seed_same_lines(run, script):
    args = ["--steps", 3, "--warmup_steps", 3, "--eval_every", 2, "--prompts_per_step", 4]
    a, b = run(script, *args), run(script, *args)
    strip = lambda out: [ln.split(" time_s=")[0] for ln in out.splitlines()]  # wall time differs
    assert a.returncode == 0 and strip(a.stdout) == strip(b.stdout)
    c = run(script, *args, "--seed", 1)
    assert strip(c.stdout) != strip(a.stdout)


@pytest.mark.parametrize("script", SCRIPTS)
def test_same_seed_same_lines(run_fast, script):
    same_seed_same_lines(run_fast, script)


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_same_seed_same_lines_across_processes(run, script):
    same_seed_same_lines(run, script)


BAD = [
    (["--task", "sort"], "--task"),
    (["--group_size", "1"], "--group_size"),
    (["--steps", "0"], "--steps"),
    (["--lr", "0"], "--lr"),
    (["--lr=-1e-3"], "--lr"),
    (["--model", "./no/such/model"], "--model"),
    (["--max_new_tokens", "3"], "--max_new_tokens"),
    (["--temperature", "0"], "--temperature"),
    (["--warmup_steps", "-2"], "--warmup_steps"),
    (["--log_jsonl", "/proc/no/such/dir/a.jsonl"], "--log_jsonl"),  # a folder that cannot be created
]


@pytest.mark.parametrize("args,flag", BAD)
def test_bad_input_fails_cleanly(run_fast, args, flag):
    """The checks are shared (toy_tasks.check_common_args), so minimal_pg.py stands for every file
    here; each sibling's own flags are tested with that file."""
    p = run_fast("minimal_pg.py", *args)
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and flag in err[0], p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""


@pytest.mark.parametrize("args,flag", [(["--epochs", "0"], "--epochs"), (["--clip_eps", "1.5"], "--clip_eps"),
                                       (["--beta", "-0.1"], "--beta")])
def test_grpo_bad_flags(run_fast, args, flag):
    p = run_fast("minimal_grpo.py", *args)
    assert p.returncode == 2 and flag in p.stderr and "Traceback" not in p.stderr


def test_log_jsonl_creates_missing_folders(run_fast, tmp_path):
    log = tmp_path / "runs" / "deeper" / "a.jsonl"
    p = run_fast("minimal_pg.py", *FAST, "--log_jsonl", log)
    assert p.returncode == 0, p.stderr
    assert [json.loads(x)["kind"] for x in log.read_text().splitlines()][-1] == "final"


def test_pretrained_model_from_a_local_folder(run_fast, tmp_path, monkeypatch):
    """--model loads any causal LM with its tokenizer; here the tiny Llama saved with save_pretrained,
    so the real loading path is exercised without a download."""
    task, tok, model = tiny_policy(seed=3)  # not the weights a seed-0 run would draw for a fresh model
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = []
    setup = tt.setup

    def spy_setup(*a, **k):
        out = setup(*a, **k)
        loaded.append([q.detach().clone() for q in out[1].parameters()])
        return out

    monkeypatch.setattr(tt, "setup", spy_setup)
    p = run_fast("minimal_grpo.py", "--model", tmp_path, "--steps", 2, "--eval_every", 0)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1].startswith("final test_acc=")
    # the policy that trained is the saved one, weight for weight (not a fresh model, nor a warmed-up one)
    assert all(torch.equal(a, b) for a, b in zip(loaded[0], model.parameters()))


def test_add_task_runs(run_fast):
    p = run_fast("minimal_pg.py", "--task", "add", *FAST)
    assert p.returncode == 0, p.stderr


# ---------------------------------------------------------------------------------------------
# The default command of every minimal_*.py learns: base at or below 0.6, final test_acc >= 0.90.


def final_metrics(stdout):
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("final "), last
    return {k: float(v) for k, v in (kv.split("=") for kv in last.split()[1:])}


ALL_SCRIPTS = sorted(p.name for p in Path(__file__).resolve().parents[1].glob("minimal_*.py"))


# The final test_acc each default run must reach, from a base at or below 0.6. PG, one plain REINFORCE
# step per batch and no KL anchor, is the slowest and noisiest learner: its 200-step default ended
# between 0.87 and 0.97 over seeds 0-2 with 1 or 2 CPU threads, so its floor is lower. OPD's default
# (a near-perfect teacher scoring every token) ended at 0.976-0.986 over seeds 0-2 with 1 thread, so
# its floor is the 0.95 its issue asks of it. minimal_vpo.py's test_acc is E_w best@3 of sampled
# answers (its TEST_METRIC), not a per-character accuracy: with brevity paid only to correct prefixes and
# the repository's 10-completion evaluation its base scores 0.30, an ideal GRPO policy (always the
# w_gold-best answer) 0.621, and its default reached 0.630 (seed 0, one thread; 0.632 +- 0.011 over 0-2).
# minimal_dpo.py learns from two of each group's eight samples with one step per batch: at 100 steps it
# was at 0.828-0.904 over seeds and thread counts, at 200 (its default, PG's) 0.883, 0.995 and 0.896 over
# seeds 0-2 (one thread) and 0.914 on seed 0 (two threads), so its floor is PG's.
FLOOR = {"minimal_pg.py": 0.85, "minimal_opd.py": 0.95, "minimal_vpo.py": 0.60, "minimal_dpo.py": 0.85}


@pytest.mark.slow
@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_default_run_learns(run, script):
    p = run(script)
    assert p.returncode == 0, p.stderr
    m = final_metrics(p.stdout)
    assert m["base_acc"] <= 0.6 and m["test_acc"] >= FLOOR.get(script, 0.90), m
