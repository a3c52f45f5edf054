"""Tests of toy_tasks.py, the module every file shares: the tasks (reverse, add, tokrev and the others'
rewards, seeding, the held-out sets), the tokenizer, sampling (masks, left padding, the temperature asked
for), the scoring temperature, the memory plan (micro-batch slices, token-weighted batch metrics, lean
log-probs, scoring and evaluation in chunks, gradient checkpointing, peak memory at a real vocabulary), the
device and precision policy, and the plumbing every run goes through (--log_jsonl, --model from a local
folder, the token budget)."""
import json
import math
import os
import random
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import transformers

import minimal_grpo as grpo
import toy_tasks as tt
from conftest import FAST, ROOT, SHORT, ragged_rollout, step_line, strip_time, tiny_policy

P, G = 3, 4  # three prompts of four completions: micro-batches of 1 and 2 prompts, the last one smaller


# ---------------------------------------------------------------------------------------------------------
# The tasks: rewards, seeding, the held-out sets.


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


# ---------------------------------------------------------------------------------------------------------
# The tokrev task (the rl-experiments token reversal): its strings, reward and error metric on hand-worked
# examples, how a completion is decoded.


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


# ---------------------------------------------------------------------------------------------------------
# The tokenizer, the completion mask, sampling and scoring.


def test_char_tokenizer_round_trip():
    tok = tt.build_char_tokenizer(tt.ReverseTask.alphabet)
    ids = tok("abcd=").input_ids
    assert ids[0] == tok.bos_token_id and len(ids) == 6
    assert tok.decode(ids, skip_special_tokens=True) == "abcd="


def test_completion_mask_includes_the_first_eos_only():
    tokens = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 0, 0, 0]])
    mask = tt.completion_mask_from(tokens, eos_id=2)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_sampling_masks_and_left_padding():
    task, tok, model = tiny_policy(warmup=0)
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
    task, tok, model = tiny_policy(warmup=0)
    ex = task.test[0]
    assert task.teacher_prompt(ex) == ex.answer + "|" + ex.prompt
    # tree-style continuation: any prefix (prompt plus part of a completion) can be sampled from
    ids, mask = tt.encode(tok, [ex.prompt + ex.answer[:2]], "cpu")
    r = tt.sample(model, tok, ids, mask, max_new_tokens=4)
    assert r.completion_ids.shape[1] <= 4


def test_scoring_temperature_is_explicit():
    """A rollout sampled at temperature 0.5: the policy's log-probs are taken at 0.5 by default (its
    pi_old), and a model that only scores the tokens, asked for temperature 1, is not tempered."""
    task, tok, model = tiny_policy(warmup=0)
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


def test_sampling_draws_at_the_temperature_asked_for():
    # 4000 one-token completions of one prompt at temperature 0.5: the share of each token is
    # softmax(logits / 0.5), not softmax(logits); greedy takes the argmax
    task, tok, model = tiny_policy(warmup=0)
    ids, mask = tt.encode(tok, ["abc="] * 4000, "cpu")
    with torch.no_grad():
        logits = model(input_ids=ids[:1], attention_mask=mask[:1]).logits[0, -1]
    torch.manual_seed(0)
    first = tt.sample(model, tok, ids, mask, 1, temperature=0.5).completion_ids[:, 0]
    share = torch.bincount(first, minlength=len(tok)).float() / 4000
    assert (share - (logits / 0.5).softmax(-1)).abs().sum() < 0.05 < (share - logits.softmax(-1)).abs().sum()
    assert tt.sample(model, tok, ids[:2], mask[:2], 1, greedy=True).completion_ids[0, 0] == logits.argmax()


def test_check_finite_stops_with_the_step(capsys):
    with pytest.raises(SystemExit) as e:
        tt.check_finite(torch.tensor(float("nan")), step=7)
    assert e.value.code == 2 and "step 7" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# The memory plan: micro-batch slices, token-weighted batch metrics, lean log-probs, scoring and
# evaluation in chunks, gradient checkpointing.


def test_micro_batch_slices():
    assert tt.micro_batches(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]  # the last one smaller
    assert tt.micro_batches(10, 0) == [slice(0, 10)]  # 0: the whole batch
    assert tt.micro_batches(10, 12) == [slice(0, 10)]
    assert tt.micro_batches(0, 4) == []


def test_batch_metrics_weigh_token_means_by_tokens_and_add_losses():
    # micro-batch 1: 1 token, ratio mean 2.0, loss 0.5; micro-batch 2: 3 tokens, ratio mean 1.0, loss 0.25.
    # The batch's ratio is the token mean (2 + 3 * 1) / 4 = 1.25, not the mean of means 1.5; losses add.
    metrics = tt.BatchMetrics(torch.tensor(4.0))
    metrics.add(torch.tensor([[1.0, 0.0]]), torch.tensor(0.5), ratio=torch.tensor(2.0))
    metrics.add(torch.tensor([[1.0, 1.0], [1.0, 0.0]]), torch.tensor(0.25), ratio=torch.tensor(1.0))
    totals = metrics.totals()
    assert totals["loss"].item() == pytest.approx(0.75) and totals["ratio"].item() == pytest.approx(1.25)
    one = tt.BatchMetrics(torch.tensor(3.0))  # one micro-batch: bit for bit its own values
    one.add(torch.ones(1, 3), torch.tensor(-0.0), ratio=torch.tensor(0.1))
    assert one.totals()["ratio"].item() == torch.tensor(0.1).item() and str(one.totals()["loss"].item()) == "-0.0"


