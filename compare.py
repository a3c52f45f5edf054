"""Run several methods on the same task with the same budget and several seeds; write one figure
and one table.

    uv run compare.py --methods grpo,tpo --seeds 3
    uv run compare.py --preset tokrev            # the published token-reversal table (README)
    uv run compare.py --own_defaults --seeds 3   # every file with its own defaults: the spread to expect
    uv run compare.py --tree_sampler --seeds 3   # claim C1 of minimal_tree_grpo.py: tree vs chains at matched tokens
    uv run compare.py --gpu_benchmark            # on a CUDA GPU only: every gsm8k file on a Qwen2.5-0.5B shape

Every `minimal_NAME.py` at the top level is a method called NAME: a new file joins without any
change here. Each method x seed runs as its own process, exactly as a user would run the file,
with --log_jsonl; runs go two at a time (one thread each) so both CPU cores are busy. The shared
budget (steps, prompts per step, group size, inner epochs) is passed to every method that has the
flag; what a method cannot share is printed before anything runs. --extra passes more flags to every
run, --per_method to one method only. A preset is a named set of these defaults.

Into --out it writes NAME_seedS.jsonl per run, compare.png (held-out test_acc, sampling entropy and
clip fraction against step, or against generated tokens with --x gen_tokens: mean +- standard error
across seeds) and compare.md (final test_acc, or test error with --error, mean +- std; the first step
at which the sampling entropy, and the first evaluation at which the held-out entropy, falls to 0.1 or
below; wall time per run). A file whose test_acc is not greedy per-character accuracy says so in a
module constant TEST_METRIC, and the table then names each row's metric.
"""
import argparse
import dataclasses
import glob
import importlib
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SHARED = ["steps", "prompts_per_step", "group_size", "epochs"]  # the budget every method should share
ENTROPY_FLOOR = 0.1
# name -> defaults for the flags of main(), e.g. a published setting to reproduce
PRESETS = {
    # rl-experiments' token reversal (METHODS.md section 11): 10 symbols over 2 letters from random
    # weights, 96 completions a step (12 prompts x 8), lr 1e-3, grad clip 1, 300 steps, 4 inner epochs,
    # evaluation every 20 steps, 3 seeds. The source's GRPO penalises k3 to pi_old, not to a frozen
    # reference (README: Reproducing the published table), hence --beta 0 for ours.
    "tokrev": dict(methods="tpo,dg,grpo", seeds=3, steps=300, prompts_per_step=12, group_size=8, epochs=4,
                   extra="--task tokrev --lr 1e-3 --max_grad_norm 1 --eval_every 20", per_method="grpo: --beta 0",
                   error=True, out="runs/tokrev"),
}
DEFAULT_METRIC = "greedy per-character accuracy"  # what test_acc is, unless a file says otherwise


def available_methods():
    """{name: file} for every minimal_NAME.py beside this file."""
    return {Path(f).stem.removeprefix("minimal_"): Path(f).name for f in sorted(glob.glob(str(ROOT / "minimal_*.py")))}


# --------------------------------------------------------------------------------------------------
# Aggregation: plain functions over lists, tested on hand-made logs.


