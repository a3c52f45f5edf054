"""TPO: Target Policy Optimization. Fit the policy to a target over each group's candidates.

Paper: Kaddour 2026, "Target Policy Optimization", arXiv 2604.06159 (reference code: JeanKaddour/tpo,
JAX toys).
Parent: minimal_grpo.py.
The change: instead of pushing each completion's log-prob by a clipped, advantage-weighted ratio,
build a target distribution q over the G sampled candidates (the old policy, tilted by the z-scored
rewards) and minimise the cross-entropy from q to the policy renormalised over the same candidates:

    u_i   = (r_i - mean(r)) / std(r)          (population std; u = 0 for a group whose rewards agree)
    s_i   = sum_t log pi(y_i,t)               (a whole completion's log-prob, no length normalisation)
    q     = softmax(log_softmax(s_old) + u / eta)   i.e. q_i proportional to p_old,i * exp(u_i / eta)
    loss  = -mean_groups [ sum_i q_i * log_softmax(s)_i ]

The gradient with respect to s_i is p_i - q_i (p = softmax(s)): it vanishes once the policy,
restricted to the candidates, matches the target. That fixed point is the trust region, so q stays
frozen for all 4 inner epochs and there is no ratio clip, no KL penalty and no reference model.
A group whose rewards all agree (u = 0, so q = p_old) has no signal of its own but stays in the mean
over groups: in later epochs its loss pulls the policy back towards pi_old, an anchor for free.
ratio, clip_frac (the share of tokens whose ratio drifted past +-0.2) and kl (k3 to the sampling
policy) are logged as diagnostics only.

Departure from the toys: completions here vary in length, and s_i sums over every token up to and
including EOS, so the length is part of the candidate. Nothing else departs that we know of.

Run: uv run minimal_tpo.py           (flags: uv run minimal_tpo.py --help)
"""
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
    prompts_per_step: int = 32
    """prompts per step"""
    group_size: int = 8
    """completions sampled per prompt (G); the baseline needs at least 2"""
    lr: float = 1e-3
    """AdamW learning rate"""
    epochs: int = 4
    """inner epochs: gradient steps on each sampled batch, all towards the same frozen target q"""
    eta: float = 1.0
    """target temperature: q is proportional to p_old * exp(u / eta); smaller trusts the rewards more"""
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


def group_advantages(rewards):
    """Group z-score u with the population std. rewards (P, G) -> u (P, G); exactly 0 for a group
    whose rewards are all equal. No eps: u must have unit scale, because eta is measured in it."""
    mean, std = rewards.mean(1, keepdim=True), rewards.std(1, unbiased=False, keepdim=True)
    flat = rewards.max(1, keepdim=True).values == rewards.min(1, keepdim=True).values  # (P, 1)
    # std > 0 would not do: in float32 the mean of eight 0.6s is one rounding step (6e-8) off, and their
    # std is 6e-8 too in a lone group (0 in a batch of groups): the residue divided by it is of order 1
    return torch.where(flat, torch.zeros_like(rewards), (rewards - mean) / std.clamp(min=1e-12))


def tpo_target(s_old, u, eta):
    """The target over each group's candidates. s_old, u: (P, G) -> q: (P, G), rows summing to 1.
    log_softmax(s_old) is the old policy renormalised over the G candidates; adding u / eta tilts it
    towards the better ones, so a group with u = 0 gets back exactly the old policy."""
    return torch.softmax(s_old.log_softmax(1) + u / eta, 1)


def kl_k3(logp, ref_logp):
    """Schulman's k3 estimator of KL(pi || ref) at the sampled tokens: exp(d) - d - 1, d = ref - pi."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def aggregate(per_token, mask):
    """Sum over each completion's tokens, no length normalisation: (N, T) -> (N,) sequence log-probs s_i."""
    return (per_token * mask).sum(1)


