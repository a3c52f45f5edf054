"""Tests of minimal_vpo.py and its answer-set task in toy_tasks.py: the reward vector, parsing, the set
scores against hand-worked numbers, the shared weight draws, the limits where VPO must equal GRPO,
best@k counting, the evaluation's bookkeeping, and the file run end to end. (The reference clipped
surrogate, the wiring of its main loop, micro-batches, repeatability and bad flags: test_every_file.py.)"""
import dataclasses
import itertools
import random
from types import SimpleNamespace

import pytest
import torch

import minimal_grpo as grpo
import minimal_vpo as vpo
import toy_tasks as tt
from conftest import SHARED_KEYS, SHORT

# the short run evaluates 3 chains a test prompt (SHORT), 9 answers at m = 3; at m = 1 best@9 needs 9 chains,
# of 7 tokens each (one answer and its EOS): what the output contract reads does not depend on either
M1 = ["--m", "1", "--eval_chains", 9, "--max_new_tokens", 7]


# ---------------------------------------------------------------------------------------------
# The task: reward vector, parsing, reward matrices, prompts and the shared warm-up.


def test_quality_brevity_front():
    # target "dbac" (n = 4); a correct prefix of j characters scores (j/4, 1 - (j/4)^2)
    assert tt.quality_brevity("d", "dbac") == [0.25, 1 - 1 / 16]  # (0.25, 0.9375)
    assert tt.quality_brevity("db", "dbac") == [0.5, 0.75]  # the w_gold optimum: 0.5*0.5 + 0.5*0.75 = 0.625
    assert tt.quality_brevity("dbac", "dbac") == [1.0, 0.0]  # full quality, no brevity left
    # brevity is paid only for a correct prefix: anything else keeps its per-character credit, brevity 0
    assert tt.quality_brevity("dbaca", "dbac") == [0.8, 0.0]  # too long: 4/5 credit
    assert tt.quality_brevity("xb", "dbac") == [0.25, 0.0]  # one wrong character: no brevity (was 0.75)
    assert tt.quality_brevity("x", "dbac") == [0.0, 0.0]  # short garbage earns nothing (was 0.9375)
    assert tt.quality_brevity("dbxc", "dbac") == [0.75, 0.0]
    gold = lambda r: 0.5 * r[0] + 0.5 * r[1]
    lengths = {j: gold(tt.quality_brevity("dbac"[:j], "dbac")) for j in range(1, 5)}
    assert lengths == pytest.approx({1: 0.59375, 2: 0.625, 3: 0.59375, 4: 0.5})  # a unique optimum, j = n/2


def test_parse_answers():
    assert tt.parse_answers("dbac|db|d", 3) == ["dbac", "db", "d"]
    assert tt.parse_answers("dbac|db|d|dba", 3) == ["dbac", "db", "d"]  # only the first m parts
    assert tt.parse_answers("dbac", 3) == ["dbac", "", ""]  # missing parts are blanks
    assert tt.parse_answers("dbac||d", 3) == ["dbac", "", "d"]  # an empty part is a blank
    assert tt.parse_answers("db|dbac|db", 3) == ["db", "dbac", ""]  # a copy of an earlier part is a blank
    assert tt.parse_answers("db|dbac|db", 3, dedup=False) == ["db", "dbac", "db"]  # ... unless asked to keep it
    assert tt.parse_answers("dbac|db|dbacdb", 3, truncated=True) == ["dbac", "db", ""]  # cut off: the last part
    assert tt.parse_answers("dbac|db|d|dba", 3, truncated=True) == ["dbac", "db", "d"]  # cut off beyond the m-th
    assert tt.parse_answers("dbacdbacdb", 1, truncated=True) == [""]
    assert tt.parse_answers("db|ac", 1) == ["db"]  # m = 1 reads the first part too


def test_reward_matrices_of_a_batch():
    task = tt.AnswerSetTask(m=3)
    ex = tt.Example("|cabd=", "dbac", "dbac")
    R = task.rewards(["dbac|db|db", "dbac|db|dbacdb", "dbac|db|d"], [ex] * 3, torch.tensor([False, True, False]))
    assert R.shape == (3, 3, 2)
    assert R[0].tolist() == [[1.0, 0.0], [0.5, 0.75], [0.0, 0.0]]  # the copy is a zero row
    assert R[1].tolist() == [[1.0, 0.0], [0.5, 0.75], [0.0, 0.0]]  # the truncated last answer too
    assert R[2, 2].tolist() == [0.25, 0.9375]
    assert task.reward_matrix("db|db", ex, dedup=False) == [[0.5, 0.75], [0.5, 0.75], [0.0, 0.0]]


