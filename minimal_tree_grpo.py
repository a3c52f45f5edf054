"""Tree GRPO: a tree of rollouts per prompt instead of a group of chains, with TreeRL's segment advantage.

Papers: TreeRL (Hou et al. 2025, arXiv 2506.11902; code THUDM/TreeRL), Tree-GRPO (Ji et al. 2025, arXiv 2509.21240;
code AMAP-ML/Tree-GRPO). Parent: minimal_grpo.py. The change: TreeRL's EPTree grows M chains per prompt and, L times,
forks each tree at its N sampled tokens of highest surprisal -log p(y_t), sampling T continuations from y[:t]
(pick_forks, branch); each token of a segment s (shared by the same L(s) leaves: tree_values) gets the paper's Eq. 2-4
with its 1/sqrt(L) reweighting, in GRPO's loss:

    V(s) = mean reward of the leaves below s;   V(root) = mean over all leaves of the prompt
    A(s) = [(V(s) - V(root)) + (V(s) - V(parent(s)))] / sqrt(L(s))        (global + local term, no std)

The formula is computed as AttnRL's verl port does (RyanLiu112/AttnRL, without fill_in_paths); TreeRL's own training
code (scripts/treerl-qw14b.sh) differs: leaves centred leave-one-out (x n/(n-1)), the sqrt inside V (the parent term
gets 1/sqrt(L(parent))), 16 of 30 leaves trained, truncated rows scored -1, clip-high 1 + 1.3 eps, no KL, temperature
1.2 and top-p 0.95, (M, N, L, T) = (6, 2, 1, 2). Here every leaf trains, under GRPO's clip, KL and temperature.

Run: uv run minimal_tree_grpo.py          (flags: uv run minimal_tree_grpo.py --help)
"""
import copy
from dataclasses import dataclass

import torch

import toy_tasks as tt


@dataclass
class Args:
    task: str = "reverse"
    """task to train on: reverse (per-character reward), add (exact match: sparse), tokrev (the published toy)
    or gsm8k (a real task for a --model; test_acc is then the share of held-out problems answered right)"""
    data: str = ""
    """--task gsm8k: a local folder of train and test files, or one file, in GSM8K's schema (empty: download)"""
    eval_size: int = 0
    """held-out prompts evaluated, the first of the held-out set (0: every toy prompt; 200 for gsm8k)"""
    binary: bool = False
    """score reverse by exact match (1 or 0) instead of per-character credit"""
    model: str = ""
    """Hugging Face causal LM (hub id or local folder); empty builds the tiny default Llama"""
    warmup_steps: int = -1
    """supervised warm-up steps that make the tiny default a partly competent base model (-1: the task's
    own, 40 for reverse; 0: start from random weights)"""
    seed: int = 0
    """seed for weights, prompts and sampling: the same seed prints the same lines on CPU"""
    steps: int = 100
    """RL steps; each samples a fresh batch of prompts"""
    prompts_per_step: int = 20
    """prompts per step (20, not GRPO's 32: each prompt trains 12 leaf rows, not 8)"""
    trees: int = 4
    """M: root chains per prompt, each a tree (4 of ~6 tokens + 8 continuations of ~3: GRPO's ~48 tokens)"""
    forks: int = 1
    """N: fork points per tree and round, its sampled tokens of highest surprisal -log p (EOS may be one)"""
    rounds: int = 1
    """L: rounds of forking; a later round may fork the branches of an earlier one (0: M plain chains)"""
    branches: int = 2
    """T: continuations re-sampled from each fork point, the forked token itself re-sampled"""
    advantage: str = "treerl"
    """treerl: TreeRL's segment advantage per token; tree_grpo: Tree-GRPO's z-scores of the leaf reward"""
    lr: float = 1e-3
    """AdamW learning rate"""
    epochs: int = 4
    """inner epochs: gradient steps on each sampled batch (mu; the paper uses 1)"""
    clip_eps: float = 0.2
    """PPO clip range: the ratio is clipped to [1 - clip_eps, 1 + clip_eps]"""
    beta: float = 0.04
    """weight of the k3 KL penalty to the frozen base model (0: no reference model)"""
    max_grad_norm: float = 1.0
    """gradient-norm clip"""
    max_new_tokens: int = -1
    """token budget per completion, cut off without EOS (-1: the task's own, 10 for the toys, 256 for gsm8k)"""
    temperature: float = 1.0
    """sampling temperature (log-probs are taken at the same temperature)"""
    eval_every: int = 20
    """greedy held-out evaluation every this many steps (0: only at the end)"""
    micro_batch: int = 0
    """prompts per forward and backward pass; their gradients add up to one optimizer step (0: all at once)"""
    dtype: str = "auto"
    """auto (bfloat16 autocast for a --model on CUDA, float32 otherwise), float32 or bfloat16"""
    grad_checkpointing: bool = False
    """recompute activations in the backward pass instead of storing them (for a large --model)"""
    device: str = "auto"
    """auto (the tiny default on the CPU; a --model on CUDA, then MPS, then CPU), cpu, cuda or mps"""
    log_jsonl: str = ""
    """also write every step's metrics to this JSON-lines file"""