def test_scoring_in_micro_batches_gives_the_whole_batch_numbers():
    task, tok, model = tiny_policy()
    rollout, _ = ragged_rollout(tok, task, P, G)
    with torch.no_grad():
        logp, entropy = tt.token_logprobs(model, rollout)
    for rows in (0, 1, 5):
        logp_mb, entropy_mb = tt.score(model, rollout, rows)
        assert not logp_mb.requires_grad
        assert torch.allclose(logp_mb, logp, atol=1e-6) and torch.allclose(entropy_mb, entropy, atol=1e-6)


def test_entropy_in_chunks_equals_the_direct_sum():
    logp_all = torch.randn(3, 5, 7).log_softmax(-1)
    direct = -(logp_all.exp() * logp_all).sum(-1)
    assert torch.equal(tt.entropy_from_logprobs(logp_all, positions=4), direct)


def spy_on_forward(model):
    """Record the `logits_to_keep` of every call of model (0: not asked); returns the list and the real forward."""
    seen, forward = [], model.forward

    def spy(*a, **k):
        seen.append(k.get("logits_to_keep", 0))
        return forward(*a, **k)

    model.forward = spy
    return seen, forward


def full_logits(forward, rollout):
    ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], 1)
    mask = torch.cat([rollout.prompt_mask, rollout.completion_mask.long()], 1)
    return forward(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits


def test_log_probs_ask_for_completion_positions_only_where_the_vocabulary_is_wide():
    # a vocabulary wider than the hidden states (every real model): the forward pass is asked for T + 1
    # positions (logits_to_keep), the prefill of the sampler for 1, and the log-probs equal those sliced
    # from every position's logits
    task, tok, _ = tiny_policy(warmup=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    rollout, _ = ragged_rollout(tok, task, P, G)
    seen, forward = spy_on_forward(model)
    with torch.no_grad():
        lean = tt.completion_logits(model, rollout, 1.0)
        assert seen == [rollout.completion_ids.size(1) + 1]
        full = full_logits(forward, rollout)
        assert torch.allclose(lean, full[:, rollout.prompt_ids.size(1) - 1:-1], atol=1e-6)
        seen.clear()
        tt.sample(model, tok, rollout.prompt_ids, rollout.prompt_mask, 3)
        assert seen[0] == 1  # the prefill keeps the last position only


def test_the_tiny_default_keeps_every_logit_and_slices_the_same_positions():
    # 7 tokens of vocabulary against 64-wide hidden states: trimming saves nothing and would reorder the
    # output layer's gradient sums, so the default runs ask for every position and slice
    task, tok, model = tiny_policy()
    rollout, _ = ragged_rollout(tok, task, P, G)
    seen, forward = spy_on_forward(model)
    with torch.no_grad():
        lean = tt.completion_logits(model, rollout, 1.0)
        assert seen == [0]
        assert torch.equal(lean, full_logits(forward, rollout)[:, rollout.prompt_ids.size(1) - 1:-1])


def test_evaluation_in_chunks_gives_the_same_numbers():
    task, tok, model = tiny_policy()
    task.test = task.test[:40]
    whole = tt.evaluate(model, tok, task, "cpu", 10)
    chunked = tt.evaluate(model, tok, task, "cpu", 10, rows=16)
    assert whole[:2] == chunked[:2] and chunked[2]["entropy"] == pytest.approx(whole[2]["entropy"], abs=1e-6)


def test_gradient_checkpointing_changes_memory_not_numbers(short_run, run_fast):
    whole = step_line(short_run("minimal_grpo.py", *SHORT["grpo"]))
    checkpointed = step_line(run_fast("minimal_grpo.py", *SHORT["grpo"], "--grad_checkpointing", "--micro_batch", 2))
    for key in ("loss", "grad_norm", "ratio", "clip_frac", "entropy"):
        assert float(checkpointed[key]) == pytest.approx(float(whole[key]), rel=5e-4, abs=1e-4), key


# ---------------------------------------------------------------------------------------------------------
# The device and precision policy.


def test_device_and_precision_policy():
    assert tt.pick_device("auto", pretrained=False).type == "cpu"  # the tiny default: always the CPU
    want = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert tt.pick_device("auto", pretrained=True).type == want
    args = grpo.Args()
    assert tt.autocast_dtype(args, torch.device("cpu")) is None
    assert tt.autocast_dtype(args, torch.device("cuda")) is None  # the tiny default stays float32
    args.model = "some/model"
    assert tt.autocast_dtype(args, torch.device("cuda")) == torch.bfloat16
    assert tt.autocast_dtype(args, torch.device("cpu")) is None
    args.dtype = "float32"
    assert tt.autocast_dtype(args, torch.device("cuda")) is None


def test_a_bfloat16_checkpoint_trains_in_float32(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tt.build_char_tokenizer(tt.ReverseTask.alphabet)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, _ = tt.load_pretrained(str(tmp_path))
    assert {p.dtype for p in model.parameters()} == {torch.float32}


# ---------------------------------------------------------------------------------------------------------
# What every run goes through, run here through minimal_pg.py and minimal_grpo.py: --log_jsonl, the add
# task, --model from a local folder.


def test_log_jsonl_creates_missing_folders(run_fast, tmp_path):
    log = tmp_path / "runs" / "deeper" / "a.jsonl"
    p = run_fast("minimal_pg.py", *FAST, "--log_jsonl", log)
    assert p.returncode == 0, p.stderr
    assert [json.loads(x)["kind"] for x in log.read_text().splitlines()][-1] == "final"


def test_eval_size_evaluates_the_first_held_out_prompts_and_changes_nothing_else(run_fast):
    """--eval_size N: the first N held-out prompts, the training prompts still drawn away from all of them,
    so the step lines are those of a run that evaluates every held-out prompt."""
    full, first = tt.make_task("reverse"), tt.make_task("reverse", eval_size=16)
    assert [ex.prompt for ex in first.test] == [ex.prompt for ex in full.test[:16]]
    assert first.test_prompts == full.test_prompts and len(full.test) == 256
    fewer = run_fast("minimal_pg.py", *FAST, "--eval_size", 16, held_out=None)
    every = run_fast("minimal_pg.py", *FAST, held_out=None)
    steps = lambda p: [ln for ln in strip_time(p.stdout) if ln.startswith("step=")]
    assert every.returncode == 0 and steps(every) == steps(fewer) and len(steps(every)) == 2
    assert strip_time(every.stdout)[0] != strip_time(fewer.stdout)[0]  # the base evaluation differs


def test_add_task_runs(run_fast):
    p = run_fast("minimal_pg.py", "--task", "add", *FAST)
    assert p.returncode == 0, p.stderr


def test_pretrained_model_from_a_local_folder(run_fast, tmp_path, monkeypatch):
    """--model loads any causal LM with its tokenizer; here the tiny Llama saved with save_pretrained,
    so the real loading path is exercised without a download."""
    task, tok, model = tiny_policy(seed=3, warmup=0)  # not the weights a seed-0 run would draw for a fresh model
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


# ---------------------------------------------------------------------------------------------------------
# Memory at a real vocabulary: a Llama with Qwen2.5's 151,936-token vocabulary and a tiny trunk.


QWEN_VOCAB = 151_936


def save_big_vocab_llama(folder):
    """A 2-layer, 64-wide Llama whose tokenizer and logits span 151,936 tokens: the task's characters and
    the specials, then filler tokens that no text uses. Saved as a local --model folder."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials, alphabet = ["_", "^", ".", "?"], sorted(set(tt.ReverseTask.alphabet))
    words = specials + alphabet
    vocab = {w: i for i, w in enumerate(words + [f"<x{i}>" for i in range(QWEN_VOCAB - len(words))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.post_processor = processors.TemplateProcessing(single="^ $A", special_tokens=[("^", 1)])
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="_", bos_token="^", eos_token=".",
                                  unk_token="?", padding_side="left")
    config = LlamaConfig(vocab_size=QWEN_VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    assert len(tok) == QWEN_VOCAB


# VmHWM, this process's own peak: ru_maxrss would carry over the peak of the pytest worker that started it
# (Linux keeps it across exec), and a worker that ran the default runs in process holds gigabytes
PEAK = """import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("peak_rss_kb", next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""


def peak_rss_gb(*args):
    p = subprocess.run([sys.executable, "-c", PEAK, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=1800, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "final test_acc=" in p.stdout
    return int(p.stdout.split("peak_rss_kb")[-1]) / 1024 ** 2


@pytest.mark.slow
def test_micro_batches_cut_peak_memory_at_a_real_vocabulary(tmp_path):
    save_big_vocab_llama(tmp_path / "llama")
    run = ["minimal_grpo.py", "--model", tmp_path / "llama", "--steps", 1, "--epochs", 1, "--eval_every", 0,
           "--eval_size", 32, "--device", "cpu"]  # one epoch: the later ones hold the same tensors
    whole, split = peak_rss_gb(*run), peak_rss_gb(*run, "--micro_batch", 2)
    print(json.dumps({"peak_rss_gb_whole_batch": round(whole, 3), "peak_rss_gb_micro_batch_2": round(split, 3)}))
    assert split < whole / 3 and split < 2.5, (whole, split)
