"""The GPU benchmark: every file that takes --task gsm8k, a few steps each at the recommended single-GPU
settings, on a Qwen2.5-0.5B-shaped model built from its config (random weights, nothing downloaded) and
GSM8K-shaped generated data. One line per file: seconds per step (the median gap between step lines'
`time_s`), peak GPU memory, peak resident memory. Never run by default nor in CI.

    uv run results/gpu/benchmark.py                                  # on a CUDA GPU: every file, 3 steps each
    uv run results/gpu/benchmark.py --shape tiny --device cpu        # the plumbing, on a CPU
    uv run results/gpu/benchmark.py --help                           # its flags
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # toy_tasks.py, the minimal_*.py files, compare.py

import gsm8k  # noqa: E402
import toy_tasks as tt  # noqa: E402
from compare import read_log  # noqa: E402

# The recommended single-GPU settings for --task gsm8k with Qwen/Qwen2.5-0.5B-Instruct (README, On a real
# model): learning rate, beta, group and batch after nanoRL's gsm8k_grpo.py (lr 5e-6, beta 0.04, one or two
# updates per batch) and verl's quickstart (lr 1e-6); 16 prompts x 8 completions a step, 2 prompts (16
# rows) per micro-batch. Every file gets COMMON, then its own flags.
GSM8K_COMMON = "--task gsm8k --lr 2e-6 --prompts_per_step 16 --micro_batch 2 --eval_every 25 --steps 200"
GSM8K_OWN = {
    "pg": "--group_size 8",
    "grpo": "--group_size 8 --epochs 1 --beta 0.04",
    "drgrpo": "--group_size 8 --epochs 1 --beta 0",
    "dapo": "--group_size 8 --epochs 1 --overlong_cache 64",
    "tpo": "--group_size 8 --epochs 2",
    "dg": "--group_size 8",
    "tree_grpo": "--prompts_per_step 10 --trees 4 --epochs 1",  # 4 trees x 3 leaves, no --group_size
    "opd": "--prompts_per_step 64 --group_size 2 --teacher Qwen/Qwen2.5-1.5B-Instruct --teacher_min_acc 0",
    "sft": "--lr 1e-5",  # on the reference solutions; SFT takes a larger step than RL (TRL's default: 2e-5)
    "dpo": "--group_size 8 --beta 0.1",
    "ppo": "--prompts_per_step 128 --group_size 1 --epochs 1",  # 128 completions a step, as GRPO's 16 x 8
}
QWEN_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                intermediate_size=4864, vocab_size=151_936, max_position_embeddings=32768, rope_theta=1e6,
                tie_word_embeddings=True)
TINY = dict(QWEN_05B, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=2048)

# Runs one file in this child process, as `uv run FILE FLAGS` would, then prints the process's peaks; the
# time of each step is read afterwards from the run's JSON lines (`time_s`, seconds since the run began).
MEASURE = """import json, resource, runpy, sys, torch
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
print("benchmark " + json.dumps({
      "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def seconds_per_step(log_path):
    """The median gap between consecutive step lines' `time_s` (None with fewer than two step lines)."""
    stamps = [r["time_s"] for r in read_log(log_path)["step"]]
    gaps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
    return gaps[len(gaps) // 2] if gaps else None


def build_benchmark_model(folder, shape):
    """A Qwen2 of the given shape with random weights and a word-level tokenizer of the same vocabulary
    size with Qwen's chat format, written to folder/model; GSM8K-shaped data to folder/data. Nothing is
    downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    records = gsm8k.make_gsm8k_like(1000, seed=0)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for split, part in (("train", records[:800]), ("test", records[800:])):
        (folder / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    words = sorted({w for r in records for w in (r["question"] + " " + r["answer"] + " " + gsm8k.GSM8K_INSTRUCTION).split()})
    vocab = specials + ["user", "assistant"] + words
    vocab += [f"<x{i}>" for i in range(shape["vocab_size"] - len(vocab))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    config = Qwen2Config(**shape, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(folder / "model")  # loaded as float32
    tok.save_pretrained(folder / "model")


def main(argv=None):
    """Every file that takes --task gsm8k, a few steps each at the recommended settings, on a
    Qwen2.5-0.5B-shaped model with random weights; one line per file with seconds per step (median) and
    peak GPU memory. Random weights never emit EOS, so every completion runs the whole 256-token budget:
    the memory is the worst case of the recommended settings."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    ap = argparse.ArgumentParser(description=main.__doc__.split(";")[0] + ".",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--methods", default=",".join(GSM8K_OWN), help="comma-separated, from: " + ", ".join(GSM8K_OWN))
    ap.add_argument("--steps", type=int, default=3, help="steps per file (the median step time is reported)")
    ap.add_argument("--shape", default="qwen0.5b", choices=["qwen0.5b", "tiny"], help="tiny: a 2-layer trunk and a 2,048-token "
                    "vocabulary, to check the plumbing on a CPU")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu with --shape tiny")
    ap.add_argument("--extra", default="", help="more flags for every run, e.g. '--grad_checkpointing'")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        tt.fail("the GPU benchmark needs a CUDA device (use --shape tiny --device cpu to check the plumbing)")
    unknown = set(args.methods.split(",")) - set(GSM8K_OWN)
    if unknown:
        tt.fail(f"--methods {', '.join(sorted(unknown))}: not files that take --task gsm8k ({', '.join(GSM8K_OWN)})")
    if args.steps < 2:
        tt.fail(f"--steps {args.steps}: the time of a step is the gap between two step lines, so at least 2")
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_benchmark_model(folder, QWEN_05B if args.shape == "qwen0.5b" else TINY)
        for name in args.methods.split(","):
            common = GSM8K_COMMON.replace("--steps 200", f"--steps {args.steps}")
            own = GSM8K_OWN[name].replace("--teacher Qwen/Qwen2.5-1.5B-Instruct", f"--teacher {folder / 'model'}")
            flags = (common.split() + own.split() + args.extra.split()
                     + ["--data", str(folder / "data"), "--model", str(folder / "model"), "--eval_size", "16",
                        "--eval_every", "0", "--device", args.device, "--log_jsonl", str(folder / f"{name}.jsonl")])
            started = time.time()
            p = subprocess.run([sys.executable, "-c", MEASURE, f"minimal_{name}.py", *flags], cwd=ROOT,
                               capture_output=True, text=True)
            if p.returncode:
                print(f"{name}: failed ({p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode})")
                failed.append(name)
                continue
            found = json.loads(p.stdout.split("benchmark ")[-1])
            found["s_per_step"] = seconds_per_step(folder / f"{name}.jsonl")
            gb = f"{found['peak_gpu_gb']:.1f} GB" if found["peak_gpu_gb"] is not None else "n/a"
            print(f"{name}: {found['s_per_step']:.2f} s/step, peak GPU memory {gb}, peak RSS "
                  f"{found['peak_rss_gb']:.1f} GB, {time.time() - started:.0f} s in all", flush=True)
    if failed:
        tt.fail(f"the GPU benchmark: {', '.join(failed)} failed (each one's last error line is above)")


if __name__ == "__main__":
    main()