# ALGO LOGIC: everything that makes this method this method.


def pick_forks(surprisal, owner, n):
    """EPTree's forks: per tree, the n tokens of highest surprisal its leaves sampled themselves, EOS in,
    padding out, a branch's first token out unless t = 0; fewer: the best again. -> leaf, t (Tr, n) each"""
    k, w = owner.shape[1:]
    own = owner == torch.arange(k, device=owner.device)[:, None]  # (Tr, K, W); False on padding (-1)
    own = own & torch.nn.functional.pad(own, (1, 0), value=True)[..., :-1]  # and own[t - 1], or t = 0
    score, top = surprisal.masked_fill(~own, -torch.inf).flatten(1).topk(n, dim=1)  # (Tr, n)
    top = torch.where(score > -torch.inf, top, top[:, :1])
    return top // w, top % w


def branch(model, tok, ids, mask, tokens, owner, leaf, t, args):
    """T continuations from each fork (Tr, N) after prompt + y[:t] (t <= EOS: no prefix holds one), joined
    into y[:t] + new and cut to the budget: new leaves and owners (Tr, N * T, W), and the continuations."""
    tr, k, width = tokens.shape
    rows = torch.arange(tr, device=ids.device)[:, None]
    n_new = args.forks * args.branches  # every fork point gets T continuations: (Tr, N) -> (Tr * N * T,)
    parent = tokens[rows, leaf].flatten(0, 1).repeat_interleave(args.branches, 0)  # (Tr*N*T, W)
    parent_owner = owner[rows, leaf].flatten(0, 1).repeat_interleave(args.branches, 0)
    t = t.flatten().repeat_interleave(args.branches)  # (Tr*N*T,)
    before = torch.arange(width, device=ids.device) < t[:, None]  # (Tr*N*T, W) the prefix y[:t]
    prefix_ids, prefix_mask = tt.repad(torch.cat([ids.repeat_interleave(n_new, 0), parent], 1),
                                       torch.cat([mask.repeat_interleave(n_new, 0).bool(), before], 1),
                                       tok.pad_token_id, left=True)
    cont = tt.sample(model, tok, prefix_ids, prefix_mask, width, args.temperature)
    new, kept = tt.repad(torch.cat([parent, cont.completion_ids], 1),
                         torch.cat([before, cont.completion_mask.bool()], 1), tok.pad_token_id, left=False)
    new, kept = new[:, :width], kept[:, :width]  # the budget counts the prefix too
    new_id = k + torch.arange(new.size(0), device=ids.device) % n_new  # each new leaf's index in its tree
    new_owner = torch.where(before, parent_owner, torch.where(kept.bool(), new_id[:, None], -1))
    return new.view(tr, n_new, width), new_owner.view(tr, n_new, width), cont