def test_prompts_budget_and_the_shared_warmup():
    sets, plain = tt.AnswerSetTask(m=3), tt.AnswerSetTask(m=1)
    assert sets.test[0].prompt == "|" + plain.test[0].prompt and sets.test[0].answer == plain.test[0].answer
    assert plain.test[0].prompt[0] in "abcd"  # m = 1: the plain format, no marker
    assert sets.tokens_needed() == 21 and plain.tokens_needed() == 7  # m * (6 characters + '|' or EOS)
    # the warm-up batches do not depend on m, so every m starts from the same base model
    a, b = sets.warmup_batch(random.Random(0), 6), plain.warmup_batch(random.Random(0), 6)
    assert a == b
    assert [ex.prompt.startswith("|") for ex in a] == [False, True] * 3  # half of each format
    assert a[1].answer == "|".join([a[1].answer.split("|")[0]] * 3)  # the set format: one reversal, 3 times
    assert a[1].answer.split("|")[0] == a[1].prompt[1:-1][::-1]


# ---------------------------------------------------------------------------------------------
# The set scores and the advantage.


def test_set_score_of_whole_answer_sets_hand_worked():
    # E_w max over w = (a, 1 - a), a ~ U(0, 1), for sets of answers to "dbac": w . (1, 0) = a,
    # w . (.5, .75) = .75 - .25a, w . (.25, .9375) = .9375 - .6875a.
    #   "db|dbac": db wins below a = .6: int_0^.6 (.75 - .25a) + int_.6^1 a = .405 + .32 = .725
    #   "d|db|dbac": d wins below a = 3/7, then db up to .6, then dbac:
    #       (.9375 (3/7) - .34375 (3/7)^2) + (.75 (.6 - 3/7) - .125 (.36 - 9/49)) + .32 = .765179
    #   "x|db|dbac": x earns nothing (it is not a prefix of dbac), so .725, as "db|dbac"
    task = tt.AnswerSetTask(m=3)
    ex = tt.Example("|cabd=", "dbac", "dbac")
    a = (torch.arange(200_000) + 0.5) / 200_000
    w = torch.stack([a, 1 - a], 1)[None]  # (1, N, 2) a fine grid: E_w to 1e-9
    R = task.rewards(["d|db|dbac", "x|db|dbac", "db|dbac"], [ex] * 3)[None]  # (1, 3, 3, 2)
    expected = [0.9375 * 3 / 7 - 0.34375 * 9 / 49 + 0.75 * (0.6 - 3 / 7) - 0.125 * (0.36 - 9 / 49) + 0.32, .725, .725]
    assert vpo.vpo_scores(R.double(), w.double())[0].tolist() == pytest.approx(expected, abs=1e-6)
    # and what training uses, Dirichlet(1, 1) draws shared by the group: the mean of the max, to sampling
    # error (the max of the mean would give max(.594, .625, .5) = .625 for the first set)
    torch.manual_seed(0)
    s = vpo.completion_scores(R, SimpleNamespace(set_score="vpo", n_weights=20_000, w_gold=0.5))
    assert s[0].tolist() == pytest.approx(expected, abs=0.005)


def test_set_score_hand_worked():
    # one group, two completions of m = 2 answers, two weight draws w1 = (1, 0), w2 = (0.25, 0.75)
    # completion A: rows (1, 0) and (0.5, 0.75). Under w1: max(1, 0.5) = 1; under w2: max(0.25, 0.6875)
    #   = 0.6875; s_A = (1 + 0.6875) / 2 = 0.84375
    # completion B: rows (0.5, 0.75) and (0, 0). w1: 0.5; w2: 0.6875; s_B = 0.59375
    # (the mean over draws of the max, not the max of the mean: for A, max(mean) = max(0.625, 0.71875))
    R = torch.tensor([[[[1.0, 0.0], [0.5, 0.75]], [[0.5, 0.75], [0.0, 0.0]]]])  # (P=1, G=2, m=2, k=2)
    w = torch.tensor([[[1.0, 0.0], [0.25, 0.75]]])  # (P=1, N=2, k=2)
    assert torch.allclose(vpo.vpo_scores(R, w), torch.tensor([[0.84375, 0.59375]]))


def test_baseline_scores_hand_worked():
    # w_gold = (0.5, 0.5): rows of A score 0.5 and 0.625, of B 0.625 and 0
    R = torch.tensor([[[[1.0, 0.0], [0.5, 0.75]], [[0.5, 0.75], [0.0, 0.0]]]])
    assert torch.allclose(vpo.gold_scores(R, [0.5, 0.5], "max"), torch.tensor([[0.625, 0.625]]))
    assert torch.allclose(vpo.gold_scores(R, [0.5, 0.5], "sum"), torch.tensor([[1.125, 0.625]]))


