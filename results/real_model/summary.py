"""The CPU study's table and figure from its logs: held-out accuracy and "####" format share against
step for every run in this folder (NAME_seedS.jsonl), the base model marked with its noise band.

    uv run results/real_model/summary.py          # prints the table, writes curves.png beside the logs
"""
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
from compare import mean_std, read_log  # noqa: E402

HELD_OUT = 200  # problems in the held-out set (data/test.jsonl)


def runs():
    """{name: {seed: log}} for every NAME_seedS.jsonl here."""
    out = {}
    for path in sorted(HERE.glob("*_seed*.jsonl")):
        name, seed = path.stem.rsplit("_seed", 1)
        out.setdefault(name, {})[int(seed)] = read_log(path)
    return out


def band(p, n=HELD_OUT):
    """Two standard errors of a share p measured on n problems: the noise band of one evaluation."""
    return 2 * math.sqrt(p * (1 - p) / n)


def main():
    found = runs()
    if not found:
        sys.exit(f"error: no NAME_seedS.jsonl logs in {HERE}")
    base = next(iter(next(iter(found.values())).values()))["eval"][0]
    print(f"base (step 0, greedy): test_acc {base['test_acc']:.3f} +- {band(base['test_acc']):.3f} (2 SE, "
          f"{HELD_OUT} problems), format {base['format']:.3f}\n")
    print("| run | seed | test_acc at step 0 / 10 / 20 / 30 | format at step 0 / 10 / 20 / 30 | s / step |")
    print("|---|---|---|---|---|")
    finals = {}
    for name, seeds in found.items():
        for seed, log in sorted(seeds.items()):
            evals = log["eval"]
            acc = " / ".join(f"{e['test_acc']:.3f}" for e in evals)
            fmt = " / ".join(f"{e['format']:.3f}" for e in evals)
            steps = [r for r in log["step"] if "time_s" in r]
            per = ((steps[-1]["time_s"] - steps[0]["time_s"]) / (len(steps) - 1)) if len(steps) > 1 else float("nan")
            print(f"| {name} | {seed} | {acc} | {fmt} | {per:.0f} |")
            finals.setdefault(name, []).append(evals[-1]["test_acc"])
    print()
    for name, values in finals.items():
        mean, std = mean_std(values)
        print(f"{name}: final test_acc {mean:.3f} +- {std:.3f} over {len(values)} seed(s)")
    plot(found, base)


def plot(found, base):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = {}
    for name, seeds in found.items():
        for seed, log in sorted(seeds.items()):
            steps = [e["step"] for e in log["eval"]]
            color = colors.setdefault(name, f"C{len(colors)}")
            label = name if seed == min(seeds) else None
            axes[0].plot(steps, [e["test_acc"] for e in log["eval"]], "o-", color=color, label=label, alpha=0.8)
            axes[1].plot(steps, [e["format"] for e in log["eval"]], "o-", color=color, label=label, alpha=0.8)
    for ax, key, title in ((axes[0], "test_acc", "held-out accuracy (greedy, 200 problems)"),
                           (axes[1], "format", 'held-out share that wrote "####"')):
        p = base[key]
        ax.axhline(p, color="gray", ls="--", label="base model")
        ax.axhspan(p - band(p), p + band(p), color="gray", alpha=0.15, label="base +- 2 SE")
        ax.set_xlabel("RL / SFT step")
        ax.set_title(title)
        ax.set_ylim(0, 1)
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized) on one-step word problems, 2-core CPU")
    fig.tight_layout()
    fig.savefig(HERE / "curves.png", dpi=110)
    print(f"wrote {HERE / 'curves.png'}")


if __name__ == "__main__":
    main()