def grow_trees(model, tok, prompt_ids, prompt_mask, args):
    """EPTree: M root chains per prompt, L rounds of N forks per tree, T continuations each -> the leaves (a
    Rollout of Tr = P * M trees of K), owner (Tr, K, T): which leaf of the tree sampled each token (-1:
    padding), and gen_tokens (Tr,): every token sampled."""
    pad = torch.nn.functional.pad
    ids, mask = prompt_ids.repeat_interleave(args.trees, 0), prompt_mask.repeat_interleave(args.trees, 0)
    leaf_rows = lambda tokens: tt.rollout_from(*[x.repeat_interleave(tokens.size(1), 0) for x in (ids, mask)],
                                               tokens.flatten(0, 1), tok, args.temperature)  # Tr * K rows
    roots = tt.sample(model, tok, ids, mask, args.max_new_tokens, args.temperature)
    grow = args.max_new_tokens - roots.completion_ids.size(1)  # trees are kept at the full budget width
    tokens = pad(roots.completion_ids, (0, grow), value=tok.pad_token_id)[:, None]  # (Tr, 1, W)
    owner = torch.where(pad(roots.completion_mask, (0, grow)) > 0, 0, -1)[:, None]  # each root sampled its own
    gen_tokens = roots.lengths  # (Tr,)
    for _ in range(args.rounds):
        logp, _ = tt.score(model, leaf_rows(tokens), args.micro_batch * leaves_per_prompt(args))
        surprisal = -pad(logp, (0, tokens.size(2) - logp.size(1))).view(tokens.shape)  # (Tr, K, W)
        leaf, t = pick_forks(surprisal, owner, args.forks)  # (Tr, N) each
        new, new_owner, cont = branch(model, tok, ids, mask, tokens, owner, leaf, t, args)
        tokens, owner = torch.cat([tokens, new], 1), torch.cat([owner, new_owner], 1)
        gen_tokens = gen_tokens + cont.lengths.view(len(ids), -1).sum(1)  # (Tr,) prefixes are free
    rollout = leaf_rows(tokens)
    return rollout, owner[..., :rollout.completion_ids.size(1)], gen_tokens


def tree_values(owner, rewards):
    """owner (P, M, K, T), rewards (P, M, K) -> per token V(s), V(parent(s)), L(s) (P, M, K, T), V(root) (P,).
    Leaves share a token when the same leaf sampled it; a segment ends where that set shrinks, at a fork."""
    shared = (owner[:, :, :, None] == owner[:, :, None]) & (owner[:, :, :, None] >= 0)  # (P, M, K, K, T)
    below = shared.sum(3)  # (P, M, K, T) L(s)
    value = (shared * rewards[:, :, None, :, None]).sum(3) / below.clamp(min=1)  # (P, M, K, T) V(s)
    root = rewards.mean((1, 2))  # (P,) V(root): a virtual root above the M trees
    # the first segment's parent: the virtual root, or if a leaf forked at t = 0, an empty one (V = tree mean)
    parents = [torch.where(below[..., 0] < owner.size(2), rewards.mean(2, keepdim=True), root[:, None, None])]
    for t in range(1, owner.size(3)):  # within a segment the parent stays; at a fork it is the last segment
        parents.append(torch.where(below[..., t] == below[..., t - 1], parents[-1], value[..., t - 1]))
    return value, torch.stack(parents, -1), below, root


def treerl_advantages(owner, rewards):
    """TreeRL: [(V(s) - V(root)) + (V(s) - V(parent(s)))] / sqrt(L(s)) on each token of s, (P, M, K, T); 0
    if a prompt's leaves all tie. The L(s) rows through s each train it: weight sqrt(L(s)) [...], not L(s)."""
    value, parent, below, root = tree_values(owner, rewards)
    adv = ((value - root[:, None, None, None]) + (value - parent)) / below.clamp(min=1).sqrt()
    flat = (rewards.amax((1, 2)) == rewards.amin((1, 2)))[:, None, None, None]  # (P, 1, 1, 1)
    return torch.where(flat | (owner < 0), torch.zeros_like(adv), adv)


