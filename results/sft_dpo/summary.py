"""Tables for the claims of minimal_sft.py and minimal_dpo.py from the logs results/sft_dpo/run.sh wrote
into results/sft_dpo/: `uv run results/sft_dpo/summary.py [results/sft_dpo]`. Mean +- sample std over seeds."""
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # compare.py
from compare import mean_std, read_jsonl, read_log  # noqa: E402

if {"-h", "--help"} & set(sys.argv[1:]):
    print(__doc__)
    sys.exit()
DIR = Path(sys.argv[1] if len(sys.argv) > 1 else "results/sft_dpo")
SEEDS = (0, 1, 2)


def read(name, seed):
    """One run's log grouped by kind, with its per-step token split (dpo_tokens.py) under "tokens" if any."""
    out = read_log(DIR / f"{name}_seed{seed}.jsonl")
    tokens = DIR / f"{name}_tokens_seed{seed}.jsonl"
    out["tokens"] = read_jsonl(tokens) if tokens.exists() else []
    return out


def ms(values, digits=3):
    mean, std = mean_std([v for v in values if v is not None and not math.isnan(v)])
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def at(log, step, key):
    return next(r[key] for r in log["eval"] if r["step"] == step)


def window(records, key, lo, hi):
    vals = [r[key] for r in records if lo <= r["step"] <= hi and not math.isnan(r[key])]
    return sum(vals) / len(vals) if vals else float("nan")


logs = {name: [read(name, s) for s in SEEDS] for name in
        ("sft_demo", "grpo", "sft_best", "pg_binary", "dpo_online", "dpo_offline")}

print("## SFT C1: SFT on demonstrations against GRPO, same base (held-out greedy)\n")
print("| run | optimizer steps | test_acc | exact | held-out entropy |\n|---|---|---|---|---|")
for label, name, step, opt in (("SFT demo, step 100", "sft_demo", 100, 100), ("GRPO default (100 steps x 4 epochs)", "grpo", 100, 400),
                               ("SFT demo, step 400", "sft_demo", 400, 400)):
    L = logs[name]
    print(f"| {label} | {opt} | {ms([at(l, step, 'test_acc') for l in L])} | {ms([at(l, step, 'exact') for l in L])} | "
          f"{ms([at(l, step, 'entropy') for l in L])} |")
print("\nSampling entropy over the last 10 steps (GRPO: its own samples; SFT demo: along the reference answers):",
      "GRPO", ms([window(l["step"], "entropy", 91, 100) for l in logs["grpo"]]),
      "| SFT demo at 100", ms([window(l["step"], "entropy", 91, 100) for l in logs["sft_demo"]]),
      "| at 400", ms([window(l["step"], "entropy", 391, 400) for l in logs["sft_demo"]]))

print("\n## SFT C1b: rejection-sampling fine-tuning against PG --binary, 200 steps, 32 x 8 samples a step\n")
print("| run | test_acc | exact | held-out entropy | lowest test_acc on the way (step) | sampled exact, steps 191-200 |\n|---|---|---|---|---|---|")
for label, name, rkey in (("SFT --source best --binary", "sft_best", "sampled_reward"), ("PG --binary", "pg_binary", "reward")):
    L = logs[name]
    lows = [min((r["test_acc"], r["step"]) for r in l["eval"]) for l in L]
    print(f"| {label} | {ms([at(l, 200, 'test_acc') for l in L])} | {ms([at(l, 200, 'exact') for l in L])} | "
          f"{ms([at(l, 200, 'entropy') for l in L])} | {ms([x[0] for x in lows])} ({', '.join(str(x[1]) for x in lows)}) | "
          f"{ms([window(l['step'], rkey, 191, 200) for l in L])} |")
for lo, hi in ((1, 20), (21, 60), (61, 200)):
    print(f"SFT best, steps {lo}-{hi}: kept {ms([window(l['step'], 'kept', lo, hi) for l in logs['sft_best']])}, "
          f"length of the kept targets {ms([window(l['step'], 'len', lo, hi) for l in logs['sft_best']], 2)} "
          f"(the answers average 5.5 tokens with EOS)")

print("\n## DPO C2: online against offline, held-out test_acc at equal updates\n")
print("| step | online test_acc | offline test_acc | online exact | offline exact | online entropy | offline entropy |\n|---|---|---|---|---|---|---|")
for step in (0, 20, 40, 60, 80, 100, 120, 140, 160, 180, 200):
    on, off = logs["dpo_online"], logs["dpo_offline"]
    print(f"| {step} | {ms([at(l, step, 'test_acc') for l in on])} | {ms([at(l, step, 'test_acc') for l in off])} | "
          f"{ms([at(l, step, 'exact') for l in on])} | {ms([at(l, step, 'exact') for l in off])} | "
          f"{ms([at(l, step, 'entropy') for l in on])} | {ms([at(l, step, 'entropy') for l in off])} |")

print("\n## DPO C1 and C2: the pairs over steps (window means, then mean ± std over seeds)\n")
keys = ("chosen_logp", "rejected_logp", "margin", "pref_acc", "loss", "kl", "ratio", "clip_frac", "pairs", "entropy")
print("| run | steps | " + " | ".join(keys) + " |\n|---|---|" + "---|" * len(keys))
for name in ("dpo_online", "dpo_offline"):
    for lo, hi in ((2, 10), (11, 50), (51, 100), (101, 150), (151, 200)):
        cells = [ms([window(l["step"], k, lo, hi) for l in logs[name]], 2) for k in keys]
        print(f"| {name.split('_')[1]} | {lo}-{hi} | " + " | ".join(cells) + " |")

print("\n## DPO C1: which tokens move (log pi - log pi_ref summed per pair over each part, nats; per token in brackets)\n")
parts = ("prefix", "first", "after")
print("| run | steps | " + " | ".join(f"{w} {p}" for w in ("chosen", "rejected") for p in parts) + " |\n|---|---|" + "---|" * 6)
for name in ("dpo_online", "dpo_offline"):
    for lo, hi in ((2, 10), (11, 50), (51, 100), (101, 200)):
        cells = []
        for w in ("chosen", "rejected"):
            for p in parts:
                tot = ms([window(l["tokens"], f"{w}_{p}", lo, hi) for l in logs[name]], 2)
                per = ms([window(l["tokens"], f"{w}_{p}_per_token", lo, hi) for l in logs[name]], 2)
                cells.append(f"{tot} ({per})")
        print(f"| {name.split('_')[1]} | {lo}-{hi} | " + " | ".join(cells) + " |")

print("\n## Final lines\n")
for name, L in logs.items():
    print(name, "final test_acc", ms([l["final"]["test_acc"] for l in L]), "exact", ms([l["final"]["exact"] for l in L]),
          "time_s", ms([l["final"]["time_s"] for l in L], 1))
