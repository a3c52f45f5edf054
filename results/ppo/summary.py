"""The tables of results/ppo/README.md (claims C1 and C2 of minimal_ppo.py) from the logs results/ppo/run.py
wrote: per configuration, mean ± sample std over the seeds that exist.

    uv run python results/ppo/summary.py [NAME ...]     # NAME from run.py's CONFIGS; default: all of them
"""
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # compare.py
from compare import mean_std, read_log  # noqa: E402
from run import CONFIGS, OUT, SEEDS  # noqa: E402  (run.py, beside this file)


def ms(xs, nd=3):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    m, sd = mean_std(xs)
    return f"{m:.{nd}f} ± {sd:.{nd}f}" if len(xs) > 1 else f"{m:.{nd}f}"


def load(name, seed):
    """(the run's log grouped by kind, its _extra.json: CPU stamps, memory, explained variance by position)"""
    return read_log(OUT / f"{name}_seed{seed}.jsonl"), json.loads((OUT / f"{name}_seed{seed}_extra.json").read_text())


def first_eval(log, level):
    return next((r["step"] for r in log["eval"] if r["test_acc"] >= level), None)


def report(names):
    print("| run | steps to 0.90 | steps to 0.95 | test_acc at 20 / 50 | final test_acc | exact | CPU s/step (median) | peak RSS MB | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        rows = [load(name, s) for s in SEEDS if (OUT / f"{name}_seed{s}_extra.json").exists()]
        if not rows:
            continue
        acc_at = lambda log, k: next(r["test_acc"] for r in log["eval"] if r["step"] == k)
        reach = lambda level: ", ".join(str(first_eval(r, level)) for r, _ in rows)
        cpu = [statistics.median(b - a for a, b in zip(e["cpu"], e["cpu"][1:])) for _, e in rows]
        final = [log["final"] for log, _ in rows]
        print(f"| {name} ({len(rows)} seeds) | {reach(0.90)} | {reach(0.95)} | {ms([acc_at(r, 20) for r, _ in rows])} / "
              f"{ms([acc_at(r, 50) for r, _ in rows])} | {ms([f['test_acc'] for f in final])} | "
              f"{ms([f['exact'] for f in final])} | {ms(cpu, 3)} | {ms([e['peak_rss_mb'] for _, e in rows], 0)} | "
              f"{ms([e['wall'] for _, e in rows], 0)} |")
    print()
    for name in names:
        rows = [load(name, s) for s in SEEDS if (OUT / f"{name}_seed{s}_extra.json").exists()]
        if not rows or not rows[0][1]["ev_first"]:
            continue
        print(f"### {name}: explained variance (step mean over the window, then mean ± std over seeds) and test_acc")
        windows = [(1, 1), (2, 5), (6, 10), (11, 20), (21, 50), (51, 100)]
        print("| steps | " + " | ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in windows) + " |")
        print("|---|" + "---|" * len(windows))
        cells = []
        for a, b in windows:
            cells.append(ms([statistics.mean(r["explained_var"] for r in log["step"][a - 1:b]) for log, _ in rows], 2))
        print("| explained_var | " + " | ".join(cells) + " |")
        cells = [ms([statistics.mean(r["value_loss"] for r in log["step"][a - 1:b]) for log, _ in rows], 4)
                 for a, b in windows]
        print("| value_loss | " + " | ".join(cells) + " |")
        evals = lambda log: {r["step"]: r["test_acc"] for r in log["eval"]}
        cells = [ms([evals(log)[b] for log, _ in rows if b in evals(log)], 3) for a, b in windows]
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
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)
    else:
        report(sys.argv[1:] or list(CONFIGS))