def test_weight_draws_are_shared_within_a_group_and_differ_across_groups():
    torch.manual_seed(0)
    R = torch.rand(1, 1, 3, 2).expand(2, 4, 3, 2)  # 2 groups x 4 completions, all with the same matrix
    args = SimpleNamespace(set_score="vpo", n_weights=5, w_gold=0.5)
    s = vpo.completion_scores(R, args)  # (2, 4)
    assert torch.equal(s[0], s[0, :1].expand(4)) and torch.equal(s[1], s[1, :1].expand(4))  # same w in a group
    assert s[0, 0] != s[1, 0]  # other draws in the other group


def test_flat_groups_have_exactly_zero_advantage():
    # a group of the same set in different orders (and with a copy): every score is bit-identical
    base = torch.tensor([[0.6, 0.3], [1 / 3, 0.7], [0.0, 0.0]])
    group = torch.stack([base, base[[1, 0, 2]], base[[2, 1, 0]], base[[0, 2, 1]]])[None]  # (1, 4, 3, 2)
    for how in ("vpo", "sum", "max"):
        s = vpo.completion_scores(group, SimpleNamespace(set_score=how, n_weights=100, w_gold=0.3))
        assert torch.equal(vpo.group_advantages(s), torch.zeros(1, 4)), how


def test_m1_vpo_scores_the_mean_objective():
    # with m = 1 and alpha = 1, E_w[w . r] = mean(r), since E[w] = (1/k, ..., 1/k)
    torch.manual_seed(0)
    r = torch.tensor([[[[0.8, 0.2]], [[0.5, 0.75]], [[1.0, 0.0]]]])  # (1, 3, 1, 2)
    s = vpo.vpo_scores(r, torch.distributions.Dirichlet(torch.ones(2)).sample((1, 200_000)))
    assert torch.allclose(s, torch.tensor([[0.5, 0.625, 0.5]]), atol=3e-3)


def test_m1_scores_are_grpo_on_one_weighting_per_group():
    """--m 1: the set score is w . r under the mean of the group's draws. With 100 draws (the repo's
    vpo_single) that mean is w_gold = (.5, .5) give or take sd sqrt(1/12)/10 = 0.029, GRPO on w_gold by
    construction; with --n_weights 1, one w per prompt: random-weight GRPO (the paper's augment.py)."""
    torch.manual_seed(0)
    R = torch.rand(4, 8, 1, 2)  # (P, G, m = 1, k)
    w = torch.distributions.Dirichlet(torch.ones(2)).sample((4, 100))  # (P, N, k)
    assert torch.allclose(vpo.vpo_scores(R, w), (R[:, :, 0] * w.mean(1)[:, None]).sum(-1), atol=1e-6)
    assert torch.allclose(vpo.vpo_scores(R, w[:, :1]), (R[:, :, 0] * w[:, :1]).sum(-1))  # one draw per group
    means = torch.distributions.Dirichlet(torch.ones(2)).sample((2000, 100)).mean(1)[:, 0]  # (2000,)
    assert means.std().item() == pytest.approx((1 / 12) ** 0.5 / 10, rel=0.1)  # 0.029
    torch.manual_seed(1)
    one = vpo.completion_scores(R, SimpleNamespace(set_score="vpo", n_weights=1, w_gold=0.5))
    r0, r1 = R[:, :, 0, 0], R[:, :, 0, 1]
    w1 = (one[:, 0] - r1[:, 0]) / (r0[:, 0] - r1[:, 0])  # (P,) each group's weight, from its first completion
    assert torch.allclose(one, w1[:, None] * r0 + (1 - w1[:, None]) * r1, atol=1e-5)  # one w per group
    assert ((w1 > 0) & (w1 < 1)).all() and w1.std() > 0.05  # a random weighting, a different one per group


