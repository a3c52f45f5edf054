"""Claims C1 and C2 of minimal_ppo.py (issue 19): run each configuration x seed in its own process, one at a
time, with OMP_NUM_THREADS=1, and summarise.

    uv run python results/ppo/claims.py run            # every run not already done, into results/ppo/
    uv run python results/ppo/claims.py report         # the tables of results/README.md

Each run is `minimal_ppo.py` or `minimal_grpo.py` called in-process (main() of the imported module, so the
hooks below see it) with --eval_every 5 --log_jsonl. The hooks record, at every step line, the process CPU
time and resident memory, and for PPO the explained variance of every step's critic by token position
(from the first completion token, and from the last), wrapping minimal_ppo.explained_variance.
For results/README.md, ppo_32x8 ran for seeds 0 and 1 only (`run ppo grpo ppo_scratch ppo_nocritic`, then
ppo_32x8 with seed 2 skipped); the report reads whatever runs exist.
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "results" / "ppo"
SEEDS = [0, 1, 2]
CONFIGS = {  # name -> (file, flags)
    "ppo": ("minimal_ppo.py", []),
    "grpo": ("minimal_grpo.py", []),
    "ppo_scratch": ("minimal_ppo.py", ["--critic_init", "scratch"]),
    "ppo_32x8": ("minimal_ppo.py", ["--prompts_per_step", "32", "--group_size", "8"]),
    "ppo_nocritic": ("minimal_ppo.py", ["--vf_coef", "0"]),  # the head stays at zero: V = 0, no critic
}
COMMON = ["--eval_every", "5"]


def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def child(name, seed):
    sys.path.insert(0, str(ROOT))
    import toy_tasks as tt
    file, flags = CONFIGS[name]
    module = __import__(Path(file).stem)
    extra = {"cpu": [], "rss": [], "ev_first": [], "ev_last": []}
    step = tt.Logger.step

    def step_hook(self, *a, **k):
        extra["cpu"].append(time.process_time())
        extra["rss"].append(rss_mb())
        return step(self, *a, **k)

    tt.Logger.step = step_hook
    if hasattr(module, "explained_variance"):
        ev = module.explained_variance

        def ev_hook(values, returns, mask):
            lengths = mask.sum(1).long()
            first, last = [], []
            for t in range(mask.size(1)):
                rows = lengths > t
                if rows.sum() >= 8:
                    first.append(float(ev(values[rows, t:t + 1], returns[rows, t:t + 1], mask[rows, t:t + 1])))
                    idx = lengths[rows] - 1 - t  # t tokens before each completion's last token
                    pick = lambda x: x[rows].gather(1, idx[:, None])
                    last.append(float(ev(pick(values), pick(returns), pick(mask))))
            extra["ev_first"].append(first)
            extra["ev_last"].append(last)
            return ev(values, returns, mask)

        module.explained_variance = ev_hook
    log = OUT / f"{name}_s{seed}.jsonl"
    sys.argv = [file, "--seed", str(seed), *COMMON, *flags, "--log_jsonl", str(log)]
    start, cpu0 = time.time(), time.process_time()
    module.main()
    extra.update(wall=time.time() - start, cpu_total=time.process_time() - cpu0,
                 peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                 argv=sys.argv)
    (OUT / f"{name}_s{seed}.json").write_text(json.dumps(extra))


def run_all(names):
    OUT.mkdir(parents=True, exist_ok=True)
    for name in names:
        for seed in SEEDS:
            if (OUT / f"{name}_s{seed}.json").exists():
                continue
            print(f"{name} seed {seed} ...", flush=True)
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            p = subprocess.run([sys.executable, __file__, "child", name, str(seed)], cwd=ROOT, env=env,
                               capture_output=True, text=True)
            (OUT / f"{name}_s{seed}.txt").write_text(p.stdout + p.stderr)
            print(p.stdout.strip().splitlines()[-1] if p.returncode == 0 else p.stderr[-2000:], flush=True)


def ms(xs, nd=3):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    m = statistics.mean(xs)
    return f"{m:.{nd}f} ± {statistics.stdev(xs):.{nd}f}" if len(xs) > 1 else f"{m:.{nd}f}"


def load(name, seed):
    recs = [json.loads(x) for x in (OUT / f"{name}_s{seed}.jsonl").read_text().splitlines()]
    extra = json.loads((OUT / f"{name}_s{seed}.json").read_text())
    return recs, extra


def first_eval(recs, level):
    return next((r["step"] for r in recs if r["kind"] == "eval" and r["test_acc"] >= level), None)


def report(names):
    print("| run | steps to 0.90 | steps to 0.95 | test_acc at 20 / 50 | final test_acc | exact | CPU s/step (median) | peak RSS MB | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        rows = [load(name, s) for s in SEEDS if (OUT / f"{name}_s{s}.json").exists()]
        if not rows:
            continue
        acc_at = lambda recs, k: next(r["test_acc"] for r in recs if r["kind"] == "eval" and r["step"] == k)
        reach = lambda level: ", ".join(str(first_eval(r, level)) for r, _ in rows)
        cpu = [statistics.median(b - a for a, b in zip(e["cpu"], e["cpu"][1:])) for _, e in rows]
        final = [next(r for r in recs if r["kind"] == "final") for recs, _ in rows]
        print(f"| {name} ({len(rows)} seeds) | {reach(0.90)} | {reach(0.95)} | {ms([acc_at(r, 20) for r, _ in rows])} / "
              f"{ms([acc_at(r, 50) for r, _ in rows])} | {ms([f['test_acc'] for f in final])} | "
              f"{ms([f['exact'] for f in final])} | {ms(cpu, 3)} | {ms([e['peak_rss_mb'] for _, e in rows], 0)} | "
              f"{ms([e['wall'] for _, e in rows], 0)} |")
    print()
    for name in names:
        rows = [load(name, s) for s in SEEDS if (OUT / f"{name}_s{s}.json").exists()]
        if not rows or not rows[0][1]["ev_first"]:
            continue
        print(f"### {name}: explained variance (step mean over the window, then mean ± std over seeds) and test_acc")
        windows = [(1, 1), (2, 5), (6, 10), (11, 20), (21, 50), (51, 100)]
        steps = lambda recs: [r for r in recs if r["kind"] == "step"]
        print("| steps | " + " | ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in windows) + " |")
        print("|---|" + "---|" * len(windows))
        cells = []
        for a, b in windows:
            cells.append(ms([statistics.mean(r["explained_var"] for r in steps(recs)[a - 1:b]) for recs, _ in rows], 2))
        print("| explained_var | " + " | ".join(cells) + " |")
        cells = [ms([statistics.mean(r["value_loss"] for r in steps(recs)[a - 1:b]) for recs, _ in rows], 4)
                 for a, b in windows]
        print("| value_loss | " + " | ".join(cells) + " |")
        evals = lambda recs: {r["step"]: r["test_acc"] for r in recs if r["kind"] == "eval"}
        cells = [ms([evals(recs)[b] for recs, _ in rows if b in evals(recs)], 3) for a, b in windows]
        print("| test_acc at the window's end | " + " | ".join(cells) + " |")
        for key, label in (("ev_first", "from the first token"), ("ev_last", "from the last token (0 = EOS)")):
            print(f"\nexplained variance by position {label}, mean over steps of the window and seeds:")
            print("| steps | " + " | ".join(f"t={t}" for t in range(7)) + " |")
            print("|---|" + "---|" * 7)
            for a, b in [(1, 10), (11, 30), (31, 100)]:
                cells = []
                for t in range(7):
                    vals = [statistics.mean(ev[t] for ev in e[key][a - 1:b] if len(ev) > t) for _, e in rows
                            if any(len(ev) > t for ev in e[key][a - 1:b])]
                    cells.append(ms(vals, 2))
                print(f"| {a}-{b} | " + " | ".join(cells) + " |")
        print()


if __name__ == "__main__":
    if sys.argv[1] == "child":
        child(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "run":
        run_all(sys.argv[2:] or list(CONFIGS))
    else:
        report(sys.argv[2:] or list(CONFIGS))
