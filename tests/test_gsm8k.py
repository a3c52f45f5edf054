"""--task gsm8k without a download or a GPU: a generated GSM8K-schema fixture written to disk, a BPE
tokenizer trained here on its text with a chat template, and a tiny random Qwen2 model saved beside it,
all loaded through the same --data and --model code a user runs."""
import json
import math
import re

import pytest
import torch

import gsm8k  # noqa: E402
import toy_tasks as tt
from conftest import load_script

# ---------------------------------------------------------------------------------------------
# The answer check: one lenient rule for the reward and the evaluation.


@pytest.mark.parametrize("text,number,used_hash", [
    ("so the total is\n#### 1,234", 1234.0, True),  # thousands separator
    ("She pays $18.00 in all.", 18.0, False),  # dollar sign and cents, no ####: the last number
    ("The answer is 42.", 42.0, False),  # a trailing period is not a decimal point
    ("#### 3\nwait, no\n#### 5", 5.0, True),  # #### twice: the last one
    ("I cannot tell.", None, False),  # no number at all
    ("The temperature fell to -7 degrees.", -7.0, False),  # a negative number
    ("#### 42\nbecause 6 * 7 = 42, and 3 apples", 42.0, True),  # a number in reasoning after the answer
    ("####", None, False),  # #### with nothing after it and no number anywhere
    ("twelve, or 12, then ####", 12.0, False),  # #### with no number after it: the last number before
])
def test_final_answer_hard_cases(text, number, used_hash):
    assert gsm8k.final_answer(text) == (number, used_hash)


def test_reward_compares_numbers_not_strings():
    task = gsm8k.GSM8KTask.__new__(gsm8k.GSM8KTask)  # no data needed for the reward
    ex = tt.Example("q", "4 + 8 = 12 apples.\n#### 12", "")
    for text, reward in [("#### 12", 1.0), ("12.00", 1.0), ("$12", 1.0), ("#### 12.5", 0.0), ("#### 1,2", 1.0),
                         ("13 or 12", 1.0), ("12 or 13", 0.0), ("", 0.0)]:
        assert task.reward(text, ex) == reward, text


