"""Claim C1 of minimal_tree_grpo.py, the sampler: from one base model, no training, does a tree of rollouts
(EPTree) find an exactly correct answer for more prompts than independent chains given the same generated
tokens?

    uv run results/tree_grpo/sampler_probe.py --seeds 3     # the C1 table of results/tree_grpo/README.md
    uv run results/tree_grpo/sampler_probe.py --help        # its flags

For each seed: warm up the base model exactly as minimal_tree_grpo.py does, then grow one tree per
held-out prompt with minimal_tree_grpo.grow_trees (--trees, --forks, --rounds, --branches) and draw
--pool independent chains per prompt. The chains are matched to the trees prompt by prompt: chains are
taken in order until their tokens reach what the tree spent on that prompt, the last chain counted
whole (which favours the chains). It prints, per seed and as mean +- std over seeds, the share of
prompts with at least one exactly correct leaf (tree) or chain (chains_same_tokens), their paired
difference, chains at G = 8 and G = 12 for reference (about the tree's tokens, and its 12 leaves), the
tokens spent, and the mechanism: the share of wrong root chains whose first fork sits exactly on their
first wrong character (fork_at_first_error), against a fork at a uniformly random token (at_random).
It runs in this process and writes no files.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # toy_tasks.py, the minimal_*.py files, compare.py

import minimal_tree_grpo as tree  # noqa: E402
import toy_tasks as tt  # noqa: E402
from compare import mean_std  # noqa: E402


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


def main(argv=None):
    """One line per seed, then the mean +- std line."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    ap = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
    stats = {key: mean_std([r[key] for r in rows]) for key in rows[0]}
    print("mean±std " + " ".join(f"{k}={m:.4f}±{s:.4f}" for k, (m, s) in stats.items()))


if __name__ == "__main__":
    main()