def tree_grpo_zscore(rewards, eps=1e-6):
    """The Tree-GRPO authors' z-score (verl's GRPO advantage): Bessel's std, eps 1e-6, a group of one scores
    its reward (mean 0, std 1). rewards (P, G) -> (P, G); exactly 0 for a larger group that ties."""
    if rewards.size(1) == 1:
        return rewards / (1 + eps)
    mean, std = rewards.mean(1, keepdim=True), rewards.std(1, keepdim=True)  # std / (G - 1), not / G
    flat = rewards.amax(1, keepdim=True) == rewards.amin(1, keepdim=True)  # (P, 1)
    return torch.where(flat, torch.zeros_like(rewards), (rewards - mean) / (std + eps))


def tree_grpo_advantages(owner, rewards):
    """Tree-GRPO: the leaf's z-score within its tree plus its z-score over all leaves of the prompt, on every
    token of its root-to-leaf path: (P, M, K, T). Tree-GRPO's own sampler expands random agent-step nodes."""
    p, m, k = rewards.shape
    z = lambda groups: tree_grpo_zscore(rewards.reshape(groups, -1)).view(p, m, k)  # groups of leaves
    return torch.where(owner >= 0, (z(p * m) + z(p))[..., None], 0.0)  # within its tree + within the prompt


ADVANTAGES = {"treerl": treerl_advantages, "tree_grpo": tree_grpo_advantages}


def kl_k3(logp, ref_logp):
    """Schulman's k3 estimator of KL(pi || ref) at the sampled tokens: exp(d) - d - 1, d = ref - pi."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def aggregate(per_token, mask, n):
    """Per-sequence token mean (the 1/|y_i| factor), then a sum over the completions given divided by n,
    the whole batch's number of completions: the batch mean, added up micro-batch by micro-batch."""
    return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / n


def policy_loss(logp, old_logp, ref_logp, adv, mask, clip_eps, beta, n):
    """Clipped surrogate minus k3 KL, and its diagnostics. logp, old_logp, ref_logp, adv, mask: (N, T);
    n: the batch's completions."""
    ratio = torch.exp(logp - old_logp)  # (N, T); 1 in the first inner epoch
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    kl = kl_k3(logp, ref_logp)  # (N, T) k3 to the frozen base model, inside the per-token sum
    per_token = -(surrogate - beta * kl)  # (N, T)
    # the tokens whose gradient the clip removed (TRL's clip_ratio/region_mean, verl's pg_clipfrac): a
    # ratio outside the band on the side the advantage pushes towards; outside on the other side, the
    # unclipped term is the smaller one and the gradient flows
    clipped = ((ratio > 1 + clip_eps) & (adv > 0)) | ((ratio < 1 - clip_eps) & (adv < 0))  # (N, T)
    stats = {"ratio": tt.masked_mean(ratio, mask),
             "clip_frac": tt.masked_mean(clipped.float(), mask),
             "kl": tt.masked_mean(kl, mask)}
    return aggregate(per_token, mask, n), {k: v.detach() for k, v in stats.items()}


def update(model, optimizer, rollout, adv, old_logp, ref_logp, step, args):
    """One optimizer step on a sampled batch, its gradient accumulated over micro-batches of whole
    prompts (all their trees); returns the whole batch's loss, diagnostics and entropy, whatever --micro_batch is."""
    n, metrics = len(adv), tt.BatchMetrics(rollout.completion_mask.sum())  # counted before the split
    optimizer.zero_grad()
    for rows in tt.micro_batches(n, args.micro_batch * leaves_per_prompt(args)):  # rows of whole prompts
        part = rollout.rows(rows)
        mask = part.completion_mask  # (n_mb, T)
        logp, entropy = tt.token_logprobs(model, part)  # (n_mb, T) each
        loss, stats = policy_loss(logp, old_logp[rows], ref_logp[rows], adv[rows], mask, args.clip_eps,
                                  args.beta, n)
        tt.check_finite(loss, step)
        loss.backward()  # gradients add up over the micro-batches into the whole batch's
        metrics.add(mask, loss, entropy=tt.masked_mean(entropy, mask), **stats)
    stats = metrics.totals()
    stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    optimizer.step()
    loss, entropy = stats.pop("loss"), stats.pop("entropy")
    return loss, stats, entropy