def mean_std_se(values):
    """(mean, sample std, standard error of the mean) of a list; std and se are 0 for one value."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std, std / math.sqrt(n)


def first_at_or_below(steps, values, threshold=ENTROPY_FLOOR):
    """The first step whose value is at or below the threshold, or None if it never is."""
    return next((s for s, v in zip(steps, values) if v <= threshold), None)


def first_at_or_above(steps, values, threshold):
    """The first step whose value is at or above the threshold (e.g. test_acc >= 0.95), or None."""
    return next((s for s, v in zip(steps, values) if v >= threshold), None)


def read_log(path):
    """One run's JSON lines as {"step": [...records], "eval": [...], "final": {...}}, and any other kind
    of line a file writes (e.g. "teacher") as a list under its kind."""
    out = {"step": [], "eval": [], "final": None}
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "final":
            out["final"] = rec
        else:
            out.setdefault(rec["kind"], []).append(rec)
    return out


def curve(logs, kind, key):
    """Mean and standard error of `key` across seeds at each step the runs share: (steps, mean, se)."""
    per_run = [{r["step"]: r[key] for r in log[kind]} for log in logs]
    steps = sorted(set.intersection(*(set(p) for p in per_run)))
    stats = [mean_std_se([p[s] for p in per_run]) for s in steps]
    return steps, [m for m, _, _ in stats], [se for _, _, se in stats]


def cumulative_tokens(logs, steps):
    """The x-axis for --x gen_tokens: at each step, the generated tokens summed over steps 1..step,
    averaged across seeds (step 0, before any sampling, is 0)."""
    totals = []
    for log in logs:
        running, seen = {0: 0.0}, 0.0
        for r in log["step"]:
            seen += r["gen_tokens"]
            running[r["step"]] = seen
        totals.append(running)
    return [sum(t[s] for t in totals) / len(totals) for s in steps]


def summarise(logs, reach=()):
    """One table row's numbers for one method: dict of final accuracy, entropy-collapse steps, times,
    and for each threshold in `reach` the first evaluated step with test_acc at or above it, per run.
    Two entropies: the sampling entropy of the step lines (every step, on training completions) and
    the held-out entropy of the eval lines (every --eval_every steps, along greedy completions of the
    test prompts: what rl-experiments reports)."""
    finals = [log["final"]["test_acc"] for log in logs]
    collapse = [first_at_or_below([r["step"] for r in log["step"]], [r["entropy"] for r in log["step"]])
                for log in logs]
    held_out = [first_at_or_below([r["step"] for r in log["eval"]], [r.get("entropy", 1.0) for r in log["eval"]])
                for log in logs]
    reached = {t: [first_at_or_above([r["step"] for r in log["eval"]], [r["test_acc"] for r in log["eval"]], t)
                   for log in logs] for t in reach}
    return {"test_acc": mean_std_se(finals), "base_acc": mean_std_se([log["final"]["base_acc"] for log in logs]),
            "collapse": collapse, "collapse_eval": held_out, "time_s": mean_std_se([log["wall_s"] for log in logs]),
            "seeds": len(logs), "reach": reached}


def collapse_cell(collapse):
    hit = [c for c in collapse if c is not None]
    if not hit:
        return "never"
    mean, std, _ = mean_std_se(hit)
    text = f"{mean:.0f} ± {std:.0f}" if len(hit) > 1 else f"{hit[0]}"
    return text if len(hit) == len(collapse) else f"{text} ({len(hit)} of {len(collapse)} seeds; others never)"


def markdown_table(summaries, metrics=None, error=False):
    """One row per method. When the methods' test_acc measure different things (metrics: {name: what
    test_acc is}), a column says which, so that no reader compares them as one number. error=True
    reports the final test error, 1 - test_acc, as rl-experiments does (the same spread)."""
    metrics = metrics or {}
    mixed = len({metrics.get(name, DEFAULT_METRIC) for name in summaries}) > 1
    final = "final test error (mean ± std)" if error else "final test_acc (mean ± std)"
    reach = list(next(iter(summaries.values())).get("reach", {}))  # thresholds asked for with --reach
    rows = [f"| method | {final} | base_acc | first step with sampling entropy ≤ 0.1 | first eval with held-out "
            "entropy ≤ 0.1 | wall time per run (s) | seeds |"
            + "".join(f" first eval step with test_acc ≥ {t} |" for t in reach) + (" test_acc is |" if mixed else ""),
            "|---|---|---|---|---|---|---|" + "---|" * len(reach) + ("---|" if mixed else "")]
    for name, s in summaries.items():
        (m, sd, _), (b, _, _), (t, _, _) = s["test_acc"], s["base_acc"], s["time_s"]
        rows.append(f"| {name} | {1 - m if error else m:.3f} ± {sd:.3f} | {b:.3f} | {collapse_cell(s['collapse'])} | "
                    f"{collapse_cell(s['collapse_eval'])} | {t:.0f} | {s['seeds']} |"
                    + "".join(f" {collapse_cell(s['reach'][th])} |" for th in reach)
                    + (f" {metrics.get(name, DEFAULT_METRIC)} |" if mixed else ""))
    return "\n".join(rows) + "\n"


def plot(all_logs, path, x="step", metrics=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    metric = ", ".join(sorted(set((metrics or {}).values()))) or DEFAULT_METRIC
    panels = [("eval", "test_acc", f"held-out test_acc ({metric})"),
              ("step", "entropy", "entropy (nats per token)"), ("step", "clip_frac", "clip fraction")]
    for ax, (kind, key, title) in zip(axes, panels):
        for name, logs in all_logs.items():
            steps, mean, se = curve(logs, kind, key)
            xs = cumulative_tokens(logs, steps) if x == "gen_tokens" else steps
            line, = ax.plot(xs, mean, label=name)
            ax.fill_between(xs, [m - e for m, e in zip(mean, se)], [m + e for m, e in zip(mean, se)],
                            color=line.get_color(), alpha=0.2)
        ax.set_title(title)
        ax.set_xlabel("generated tokens (cumulative, per run)" if x == "gen_tokens" else "step")
        if key == "entropy":
            ax.axhline(ENTROPY_FLOOR, color="grey", lw=0.8, ls="--")
    axes[0].legend()
    fig.suptitle("mean ± standard error across seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Running.


def method_flags(file):
    """The flag names a method file accepts (the fields of its Args dataclass)."""
    module = importlib.import_module(Path(file).stem)
    return {f.name for f in dataclasses.fields(module.Args)}


def method_metric(file):
    """What the file's `test_acc` measures: its TEST_METRIC, or the shared per-character accuracy."""
    return getattr(importlib.import_module(Path(file).stem), "TEST_METRIC", DEFAULT_METRIC)


