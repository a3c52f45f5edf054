"""The rl-experiments token-reversal setting (--task tokrev, compare.py --preset tokrev): its strings,
reward and error metric on hand-worked examples, how a completion is decoded, and a two-step run of
each method of the published table on it."""
import random
from types import SimpleNamespace

import pytest
import torch

import toy_tasks as tt


def test_strings_are_ten_symbols_over_two_letters():
    task = tt.make_task("tokrev")
    assert task.warmup_steps == 0 and not task.ends_with_eos  # random weights; no EOS, as in the source
    assert len(task.test) == 1000
    for ex in task.test + task.sample(random.Random(0), 200):
        s = ex.prompt[:-1]
        assert ex.prompt[-1] == "=" and len(s) == 10 and set(s) <= {"a", "b"} and ex.answer == s[::-1]
    # 1000 draws with replacement from 2^10 = 1024 strings: about 1024 (1 - e^(-1000/1024)) = 638 distinct,
    # so the held-out set cannot be disjoint from training, and training draws from every string
    assert 550 < len({ex.prompt for ex in task.test}) < 720
    assert {ex.prompt for ex in task.sample(random.Random(1), 3000)} & {ex.prompt for ex in task.test}
    assert [ex.prompt for ex in tt.make_task("tokrev").test] == [ex.prompt for ex in task.test]  # fixed


def test_reward_and_error_on_hand_worked_examples():
    ex = tt.Example("aababbbaab=", "baabbbabaa", "baabbbabaa")
    task, binary = tt.make_task("tokrev"), tt.make_task("tokrev", binary=True)
    assert task.reward("baabbbabaa", ex) == 1.0
    assert task.reward("baabbbabab", ex) == 0.9  # one position of ten wrong
    assert task.reward("abbaaababb", ex) == 0.0  # every position flipped
    assert task.reward("baab", ex) == 0.4  # an early EOS: the six missing positions count as wrong
    assert task.reward("baab_babaa", ex) == 0.9  # a stray pad is one wrong symbol, positions kept
    assert binary.reward("baabbbabab", ex) == 0.0 and binary.reward("baabbbabaa", ex) == 1.0
    # the held-out error is 1 - the mean per-position accuracy over the greedy completions:
    # (0.9 + 0.4 + 1.0) / 3 = 0.766667, error 0.233333
    texts = ["baabbbabab", "baab", "baabbbabaa"]
    acc = sum(tt.char_accuracy(t, ex.answer) for t in texts) / 3
    assert 1 - acc == pytest.approx(0.233333, abs=1e-6)


class ScriptedModel(torch.nn.Module):
    """Stands in for a causal LM in tt.sample: at generation step k every row's logits put all mass on
    script[k], so the completion is exactly the script."""

    def __init__(self, script, vocab):
        super().__init__()
        self.script, self.vocab, self.calls = script, vocab, 0
        self.config = SimpleNamespace(vocab_size=vocab, hidden_size=vocab)  # as narrow as the tiny model: every position

    def forward(self, input_ids, **kw):
        logits = torch.full((input_ids.size(0), input_ids.size(1), self.vocab), -30.0)
        logits[:, -1, self.script[min(self.calls, len(self.script) - 1)]] = 30.0
        self.calls += 1
        return SimpleNamespace(logits=logits, past_key_values=None)


def test_a_stray_special_token_decodes_to_one_wrong_character():
    task = tt.make_task("tokrev")
    tok = tt.build_char_tokenizer(task.alphabet)
    a, b = tok.convert_tokens_to_ids(["a", "b"])
    ids, mask = tt.encode(tok, ["aababbbaab="], "cpu")
    script = [b, a, a, b, tok.pad_token_id, b, a, b, a, a]  # "baab" then a pad where "b" belongs
    r = tt.sample(ScriptedModel(script, len(tok)), tok, ids, mask, max_new_tokens=10, greedy=True)
    assert r.texts == ["baab_babaa"] and r.completion_mask.sum() == 10 and bool(r.truncated[0])
    assert task.reward(r.texts[0], tt.Example("aababbbaab=", "baabbbabaa", "baabbbabaa")) == 0.9
    # an EOS ends the completion early: it is not part of the text, and the mask stops after it
    r = tt.sample(ScriptedModel([b, a, tok.eos_token_id], len(tok)), tok, ids, mask, max_new_tokens=10, greedy=True)
    assert r.texts == ["ba"] and r.completion_mask.tolist() == [[1.0, 1.0, 1.0]]
    with pytest.raises(ValueError):
        tt.build_char_tokenizer("ab.")  # "." is the end-of-sequence character


def test_budget_check_knows_there_is_no_eos(run_fast):
    # 10 symbols and no EOS: --max_new_tokens 10 is enough, 9 is refused with one sentence
    p = run_fast("minimal_grpo.py", "--task", "tokrev", "--max_new_tokens", 9)
    assert p.returncode == 2 and "--max_new_tokens 9" in p.stderr and "up to 10 tokens" in p.stderr


@pytest.mark.parametrize("script", ["minimal_tpo.py", "minimal_dg.py", "minimal_grpo.py"])
def test_two_steps_on_tokrev(run_fast, script):
    p = run_fast(script, "--task", "tokrev", "--steps", 2, "--prompts_per_step", 4, "--eval_every", 1,
                 "--lr", "1e-3", "--max_grad_norm", 1)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    evals = [ln for ln in lines if ln.startswith("eval ")]
    assert len(evals) == 3 and all(" entropy=" in ln for ln in evals)  # held-out entropy, as the source logs
    step = dict(kv.split("=") for kv in next(ln for ln in lines if ln.startswith("step=")).split())
    assert 1 <= float(step["len"]) <= 10  # at most the 10 symbols; an EOS sampled early ends one sooner
    final = dict(kv.split("=") for kv in lines[-1].split()[1:])
    assert 0.0 <= float(final["test_acc"]) <= 1.0