def leaves_per_prompt(args):  # the rows one prompt trains on: M trees of 1 + L * N * T leaves each
    return args.trees * (1 + args.rounds * args.forks * args.branches)


def check_args(args):
    tt.check_common_args(args, min_group=0)  # no --group_size: the group is the tree's leaves
    for name, least in (("trees", 1), ("forks", 1), ("rounds", 0), ("branches", 1)):
        if getattr(args, name) < least:
            tt.fail(f"--{name} must be a whole number of at least {least}, got {getattr(args, name)}")
    if leaves_per_prompt(args) < 2:
        tt.fail("--trees 1 with --rounds 0 leaves one leaf per prompt; the baseline needs at least 2")
    if args.advantage not in ADVANTAGES:
        tt.fail(f"--advantage {args.advantage!r} is unknown; choose one of {', '.join(ADVANTAGES)}")
    if args.epochs < 1:
        tt.fail(f"--epochs must be at least 1, got {args.epochs}")
    if not 0 < args.clip_eps < 1:
        tt.fail(f"--clip_eps must lie strictly between 0 and 1, got {args.clip_eps}")
    if args.beta < 0:
        tt.fail(f"--beta must not be negative, got {args.beta}")


# TRY NOT TO MODIFY: the loop every file shares.


def main():
    args = tt.parse_args(Args)
    check_args(args)
    task, model, tok, device, logger, rng = tt.setup(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)  # the frozen base, for the KL term
    mb_rows = args.micro_batch * leaves_per_prompt(args)  # rows per forward pass, whole trees (0: all)
    base_acc, exact, test_extra = tt.evaluate(model, tok, task, device, args.max_new_tokens, mb_rows)
    logger.eval(0, base_acc, exact, **test_extra)

    for step in range(1, args.steps + 1):
        examples = task.sample(rng, args.prompts_per_step)
        prompt_ids, prompt_mask = tt.encode(tok, [ex.prompt for ex in examples], device)
        rollout, owner, gen_tokens = grow_trees(model, tok, prompt_ids, prompt_mask, args)
        owner, k = owner.view(len(examples), args.trees, *owner.shape[1:]), owner.size(1)  # (P, M, K, T)
        rewards = task.rewards(rollout.texts, [ex for ex in examples for _ in range(args.trees * k)])
        rewards = rewards.to(device).view(owner.shape[:3])  # (P, M, K); K leaves in every tree
        adv = ADVANTAGES[args.advantage](owner, rewards).flatten(0, 2)  # (N, T) one advantage per token
        old_logp, _ = tt.score(model, rollout, mb_rows)  # (N, T) pi_old, frozen for every epoch
        ref_logp = tt.score(ref_model, rollout, mb_rows)[0] if args.beta > 0 else old_logp
        for epoch in range(args.epochs):  # the ratio and clip fraction logged are the last epoch's
            loss, stats, entropy = update(model, optimizer, rollout, adv, old_logp, ref_logp, step, args)
        grad_norm = stats.pop("grad_norm")
        logger.step(step, reward=rewards.mean(), loss=loss, entropy=entropy, **stats,
                    grad_norm=grad_norm, len=rollout.lengths.mean(), gen_tokens=int(gen_tokens.sum()),
                    len_wrong=tt.mean_length_wrong(rollout, rewards), leaves=args.trees * k,
                    dead_groups=(rewards.amax((1, 2)) == rewards.amin((1, 2))).float().mean(),
                    **task.extra_metrics(rollout.texts))
        if (args.eval_every and step % args.eval_every == 0) or step == args.steps:
            test_acc, exact, test_extra = tt.evaluate(model, tok, task, device, args.max_new_tokens, mb_rows)
            logger.eval(step, test_acc, exact, **test_extra)
    logger.final(test_acc, exact, base_acc)


if __name__ == "__main__":
    main()
