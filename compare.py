"""Run several methods on the same task with the same budget and several seeds; write one figure
and one table.

    uv run compare.py --methods grpo,tpo --seeds 3
    uv run compare.py --preset tokrev            # the published token-reversal table (results/tokrev/)
    uv run compare.py --own_defaults --seeds 3   # every file with its own defaults: the spread to expect

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

The published comparisons, each with its command, logs and table: results/README.md. The results
scripts import their log reader (read_log, read_jsonl) and their mean ± std (mean_std) from here.
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
    # reference (results/tokrev/README.md), hence --beta 0 for ours.
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


def mean_std(values):
    """(mean, sample std) of a list: the std divides by n - 1 (ddof 1), and is 0 for one value. Every
    `mean ± std` in compare.py and results/ is this one."""
    values = list(values)
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def mean_std_se(values):
    """(mean, sample std, standard error of the mean) of a list; std and se are 0 for one value."""
    mean, std = mean_std(values)
    return mean, std, std / math.sqrt(len(values))


def first_at_or_below(steps, values, threshold=ENTROPY_FLOOR):
    """The first step whose value is at or below the threshold, or None if it never is."""
    return next((s for s, v in zip(steps, values) if v <= threshold), None)


def first_at_or_above(steps, values, threshold):
    """The first step whose value is at or above the threshold (e.g. test_acc >= 0.95), or None."""
    return next((s for s, v in zip(steps, values) if v >= threshold), None)


def read_jsonl(path):
    """Every record of a JSON-lines file, in order (blank lines skipped)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def read_log(path):
    """One run's JSON lines (--log_jsonl) as {"step": [...records], "eval": [...], "final": {...}}, and any
    other kind of line a file writes (e.g. "teacher") as a list under its kind. Every record carries the
    keys its line printed; step and eval records also carry `time_s`, seconds since the run began."""
    out = {"step": [], "eval": [], "final": None}
    for rec in read_jsonl(path):
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
# Main.


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
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
