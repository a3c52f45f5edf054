"""The claims table of minimal_vpo.py from the logs results/vpo/run.sh writes: mean +- sample std over
seeds of each final metric, per variant, and the paired (same seed) differences VPO - sum and VPO - GRPO.

    uv run python results/vpo/summary.py [results/vpo]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # compare.py
from compare import mean_std, read_log  # noqa: E402

KEYS = ["base_acc", "best@1", "test_acc", "best@9", "best@3_w1", "best@3_w0.75", "best@3_w0.5", "best@3_w0.25",
        "best@3_w0", "gold@1", "gold@3", "gold@9", "exact", "diversity", "slot1", "slot2", "slot3", "time_s"]


def finals(folder):
    """The final record of every vpo_seedS.jsonl in a folder, in seed order."""
    return [log["final"] for log in map(read_log, sorted(Path(folder).glob("vpo_seed*.jsonl"))) if log["final"]]


def ms(values):
    m, sd = mean_std(values)
    return f"{m:.3f} ± {sd:.3f}"


def main():
    if {"-h", "--help"} & set(sys.argv[1:]):
        return print(__doc__)
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "results/vpo")
    runs = {v.name: finals(v) for v in sorted(root.iterdir()) if v.is_dir() and finals(v)}
    print("| metric | " + " | ".join(f"{v} (n={len(r)})" for v, r in runs.items()) + " |")
    print("|---|" + "---|" * len(runs))
    for key in KEYS:
        cells = [ms([r[key] for r in rs]) if all(key in r for r in rs) else "" for rs in runs.values()]
        print(f"| {key} | " + " | ".join(cells) + " |")
    for other in ("sum", "grpo", "random_w"):
        if "vpo" in runs and other in runs and len(runs[other]) == len(runs["vpo"]):
            diffs = {k: [a[k] - b[k] for a, b in zip(runs["vpo"], runs[other])]
                     for k in ("best@1", "test_acc", "best@9", "best@3_w1", "gold@3", "gold@9")}
            print(f"vpo - {other}, paired by seed: " + "; ".join(
                f"{k} {ms(d)} ({', '.join(f'{x:+.3f}' for x in d)})" for k, d in diffs.items()))


if __name__ == "__main__":
    main()