def policy_loss(logp, old_logp, q, mask, groups):
    """Cross-entropy from the target to the policy over each group's candidates, and its diagnostics.
    logp, old_logp, mask: (N, T); q: (P, G) with N = P * G, frozen; groups: the whole batch's groups."""
    ratio = torch.exp(logp - old_logp)  # (N, T); 1 in the first inner epoch
    s = aggregate(logp, mask).view_as(q)  # (P, G) each candidate's log-prob under the current policy
    per_group = -(q * s.log_softmax(1)).sum(1)  # (P,) cross-entropy H(q, p); d/ds_i = p_i - q_i
    stats = {"ratio": tt.masked_mean(ratio, mask),
             "clip_frac": tt.masked_mean(((ratio - 1).abs() > 0.2).float(), mask),  # no clip: drift past +-0.2
             "kl": tt.masked_mean(kl_k3(logp, old_logp), mask)}  # k3 to the sampling policy
    return per_group.sum() / groups, {k: v.detach() for k, v in stats.items()}  # the mean over the batch's groups


def update(model, optimizer, rollout, q, old_logp, step, args):
    """One optimizer step on a sampled batch, its gradient accumulated over micro-batches of whole
    groups; returns the whole batch's loss, diagnostics and entropy, whatever --micro_batch is."""
    n, metrics = len(old_logp), tt.BatchMetrics(rollout.completion_mask.sum())  # counted before the split
    optimizer.zero_grad()
    for rows in tt.micro_batches(n, args.micro_batch * args.group_size):  # row slices of whole groups
        part = rollout.rows(rows)
        mask = part.completion_mask  # (n_mb, T)
        logp, entropy = tt.token_logprobs(model, part)  # (n_mb, T) each
        q_part = q.view(-1)[rows].view(-1, args.group_size)  # (P_mb, G) the target of these groups
        loss, stats = policy_loss(logp, old_logp[rows], q_part, mask, len(q))
        tt.check_finite(loss, step)
        loss.backward()  # gradients add up over the micro-batches into the whole batch's
        metrics.add(mask, loss, entropy=tt.masked_mean(entropy, mask), **stats)
    stats = metrics.totals()
    stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    optimizer.step()
    loss, entropy = stats.pop("loss"), stats.pop("entropy")
    return loss, stats, entropy


def check_args(args):
    tt.check_common_args(args, min_group=2)
    if args.epochs < 1:
        tt.fail(f"--epochs must be at least 1, got {args.epochs}")
    if not args.eta > 0:
        tt.fail(f"--eta must be positive, got {args.eta}")


# TRY NOT TO MODIFY: the loop every file shares.


def main():
    args = tt.parse_args(Args)
    check_args(args)
    task, model, tok, device, logger, rng = tt.setup(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    mb_rows = args.micro_batch * args.group_size  # rows per forward pass, whole groups (0: the whole batch)
    base_acc, exact, test_extra = tt.evaluate(model, tok, task, device, args.max_new_tokens, mb_rows)
    logger.eval(0, base_acc, exact, **test_extra)

    for step in range(1, args.steps + 1):
        examples = task.sample(rng, args.prompts_per_step)
        rollout, rewards = tt.rollout_groups(model, tok, task, examples, args.group_size, args, device)
        adv = group_advantages(rewards)  # (P, G) u, one z-scored reward per candidate
        old_logp, _ = tt.score(model, rollout, mb_rows)  # (N, T) pi_old, frozen for every epoch
        q = tpo_target(aggregate(old_logp, rollout.completion_mask).view_as(adv), adv, args.eta)  # (P, G)
        for epoch in range(args.epochs):  # the ratio and clip fraction logged are the last epoch's
            loss, stats, entropy = update(model, optimizer, rollout, q, old_logp, step, args)
        grad_norm = stats.pop("grad_norm")
        logger.step(step, reward=rewards.mean(), loss=loss, entropy=entropy, **stats,
                    grad_norm=grad_norm, len=rollout.lengths.mean(), gen_tokens=int(rollout.lengths.sum()),
                    len_wrong=tt.mean_length_wrong(rollout, rewards),
                    target_entropy=torch.special.entr(q).sum(1).mean(), max_q=q.max(1).values.mean(),
                    **task.extra_metrics(rollout.texts))
        if (args.eval_every and step % args.eval_every == 0) or step == args.steps:
            test_acc, exact, test_extra = tt.evaluate(model, tok, task, device, args.max_new_tokens, mb_rows)
            logger.eval(step, test_acc, exact, **test_extra)
    logger.final(test_acc, exact, base_acc)


if __name__ == "__main__":
    main()