def parse_per_method(text, chosen):
    """'grpo: --beta 0; tpo: --eta 2' -> {"grpo": ["--beta", "0"], "tpo": ["--eta", "2"]}."""
    out = {}
    for part in filter(str.strip, text.split(";")):
        name, _, flags = part.partition(":")
        if name.strip() not in chosen:
            sys.exit(f"error: --per_method names {name.strip()!r}, which is not among --methods")
        out[name.strip()] = flags.split()
    return out


def run_one(file, seed, budget, extra, log_path):
    cmd = [sys.executable, file, "--seed", str(seed), "--log_jsonl", str(log_path)]
    for k, v in budget.items():
        cmd += [f"--{k}", str(v)]
    cmd += extra
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # one core per run
    start = time.time()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr.strip()}")
    return time.time() - start


# --------------------------------------------------------------------------------------------------
# Tree sampler probe (minimal_tree_grpo.py, claim C1): from one base model, no training, does a tree
# of rollouts (EPTree) find an exactly correct answer for more prompts than independent chains given
# the same generated tokens?
#
# For each seed: warm up the base model exactly as minimal_tree_grpo.py does, then grow one tree per
# held-out prompt with minimal_tree_grpo.grow_trees (--trees, --forks, --rounds, --branches) and draw
# --pool independent chains per prompt. The chains are matched to the trees prompt by prompt: chains are
# taken in order until their tokens reach what the tree spent on that prompt, the last chain counted
# whole (which favours the chains). It prints, per seed and as mean +- std over seeds, the share of
# prompts with at least one exactly correct leaf (tree) or chain (chains_same_tokens), their paired
# difference, chains at G = 8 and G = 12 for reference (about the tree's tokens, and its 12 leaves), the
# tokens spent, and the mechanism: the share of wrong root chains whose first fork sits exactly on their
# first wrong character (fork_at_first_error), against a fork at a uniformly random token (at_random).
# It runs in this process and writes no files; its flags: `uv run compare.py --tree_sampler --help`.


def solved_with_matched_chains(correct, lengths, budget):
    """correct, lengths: (P, C) for C chains per prompt in sampling order; budget (P,) tokens. Per prompt:
    did any chain solve it among the first ones whose tokens reach the budget (the last counted whole)?"""
    spent_before = lengths.cumsum(1) - lengths  # (P, C) tokens spent before each chain
    used = spent_before < budget[:, None]  # (P, C) a chain is drawn while the budget is not yet reached
    return (correct & used).any(1), used.sum(1)


def first_error(text, answer):
    """The first character position where a completion goes wrong: a wrong character, the EOS of a
    completion that stops early, or the first extra character of one that runs on."""
    return next((i for i, (a, b) in enumerate(zip(text, answer)) if a != b), min(len(text), len(answer)))


