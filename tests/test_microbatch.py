"""The memory plan: micro-batches whose accumulated gradient is the whole batch's in every file, lean
log-probs (completion positions only, one micro-batch at a time), the precision and device policy, and
the flags that choose them."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import microbatch as mbt
import minimal_dapo as dapo
import minimal_dg as dg
import minimal_drgrpo as drgrpo
import minimal_grpo as grpo
import minimal_opd as opd
import minimal_pedagogical as ped
import minimal_pg as pg
import minimal_tpo as tpo
import minimal_tree_grpo as tree
import minimal_vpo as vpo
import toy_tasks as tt

ROOT = Path(__file__).resolve().parents[1]
P, G = 3, 4  # three prompts of four completions: micro-batches of 1 and 2 prompts, the last one smaller


# ---------------------------------------------------------------------------------------------
# The pieces in toy_tasks.py.


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
    task, tok, model = mbt.tiny_policy()
    rollout, _ = mbt.ragged_rollout(tok, task, P, G)
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
    task, tok, _ = mbt.tiny_policy(warmup=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    rollout, _ = mbt.ragged_rollout(tok, task, P, G)
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
    task, tok, model = mbt.tiny_policy()
    rollout, _ = mbt.ragged_rollout(tok, task, P, G)
    seen, forward = spy_on_forward(model)
    with torch.no_grad():
        lean = tt.completion_logits(model, rollout, 1.0)
        assert seen == [0]
        assert torch.equal(lean, full_logits(forward, rollout)[:, rollout.prompt_ids.size(1) - 1:-1])


def test_evaluation_in_chunks_gives_the_same_numbers():
    task, tok, model = mbt.tiny_policy()
    task.test = task.test[:40]
    whole = tt.evaluate(model, tok, task, "cpu", 10)
    chunked = tt.evaluate(model, tok, task, "cpu", 10, rows=16)
    assert whole[:2] == chunked[:2] and chunked[2]["entropy"] == pytest.approx(whole[2]["entropy"], abs=1e-6)


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


# ---------------------------------------------------------------------------------------------
# Every file: one update with --micro_batch 1 and 2 gives the whole batch's gradient and log, on a
# batch whose micro-batches hold 4 and 40 tokens. The ratios are spread across the clip band.


def batch_and_logprobs(temperature=1.0, group=G):
    task, tok, model = mbt.tiny_policy()
    rollout, examples = mbt.ragged_rollout(tok, task, P, group, temperature=temperature)
    torch.manual_seed(1)
    n, t = rollout.completion_ids.shape
    with torch.no_grad():
        now = tt.token_logprobs(model, rollout)[0]
    old, ref = now + 0.3 * torch.randn(n, t), now + 0.3 * torch.randn(n, t)
    return task, tok, model, rollout, examples, old, ref


def compare(model, run, args_for):
    results = {}
    for mb in (0, 1, 2):
        torch.manual_seed(7)  # the same draws for a stochastic screen (DG's Kondo gate)
        results[mb] = mbt.gradient_and_log(model, lambda opt: run(opt, args_for(mb)))
    return mbt.assert_same_update(results)


def test_pg_micro_batches_are_exact():
    _, _, model, rollout, _, _, _ = batch_and_logprobs()
    adv = torch.randn(P * G)
    args = lambda mb: pg.Args(group_size=G, prompts_per_step=P, micro_batch=mb, max_grad_norm=1e9)
    compare(model, lambda opt, a: pg.update(model, opt, rollout, adv, 1, a), args)


@pytest.mark.parametrize("module", [grpo, drgrpo, vpo])
def test_grpo_family_micro_batches_are_exact(module):
    _, _, model, rollout, _, old, ref = batch_and_logprobs()
    adv = torch.randn(P * G)
    args = lambda mb: module.Args(group_size=G, prompts_per_step=P, micro_batch=mb, max_grad_norm=1e9)
    compare(model, lambda opt, a: module.update(model, opt, rollout, adv, old, ref, 1, a), args)


def test_dapo_micro_batches_are_exact_and_a_per_micro_batch_token_mean_is_not(monkeypatch):
    _, _, model, rollout, _, old, _ = batch_and_logprobs()
    adv = torch.randn(P * G)
    args = lambda mb: dapo.Args(group_size=G, prompts_per_step=P, micro_batch=mb, max_grad_norm=1e9)
    run = lambda opt, a: dapo.update(model, opt, rollout, adv, old, 1, a)
    compare(model, run, args)
    # the TRL bnpo / verl legacy-actor normaliser: each micro-batch divided by its own token count
    monkeypatch.setattr(dapo, "aggregate", lambda per_token, mask, tokens: (per_token * mask).sum() / mask.sum())
    with pytest.raises(AssertionError, match="gradient differs"):
        compare(model, run, args)


def test_tpo_micro_batches_are_exact():
    _, _, model, rollout, _, old, _ = batch_and_logprobs()
    q = torch.randn(P, G).softmax(1)
    args = lambda mb: tpo.Args(group_size=G, prompts_per_step=P, micro_batch=mb, max_grad_norm=1e9)
    compare(model, lambda opt, a: tpo.update(model, opt, rollout, q, old, 1, a), args)


@pytest.mark.parametrize("kondo", ["off", "stochastic", "hard"])
def test_dg_micro_batches_are_exact(kondo):
    _, _, model, rollout, _, _, _ = batch_and_logprobs()
    adv = torch.randn(P * G)
    args = lambda mb: dg.Args(group_size=G, prompts_per_step=P, micro_batch=mb, max_grad_norm=1e9,
                              kondo=kondo != "off", kondo_hard=kondo == "hard")
    compare(model, lambda opt, a: dg.update(model, opt, rollout, adv, 1, a), args)


@pytest.mark.parametrize("estimator", ["sampled", "full"])
def test_opd_micro_batches_are_exact(estimator):
    _, _, model, rollout, _, _, _ = batch_and_logprobs()
    teacher = mbt.tiny_policy(seed=1)[2].eval().requires_grad_(False)
    args = lambda mb: opd.Args(group_size=G, prompts_per_step=P, micro_batch=mb, max_grad_norm=1e9,
                               estimator=estimator)
    compare(model, lambda opt, a: opd.update(model, opt, rollout, teacher, 1, a), args)


def test_tree_micro_batches_are_exact():
    leaves = tree.leaves_per_prompt(tree.Args())  # 4 trees of 3 leaves
    _, _, model, rollout, _, old, ref = batch_and_logprobs(group=leaves)
    adv = torch.randn(rollout.completion_ids.shape) * rollout.completion_mask  # one advantage per token
    args = lambda mb: tree.Args(prompts_per_step=P, micro_batch=mb, max_grad_norm=1e9)
    compare(model, lambda opt, a: tree.update(model, opt, rollout, adv, old, ref, 1, a), args)


def test_pedagogical_teacher_student_and_learnability_micro_batches_are_exact():
    task, tok, model = mbt.tiny_policy("keyed")
    rollout, _ = mbt.ragged_rollout(tok, task, P, G)
    with torch.no_grad():
        old = tt.token_logprobs(model, rollout)[0] + 0.3 * torch.randn(rollout.completion_ids.shape)
    adv = torch.randn(P * G)
    args = lambda mb: ped.Args(group_size=G, prompts_per_step=P, student_batch=P, micro_batch=mb,
                               max_grad_norm=1e9)
    compare(model, lambda opt, a: ped.update(model, opt, rollout, adv, old, 1, a), args)
    student = mbt.tiny_policy("keyed", seed=1)[2]
    examples = task.test[:P]
    compare(student, lambda opt, a: ped.student_update(student, opt, model, tok, task, examples, 1, a, "cpu")[:2], args)
    whole, per_prompt = ped.learnability_pass(student, rollout, args(0)), ped.learnability_pass(student, rollout, args(1))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(whole, per_prompt))


# ---------------------------------------------------------------------------------------------
# End to end, as the issue checks it: one step with --micro_batch against one step without, every file.

FILES = ["minimal_pg.py", "minimal_grpo.py", "minimal_drgrpo.py", "minimal_dapo.py", "minimal_tpo.py",
         "minimal_dg.py", "minimal_opd.py", "minimal_vpo.py", "minimal_tree_grpo.py", "minimal_pedagogical.py",
         "minimal_ppo.py", "minimal_sft.py", "minimal_dpo.py"]
ONE_STEP = ["--steps", 1, "--warmup_steps", 2, "--eval_every", 0, "--prompts_per_step", 4]
EXTRA = {"minimal_opd.py": ["--teacher_steps", 2, "--teacher_min_acc", 0],
         "minimal_pedagogical.py": ["--teacher_warmup_steps", 2, "--teacher_mix_steps", 2, "--student_batch", 4]}


def step_line(p):
    assert p.returncode == 0, p.stderr
    line = next(line for line in p.stdout.splitlines() if line.startswith("step=1 "))
    return dict(kv.split("=") for kv in line.split())


@pytest.mark.parametrize("script", FILES)
def test_one_step_with_micro_batches_prints_the_same_line(run_fast, script):
    args = ONE_STEP + EXTRA.get(script, [])
    whole, split = step_line(run_fast(script, *args)), step_line(run_fast(script, *args, "--micro_batch", 1))
    for key in ("loss", "grad_norm", "ratio", "clip_frac", "entropy"):
        assert float(split[key]) == pytest.approx(float(whole[key]), rel=5e-4, abs=1e-4), key


def test_gradient_checkpointing_changes_memory_not_numbers(run_fast):
    whole = step_line(run_fast("minimal_grpo.py", *ONE_STEP))
    checkpointed = step_line(run_fast("minimal_grpo.py", *ONE_STEP, "--grad_checkpointing", "--micro_batch", 2))
    for key in ("loss", "grad_norm", "ratio", "clip_frac", "entropy"):
        assert float(checkpointed[key]) == pytest.approx(float(whole[key]), rel=5e-4, abs=1e-4), key


@pytest.mark.parametrize("flags,flag", [
    (["--micro_batch", -1], "--micro_batch"),
    (["--micro_batch", 5], "--micro_batch"),  # more prompts than the 4 a step trains on
    (["--dtype", "float16"], "--dtype"),
    (["--dtype", "bfloat16", "--device", "cpu"], "--dtype bfloat16"),
])
def test_bad_memory_flags_stop_with_one_sentence(run_fast, flags, flag):
    p = run_fast("minimal_grpo.py", *ONE_STEP, *flags)
    assert p.returncode == 2 and p.stdout == ""  # before any work: not even the base evaluation
    assert p.stderr.startswith(f"error: {flag}") and p.stderr.count("\n") == 1


# ---------------------------------------------------------------------------------------------
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


PEAK = """import resource, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("peak_rss_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_gb(*args):
    p = subprocess.run([sys.executable, "-c", PEAK, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=1800, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "final test_acc=" in p.stdout
    return int(p.stdout.split("peak_rss_kb")[-1]) / 1024 ** 2


@pytest.mark.slow
def test_micro_batches_cut_peak_memory_at_a_real_vocabulary(tmp_path):
    save_big_vocab_llama(tmp_path / "llama")
    run = ["minimal_grpo.py", "--model", tmp_path / "llama", "--steps", 2, "--eval_every", 0, "--device", "cpu"]
    whole, split = peak_rss_gb(*run), peak_rss_gb(*run, "--micro_batch", 2)
    print(json.dumps({"peak_rss_gb_whole_batch": round(whole, 3), "peak_rss_gb_micro_batch_2": round(split, 3)}))
    assert split < whole / 3 and split < 2.5, (whole, split)