def test_m1_gold_scores_give_grpo_advantages():
    """The limit where the file is GRPO: one answer per completion, scored by w_gold (sum or max)."""
    torch.manual_seed(0)
    R = torch.rand(4, 8, 1, 2)
    gold = 0.3 * R[..., 0, 0] + 0.7 * R[..., 0, 1]  # (4, 8) w_gold . r
    for how in ("sum", "max"):
        s = vpo.completion_scores(R, SimpleNamespace(set_score=how, n_weights=100, w_gold=0.3))
        assert torch.allclose(vpo.group_advantages(s), grpo.group_advantages(gold), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Evaluation: best@k, diversity, and the bookkeeping of evaluate().


def test_best_at_k_hand_worked():
    # pool [2, 0, 1], k = 2: the subsets {0,1}, {0,2}, {1,2} have best 1, 2, 2 -> 5/3
    values = torch.tensor([[2.0, 0.0, 1.0]])
    assert vpo.best_at_k(values, 1).item() == pytest.approx(1.0)  # k = 1: the mean
    assert vpo.best_at_k(values, 2).item() == pytest.approx(5 / 3)
    assert vpo.best_at_k(values, 3).item() == pytest.approx(2.0)  # k = S: the max
    # against brute force over every 3-subset of 9 values, with ties, and an extra (weights) dimension
    torch.manual_seed(0)
    pool = torch.randint(0, 4, (2, 9, 5)).float()  # (P, S, W)
    for k in (1, 3, 9):
        brute = torch.stack([pool[:, list(c)].amax(1) for c in itertools.combinations(range(9), k)]).mean(0)
        assert torch.allclose(vpo.best_at_k(pool, k), brute, atol=1e-6)


def test_set_diversity_hand_worked():
    # set 1: rows (1, 0), (0.5, 0.75), (0, 0): one scored pair, L1 = 0.5 + 0.75 = 1.25
    # set 2: rows (1, 0), (0.25, 0.9375), (0.5, 0.75): pairs 0.75 + 0.9375 = 1.6875, 0.5 + 0.75 = 1.25,
    #        0.25 + 0.1875 = 0.4375; mean 3.375 / 3 = 1.125.   set 3: one scored answer -> 0
    R = torch.tensor([[[1.0, 0.0], [0.5, 0.75], [0.0, 0.0]],
                      [[1.0, 0.0], [0.25, 0.9375], [0.5, 0.75]],
                      [[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    assert vpo.set_diversity(R).item() == pytest.approx((1.25 + 1.125 + 0) / 3)


def stub_sampler(texts, truncated):
    """Stands in for tt.sample: returns the given completions, in order, for as many prompts as asked."""
    def sample(model, tok, ids, mask, max_new_tokens, temperature=1.0, greedy=False):
        n = ids.size(0)
        assert n == len(texts) and temperature == 0.7
        return SimpleNamespace(texts=texts, truncated=torch.tensor(truncated), completion_mask=torch.ones(n, 2))
    return sample


def stub_scorer(model, rollout, rows=0, temperature=None):
    """Stands in for tt.score: an entropy of 0.5 at every position, scored at temperature 1."""
    assert temperature == 1.0
    return None, torch.full_like(rollout.completion_mask, 0.5)


def test_evaluate_counts_answers_not_completions(monkeypatch):
    # one test prompt "|cabd=" (n = 4), m = 3, --eval_chains 3: 9 answers from 3 completions.
    task = tt.AnswerSetTask(m=3)
    task.test = [tt.Example("|cabd=", "dbac", "dbac")]
    tok = tt.build_char_tokenizer(task.alphabet)
    texts = ["dbac|db|d", "db|db|db", "dbac|dbacdbac"]  # the last is cut off: "dbacdbac" scores 0
    monkeypatch.setattr(tt, "sample", stub_sampler(texts, [False, False, True]))
    monkeypatch.setattr(tt, "score", stub_scorer)
    model = SimpleNamespace(eval=lambda: None, train=lambda: None)
    args = SimpleNamespace(m=3, eval_chains=3, max_new_tokens=24, w_gold=0.5, micro_batch=0, group_size=3)
    test_acc, exact, entropy, found = vpo.evaluate(model, tok, task, "cpu", args)
    assert entropy == pytest.approx(0.5)
    # pool of 9 answers, gold scores: dbac .5, db .625, d .59375 | db .625 x3 (copies count here) |
    # dbac .5, blank 0, blank 0. Sorted: 0, 0, .5, .5, .59375, .625, .625, .625, .625
    gold = torch.tensor([[0.5, 0.625, 0.59375, 0.625, 0.625, 0.625, 0.5, 0.0, 0.0]])
    assert found["gold@1"] == pytest.approx(gold.mean().item())
    assert found["gold@9"] == pytest.approx(0.625)
    assert found["gold@3"] == pytest.approx(vpo.best_at_k(gold, 3).item())
    assert found["best@3_w1"] == pytest.approx(vpo.best_at_k(torch.tensor([[1, .5, .25, .5, .5, .5, 1, 0, 0]]), 3).item())
    assert exact == pytest.approx(2 / 3)  # two of the three completions hold the full reversal
    # slot lengths over n: slot 1 (4 + 2 + 4) / 3 / 4, slot 2 (2 + 2 + 0) / 3 / 4, slot 3 (1 + 2 + 0) / 3 / 4
    assert [found[f"slot{a}"] for a in (1, 2, 3)] == pytest.approx([10 / 12, 4 / 12, 3 / 12])
    # test_acc: E_w best@3 of the pool, exact over w = (a, 1 - a), a ~ U(0, 1), to 1e-4 on the grid
    fine = (torch.arange(100_000) + 0.5) / 100_000
    answers = torch.tensor([[1, 0], [.5, .75], [.25, .9375], [.5, .75], [.5, .75], [.5, .75], [1, 0], [0, 0], [0, 0]])
    exact_ew = vpo.best_at_k(answers[None] @ torch.stack([fine, 1 - fine]), 3).mean().item()
    assert test_acc == pytest.approx(exact_ew, abs=1e-4)
    # diversity over the deduplicated sets: set 1 has 3 distinct answers (pairs: dbac-db 1.25, dbac-d
    # 0.75 + 0.9375 = 1.6875, db-d 0.25 + 0.1875 = 0.4375 -> 1.125); set 2 one answer, set 3 one -> 0
    assert found["diversity"] == pytest.approx(1.125 / 3)
    # m = 1: the same 9 answers need 9 completions
    task1 = tt.AnswerSetTask(m=1)
    task1.test = [tt.Example("cabd=", "dbac", "dbac")]
    monkeypatch.setattr(tt, "sample", stub_sampler(["db"] * 9, [False] * 9))
    args1 = SimpleNamespace(m=1, eval_chains=9, max_new_tokens=24, w_gold=0.5, micro_batch=0, group_size=3)
    test_acc, exact, _, found = vpo.evaluate(model, tok, task1, "cpu", args1)
    assert test_acc == pytest.approx(0.625, abs=1e-6)  # E_w of w . (0.5, 0.75) = 0.625: w is untilted
    assert found["gold@9"] == pytest.approx(0.625) and found["diversity"] == 0 and exact == 0


# ---------------------------------------------------------------------------------------------
# The file as a user runs it.


@pytest.mark.parametrize("extra", [[], ["--set_score", "sum"], ["--set_score", "max"],
                                   [*M1, "--set_score", "max"], M1, [*M1, "--n_weights", "1"]])
def test_two_steps_end_to_end(short_run, extra):
    p = short_run("minimal_vpo.py", *SHORT["vpo"], *extra)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    keys = [kv.split("=")[0] for kv in lines[1].split()]
    assert keys == SHARED_KEYS + ["answers", "diversity"]  # the shared keys first, the method's own after
    assert lines[0].startswith("eval step=0 test_acc=") and " best@9=" in lines[0] and " entropy=" in lines[0]
    final = lines[-1]
    assert final.startswith("final test_acc=") and " base_acc=" in final and " time_s=" in final
    m = 1 if "--m" in extra else 3
    for key in ["best@1", "best@9", "gold@3", "best@3_w1", "best@3_w0", "diversity", f"slot{m}"]:
        assert f" {key}=" in final, key


def test_every_m_starts_from_the_same_base():
    models = []
    for m in (1, 3):
        torch.manual_seed(0)
        task = tt.AnswerSetTask(m=m)
        tok = tt.build_char_tokenizer(task.alphabet)
        model = tt.build_tiny_model(tok)
        tt.supervised_warmup(model, tok, task, 3, seed=0)
        models.append(model)
    assert all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))


def test_evaluating_does_not_change_the_training_run(short_run, run_fast):
    # an evaluation after step 1 (of 2), and none before the end: step 2 is the same either way
    a = run_fast("minimal_vpo.py", *SHORT["vpo"], "--eval_every", "1")
    b = short_run("minimal_vpo.py", *SHORT["vpo"])
    steps = lambda out: [ln for ln in out.splitlines() if ln.startswith("step=")]
    assert a.returncode == 0 and steps(a.stdout) == steps(b.stdout)
    assert sum(ln.startswith("eval step=1 ") for ln in a.stdout.splitlines()) == 1


def test_test_metric_is_declared_and_task_is_not_a_flag():
    assert "best@3" in vpo.TEST_METRIC
    assert not {"task", "binary"} & {f.name for f in dataclasses.fields(vpo.Args)}  # no flag only to refuse
    assert (vpo.Args().task, vpo.Args().binary) == ("reverse", False)  # what tt.setup and the checks read