def tree_vs_chains_one_seed(args, seed):
    import minimal_tree_grpo as tree
    import toy_tasks as tt

    run = tree.Args(seed=seed, binary=True, trees=args.trees, forks=args.forks, rounds=args.rounds,
                    branches=args.branches, warmup_steps=args.warmup_steps, device="cpu")
    tree.check_args(run)  # also fills in the task's own token budget
    task, model, tok, device, _, _ = tt.setup(run)
    model.eval()
    prompts = task.test[:args.prompts] * args.repeats
    ids, mask = tt.encode(tok, [ex.prompt for ex in prompts], device)
    rollout, owner, gen_tokens = tree.grow_trees(model, tok, ids, mask, run)
    k = args.trees * owner.size(1)  # leaves per prompt
    leaf_ok = task.rewards(rollout.texts, [ex for ex in prompts for _ in range(k)]).view(len(prompts), k) == 1
    tree_tokens = gen_tokens.view(len(prompts), -1).sum(1)  # (P,) sampled for each prompt's trees
    chains = tt.sample(model, tok, ids.repeat_interleave(args.pool, 0), mask.repeat_interleave(args.pool, 0),
                       run.max_new_tokens, run.temperature)
    chain_ok = task.rewards(chains.texts, [ex for ex in prompts for _ in range(args.pool)]).view(len(prompts), -1) == 1
    lengths = chains.lengths.view(len(prompts), -1)
    matched, drawn = solved_with_matched_chains(chain_ok, lengths, tree_tokens)
    if (lengths.sum(1) < tree_tokens).any():
        tt.fail(f"--pool {args.pool} chains ran out before the tree's tokens; raise --pool")
    tree_solved, chains_solved = leaf_ok.any(1).float().mean().item(), matched.float().mean().item()
    # the mechanism: how often the first fork of a wrong root chain sits on its first wrong character,
    # against a fork at a uniformly random token of it
    fork = (owner[:, 1] == 1).float().argmax(1)  # (Tr,) where leaf 1 of each tree starts sampling
    hits, chance = [], []
    for i, ex in enumerate(ex for ex in prompts for _ in range(args.trees)):
        text, length = rollout.texts[i * owner.size(1)], rollout.lengths[i * owner.size(1)]
        if text != ex.answer:
            hits.append(int(fork[i]) == first_error(text, ex.answer))
            chance.append(1 / float(length))
    return {"tree": tree_solved, "chains_same_tokens": chains_solved, "tree_minus_chains": tree_solved - chains_solved,
            "chains_G8": chain_ok[:, :8].any(1).float().mean().item(),
            "chains_G12": chain_ok[:, :12].any(1).float().mean().item(),
            "tree_tokens": tree_tokens.float().mean().item(), "tree_leaves": k,
            "chains_drawn": drawn.float().mean().item(), "G8_tokens": lengths[:, :8].sum(1).float().mean().item(),
            "fork_at_first_error": sum(hits) / len(hits), "at_random": sum(chance) / len(chance)}


def tree_sampler_probe(argv):
    """`compare.py --tree_sampler [flags]`: one line per seed, then the mean +- std line."""
    import torch

    import minimal_tree_grpo as tree
    import toy_tasks as tt

    ap = argparse.ArgumentParser(prog="compare.py --tree_sampler", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                 description="Claim C1 of minimal_tree_grpo.py: a tree of rollouts against independent "
                                             "chains at matched tokens, from the base model (no training).")
    ap.add_argument("--seeds", type=int, default=3, help="base models (warm-up seeds 0, 1, ...)")
    ap.add_argument("--repeats", type=int, default=4, help="trees grown per held-out prompt and seed")
    ap.add_argument("--pool", type=int, default=24, help="independent chains drawn per prompt")
    ap.add_argument("--prompts", type=int, default=256, help="held-out prompts used (the first ones)")
    for name in ("trees", "forks", "rounds", "branches", "warmup_steps"):
        ap.add_argument(f"--{name}", type=int, default=getattr(tree.Args, name), help="as in minimal_tree_grpo.py")
    args = ap.parse_args(argv)
    for name in ("seeds", "repeats", "prompts", "trees", "forks", "branches"):
        if getattr(args, name) < 1:
            tt.fail(f"--{name} must be a positive whole number, got {getattr(args, name)}")
    if args.rounds < 1:
        tt.fail(f"--rounds must be at least 1 (a tree with no forks is a group of chains), got {args.rounds}")
    if args.pool < 12:
        tt.fail(f"--pool must be at least 12 (chains_G12 counts the first 12 chains), got {args.pool}")
    rows = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        rows.append(tree_vs_chains_one_seed(args, seed))
        print(f"seed={seed} " + " ".join(f"{k}={tt.fmt(v)}" for k, v in rows[-1].items()), flush=True)
    stats = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        mean = sum(values) / len(values)
        stats[key] = (mean, math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)))
    print("mean±std " + " ".join(f"{k}={m:.4f}±{s:.4f}" for k, (m, s) in stats.items()))


