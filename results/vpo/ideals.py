"""The ideal policies of minimal_vpo.py's claims table, scored by the file's own evaluation (no training).

Per held-out string (n = 3..6 letters), each method's ideal writes, every time, the answer set its training
score ranks first among sets of distinct correct prefixes: VPO the set with the largest E_w max_a w . r,
Multi-RLVR (sum) the set with the largest sum of w_gold scores, GRPO (m = 1) the one prefix with the largest
w_gold score (n = 3 ties 1 and 2 letters at 0.611: the shorter is taken). The pool is --eval_chains 10 copies of that
set, scored as evaluate() scores a pool: E_w on the midpoint grid, best@k exact over k-subsets.

    uv run python results/vpo/ideals.py          # prints one line per method
"""
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import minimal_vpo as vpo  # noqa: E402
import toy_tasks as tt  # noqa: E402

w1 = (torch.arange(100) + 0.5) / 100
GRID, GOLD = torch.stack([w1, 1 - w1], 1), torch.tensor([0.5, 0.5])
FINE = torch.stack([(torch.arange(100_000) + 0.5) / 100_000, 1 - (torch.arange(100_000) + 0.5) / 100_000], 1)


def rows(answers, target):
    return torch.tensor([tt.quality_brevity(a, target) for a in answers])  # (m, 2)


def ideal_set(target, how):
    prefixes = [target[:j] for j in range(1, len(target) + 1)]
    if how == "grpo":
        return [max(prefixes, key=lambda a: round(float(rows([a], target)[0] @ GOLD), 6))]  # first of a tie
    score = {"vpo": lambda R: (R @ FINE.T).amax(0).mean(), "sum": lambda R: (R @ GOLD).sum()}[how]
    return list(max(itertools.combinations(prefixes, 3), key=lambda s: float(score(rows(s, target)))))


def main():
    test = tt.AnswerSetTask(m=3).test
    for how in ("vpo", "sum", "grpo"):
        sets = [ideal_set(ex.answer, how) for ex in test]
        pool = torch.stack([rows(s * 10, ex.answer) for s, ex in zip(sets, test)])  # (P, 10 m, 2)
        found = {f"best@{k}": vpo.best_at_k(pool @ GRID.T, k).mean() for k in (1, 3, 9)}
        found |= {f"gold@{k}": vpo.best_at_k(pool @ GOLD, k).mean() for k in (1, 3, 9)}
        found["best@3_w1"] = vpo.best_at_k(pool @ torch.tensor([1.0, 0.0]), 3).mean()
        lengths = {n: next([len(a) for a in s] for s, ex in zip(sets, test) if len(ex.answer) == n) for n in range(3, 7)}
        print(f"{how}: " + " ".join(f"{k}={float(v):.4f}" for k, v in found.items()) + f" lengths_by_n={lengths}")


if __name__ == "__main__":
    main()