# ---------------------------------------------------------------------------------------------
# A local GSM8K, a tokenizer with a chat template, a tiny Qwen2: the fixtures every run below loads.


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """(data folder, single data file, model folder) made in a temporary folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("gsm8k")
    records = gsm8k.make_gsm8k_like(60, seed=0)
    (root / "data").mkdir()
    write_jsonl(root / "data" / "train.jsonl", records[:40])
    write_jsonl(root / "data" / "test.jsonl", records[40:])
    write_jsonl(root / "one_file.jsonl", records)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    text = [r["question"] + "\n" + r["answer"] for r in records] + [gsm8k.GSM8K_INSTRUCTION, "user assistant"]
    backend.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root / "data", root / "one_file.jsonl", root / "model"


def test_a_local_folder_and_a_single_file_load_with_the_schema(local):
    data, one_file, _ = local
    task = tt.make_task("gsm8k", data=str(data), eval_size=5)
    assert len(task.train) == 40 and len(task.test_records) == 5  # the first 5 test problems
    assert task.test_records[0] == gsm8k.make_gsm8k_like(60, seed=0)[40]
    single = tt.make_task("gsm8k", data=str(one_file), eval_size=5)
    assert len(single.test_records) == 5 and len(single.train) == 55  # one file: the first records held out
    assert tt.make_task("gsm8k", data=str(data)).eval_size == 20  # 200 or, fewer here, the whole test split


def test_prompts_use_the_chat_template_once_and_solutions_drop_annotations(local):
    data, _, model = local
    from transformers import AutoTokenizer

    task = tt.make_task("gsm8k", data=str(data), eval_size=2)
    tok = AutoTokenizer.from_pretrained(model)
    task.attach(tok)
    ex = task.test[0]
    question = task.test_records[0]["question"]
    assert ex.prompt == f"<|im_start|>user\n{question}\n{gsm8k.GSM8K_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
    assert "<<" not in ex.answer and ex.answer.endswith(f"#### {gsm8k.final_answer(ex.answer)[0]:g}")
    assert task.reward(ex.answer, ex) == 1.0  # the reference solution passes its own check
    tok.chat_template = None  # plain text without a template
    task.attach(tok)
    assert task.test[0].prompt == f"{question}\n{gsm8k.GSM8K_INSTRUCTION}\n"


def test_prompt_tokens_are_never_completion_tokens(local):
    data, _, model = local
    from transformers import AutoModelForCausalLM, AutoTokenizer

    task = tt.make_task("gsm8k", data=str(data), eval_size=2)
    tok = AutoTokenizer.from_pretrained(model, padding_side="left")
    task.attach(tok)
    ids, mask = tt.encode(tok, [ex.prompt for ex in task.test], "cpu")
    rollout = tt.sample(AutoModelForCausalLM.from_pretrained(model), tok, ids, mask, 8)
    assert torch.equal(rollout.prompt_ids, ids) and rollout.completion_ids.size(1) <= 8
    assert rollout.lengths.max() <= 8  # the mask counts sampled tokens only


def test_metrics_test_acc_exact_and_format():
    task = gsm8k.GSM8KTask.__new__(gsm8k.GSM8KTask)
    examples = [tt.Example("q", "#### 12", "")] * 4
    texts = ["#### 12", "it is 12", "#### 13", "no idea"]
    # right: 1, 1, 0, 0 -> test_acc 0.5; right and after ####: 1 -> exact 0.25; #### used: 2 of 4
    assert task.test_metrics(texts, examples) == (0.5, 0.25)
    assert task.extra_metrics(texts) == {"format": 0.5}


# ---------------------------------------------------------------------------------------------
# Every file that fits runs two steps on the fixture through --model and --data; the others refuse.

FITTING = ["minimal_pg.py", "minimal_grpo.py", "minimal_drgrpo.py", "minimal_dapo.py", "minimal_tpo.py",
           "minimal_dg.py", "minimal_tree_grpo.py", "minimal_opd.py", "minimal_sft.py", "minimal_dpo.py",
           "minimal_ppo.py"]
TWO_STEPS = ["--steps", 2, "--eval_every", 0, "--prompts_per_step", 2, "--group_size", 2, "--micro_batch", 1,
             "--max_new_tokens", 64, "--eval_size", 3, "--task", "gsm8k"]
OWN = {"minimal_dapo.py": ["--overlong_cache", 16, "--max_rounds", 50],  # a random model is rarely right
       "minimal_tree_grpo.py": ["--trees", 2],
       "minimal_opd.py": ["--teacher_min_acc", 0]}


QUICK = ("minimal_grpo.py", "minimal_opd.py", "minimal_sft.py", "minimal_ppo.py")  # sampling, a teacher, no sampling, a critic


@pytest.mark.parametrize("script", [s if s in QUICK else pytest.param(s, marks=pytest.mark.slow) for s in FITTING])
def test_fitting_files_run_two_steps_on_gsm8k(run_fast, local, script):
    data, _, model = local
    args = TWO_STEPS + ["--data", data, "--model", model] + OWN.get(script, [])
    if script == "minimal_opd.py":
        args += ["--teacher", model]
    if script == "minimal_tree_grpo.py":  # no --group_size: 2 trees of 3 leaves a prompt
        i = args.index("--group_size")
        args = args[:i] + args[i + 2:]
    p = run_fast(script, *args)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    step = next(line for line in lines if line.startswith("step=2 "))
    if script != "minimal_sft.py":  # SFT on the reference solutions samples nothing to count
        assert step.split()[-1].startswith("format="), step  # the task's own column, last
    assert lines[-2].startswith("eval step=2 ") and "format=" in lines[-2]
    assert lines[-1].startswith("final test_acc=")
    assert all(math.isfinite(float(kv.split("=")[1])) for kv in step.split()), step


@pytest.mark.parametrize("script", ["minimal_vpo.py", "minimal_pedagogical.py"])
def test_files_that_do_not_fit_refuse_with_one_sentence(run_fast, local, script):
    _, _, model = local
    p = run_fast(script, "--task", "gsm8k", "--model", model)  # neither file has a --data flag
    assert p.returncode == 2 and p.stdout == "" and p.stderr.startswith("error: --task")
    assert p.stderr.count("\n") == 1


@pytest.mark.parametrize("flags,starts", [
    (["--data", "/no/such/folder"], "error: --data"),
    (["--eval_size", 500], "error: --eval_size 500 is larger than the test split"),
    (["--max_new_tokens", 32], "error: --max_new_tokens 32 is too small for --task gsm8k"),
    (["--eval_size", -1], "error: --eval_size"),
])
def test_bad_gsm8k_input_stops_before_any_model_loads(run_fast, local, monkeypatch, flags, starts):
    data, _, model = local
    monkeypatch.setattr(tt, "load_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    p = run_fast("minimal_grpo.py", "--task", "gsm8k", "--data", data, "--model", model, *flags)
    assert p.returncode == 2 and p.stdout == "" and p.stderr.startswith(starts), p.stderr
    assert p.stderr.count("\n") == 1


def test_data_without_the_schema_and_the_tiny_default_are_refused(run_fast, local, tmp_path, monkeypatch):
    _, _, model = local
    (tmp_path / "bad").mkdir()
    write_jsonl(tmp_path / "bad" / "train.jsonl", [{"problem": "1+1", "solution": "2"}])
    write_jsonl(tmp_path / "bad" / "test.jsonl", [{"problem": "1+1", "solution": "2"}])
    monkeypatch.setattr(tt, "load_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    p = run_fast("minimal_grpo.py", "--task", "gsm8k", "--data", tmp_path / "bad", "--model", model)
    assert p.returncode == 2 and "lacks the fields question and answer" in p.stderr
    p = run_fast("minimal_grpo.py", "--task", "gsm8k", "--data", tmp_path / "bad")
    assert p.returncode == 2 and p.stderr.startswith("error: --task gsm8k needs a pretrained --model")
    p = run_fast("minimal_grpo.py", "--data", tmp_path / "bad")
    assert p.returncode == 2 and p.stderr.startswith("error: --data applies to --task gsm8k")


def test_a_template_that_writes_the_bos_gets_exactly_one():
    """A Llama-style template writes the BOS itself: `encode`, which adds the tokenizer's specials,
    would give a second one unless the prompt drops it; a tokenizer that adds no BOS must keep it."""
    from tokenizers import processors

    task = gsm8k.GSM8KTask.__new__(gsm8k.GSM8KTask)  # no data needed for a prompt
    task.tok = tok = tt.build_char_tokenizer(tt.ReverseTask.alphabet)  # its BOS "^" goes in front of every text
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
                         "{% if add_generation_prompt %}=>{% endif %}")
    body = f"<abc\n{gsm8k.GSM8K_INSTRUCTION}>=>"
    bos = lambda prompt: int((tt.encode(tok, [prompt], "cpu")[0] == tok.bos_token_id).sum())
    assert task.prompt("abc") == body and bos(task.prompt("abc")) == 1
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    assert task.prompt("abc") == "^" + body and bos(task.prompt("abc")) == 1  # the template's own BOS stays


@pytest.mark.slow
def test_the_gpu_benchmark_runs_on_a_cpu_at_the_tiny_shape(run, capsys):
    # the plumbing of results/gpu/benchmark.py (model and data built locally, the recommended flags,
    # the measuring wrapper), at a 2-layer shape on the CPU: one line per file, a failure fails the run
    p = run("results/gpu/benchmark.py", "--shape", "tiny", "--device", "cpu", "--steps", 2, "--methods", "grpo")
    assert p.returncode == 0, p.stderr
    assert re.search(r"^grpo: [0-9.]+ s/step, peak GPU memory n/a, peak RSS [0-9.]+ GB", p.stdout, re.M), p.stdout
    benchmark = load_script("results/gpu/benchmark.py")
    with pytest.raises(SystemExit) as bad:
        benchmark.main(["--device", "cpu", "--steps", 1])
    assert bad.value.code == 2 and "--steps 1" in capsys.readouterr().err