# --------------------------------------------------------------------------------------------------
# The GPU benchmark: a Qwen2.5-0.5B-shaped model on GSM8K-shaped data, never run by default nor in CI.

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

MEASURE = """import json, resource, runpy, sys, time, torch
import toy_tasks as tt
stamps, step = [], tt.Logger.step
tt.Logger.step = lambda self, *a, **k: (stamps.append(time.time()), step(self, *a, **k))[1]
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
gaps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
print("benchmark " + json.dumps({"s_per_step": gaps[len(gaps) // 2] if gaps else None,
      "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def build_benchmark_model(folder, shape):
    """A Qwen2 of the given shape with random weights and a word-level tokenizer of the same vocabulary
    size with Qwen's chat format, written to folder/model; GSM8K-shaped data to folder/data. Nothing is
    downloaded."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    import toy_tasks as tt

    records = tt.make_gsm8k_like(1000, seed=0)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for split, part in (("train", records[:800]), ("test", records[800:])):
        (folder / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    words = sorted({w for r in records for w in (r["question"] + " " + r["answer"] + " " + tt.GSM8K_INSTRUCTION).split()})
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


def gpu_benchmark(argv):
    """`compare.py --gpu_benchmark`: every file that takes --task gsm8k, a few steps each at the
    recommended settings, on a Qwen2.5-0.5B-shaped model with random weights; one line per file with
    seconds per step (median) and peak GPU memory. Random weights never emit EOS, so every completion
    runs the whole 256-token budget: the memory is the worst case of the recommended settings."""
    import tempfile

    import torch

    import toy_tasks as tt

    ap = argparse.ArgumentParser(prog="compare.py --gpu_benchmark", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--methods", default=",".join(GSM8K_OWN), help="comma-separated, from: " + ", ".join(GSM8K_OWN))
    ap.add_argument("--steps", type=int, default=3, help="steps per file (the median step time is reported)")
    ap.add_argument("--shape", default="qwen0.5b", choices=["qwen0.5b", "tiny"], help="tiny: a 2-layer trunk and a 2,048-token "
                    "vocabulary, to check the plumbing on a CPU")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu with --shape tiny")
    ap.add_argument("--extra", default="", help="more flags for every run, e.g. '--grad_checkpointing'")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        tt.fail("--gpu_benchmark needs a CUDA device (use --shape tiny --device cpu to check the plumbing)")
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
                        "--eval_every", "0", "--device", args.device])
            started = time.time()
            p = subprocess.run([sys.executable, "-c", MEASURE, f"minimal_{name}.py", *flags], cwd=ROOT,
                               capture_output=True, text=True)
            if p.returncode:
                print(f"{name}: failed ({p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode})")
                failed.append(name)
                continue
            found = json.loads(p.stdout.split("benchmark ")[-1])
            gb = f"{found['peak_gpu_gb']:.1f} GB" if found["peak_gpu_gb"] is not None else "n/a"
            print(f"{name}: {found['s_per_step']:.2f} s/step, peak GPU memory {gb}, peak RSS "
                  f"{found['peak_rss_gb']:.1f} GB, {time.time() - started:.0f} s in all", flush=True)
    if failed:
        tt.fail(f"--gpu_benchmark: {', '.join(failed)} failed (each one's last error line is above)")


# --------------------------------------------------------------------------------------------------
# Main.


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if "--tree_sampler" in argv:  # a probe with flags of its own, not a comparison of methods
        return tree_sampler_probe([a for a in argv if a != "--tree_sampler"])
    if "--gpu_benchmark" in argv:  # the same: a benchmark with flags of its own
        return gpu_benchmark([a for a in argv if a != "--gpu_benchmark"])
    methods = available_methods()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--methods", default=",".join(methods), help=f"comma-separated, from: {', '.join(methods)}")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per method (0, 1, ...)")
    ap.add_argument("--steps", type=int, default=100, help="RL steps, the same for every method")
    ap.add_argument("--prompts_per_step", type=int, default=32, help="prompts per step, the same for every method")
    ap.add_argument("--group_size", type=int, default=8, help="completions per prompt, the same for every method")
    ap.add_argument("--epochs", type=int, default=4, help="inner epochs, for every method that has them")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one CPU thread each)")
    ap.add_argument("--out", default="runs/compare", help="folder for the logs, figure and table")
    ap.add_argument("--extra", default="", help="more flags passed to every run, e.g. '--warmup_steps 2 --eval_every 1'")
    ap.add_argument("--own_defaults", action="store_true",
                    help="run every method with its own default budget instead of the shared one above")
    ap.add_argument("--error", action="store_true", help="report the final test error, 1 - test_acc")
    ap.add_argument("--per_method", default="", help="flags for one method only, e.g. 'grpo: --beta 0; tpo: --eta 2'")
    ap.add_argument("--x", default="step", choices=["step", "gen_tokens"],
                    help="x-axis of the figure: RL step, or generated tokens summed over the run so far")
    ap.add_argument("--reach", default="", help="comma-separated test_acc thresholds, e.g. 0.9,0.95: a table column "
                    "each, the first evaluated step at or above it (evaluate often: --extra '--eval_every 5')")
    ap.add_argument("--preset", default="", choices=[""] + list(PRESETS),
                    help="a named setting (see PRESETS): it sets the defaults above, which flags still override")
    ap.add_argument("--tree_sampler", action="store_true",
                    help="run instead the tree sampler probe of minimal_tree_grpo.py (claim C1); its flags: "
                         "--tree_sampler --help")
    ap.add_argument("--gpu_benchmark", action="store_true",
                    help="run instead the GPU benchmark of every --task gsm8k file on a Qwen2.5-0.5B shape (CUDA "
                         "only); its flags: --gpu_benchmark --help")
    preset = ap.parse_known_args(argv)[0].preset
    if preset:
        ap.set_defaults(**PRESETS[preset])
    args = ap.parse_args(argv)

    chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in methods]
    if unknown or not chosen:
        sys.exit(f"error: --methods {','.join(unknown) or args.methods!r} unknown; choose from {', '.join(methods)}")
    for name in ("seeds", "steps", "prompts_per_step", "group_size", "epochs", "jobs"):
        if getattr(args, name) < 1:
            sys.exit(f"error: --{name} must be a positive whole number")
    try:
        reach = [float(t) for t in args.reach.split(",") if t.strip()]
    except ValueError:
        sys.exit(f"error: --reach {args.reach!r} must be comma-separated numbers, e.g. 0.9,0.95")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    per_method = parse_per_method(args.per_method, chosen)
    budgets = {}
    for name in chosen:
        flags = method_flags(methods[name])
        budgets[name] = {} if args.own_defaults else {k: getattr(args, k) for k in SHARED if k in flags}
        missing = [k for k in SHARED if k not in flags]
        if missing and not args.own_defaults:
            print(f"{name}: cannot share --{', --'.join(missing)} (the method has no such setting)")
    jobs = [(name, seed) for name in chosen for seed in range(args.seeds)]
    print(f"{len(jobs)} runs ({len(chosen)} methods x {args.seeds} seeds), {args.jobs} at a time, into {out}/", flush=True)

    start, done = time.time(), 0

    def work(job):
        name, seed = job
        log_path = out / f"{name}_seed{seed}.jsonl"
        wall = run_one(methods[name], seed, budgets[name], args.extra.split() + per_method.get(name, []), log_path)
        return name, seed, log_path, wall

    logs = {name: [] for name in chosen}
    with ThreadPoolExecutor(args.jobs) as pool:
        for name, seed, log_path, wall in pool.map(work, jobs):
            done += 1
            log = read_log(log_path)
            log["wall_s"] = wall
            logs[name].append(log)
            print(f"[{done}/{len(jobs)}] {name} seed {seed}: test_acc={log['final']['test_acc']:.3f} "
                  f"in {wall:.0f} s (elapsed {time.time() - start:.0f} s)", flush=True)

    metrics = {name: method_metric(methods[name]) for name in chosen}
    table = markdown_table({name: summarise(runs, reach) for name, runs in logs.items()}, metrics, error=args.error)
    (out / "compare.md").write_text(table)
    plot(logs, out / "compare.png", x=args.x, metrics=metrics)
    print(table)
    print(f"wrote {out / 'compare.md'} and {out / 'compare.png'} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
