"""REINFORCE with a leave-one-out group baseline: the parent of every minimal_*.py file.

Papers: Williams 1992 (REINFORCE); Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for
Free!"; Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning
from Human Feedback in LLMs" (RLOO), arXiv 2402.14740.
The same advantage at scale: TRL's RLOOTrainer, verl's adv_estimator=rloo.
Parent: none; every other file is a copy of this one (or of minimal_grpo.py) with one idea changed.
The idea: sample G completions per prompt, score each against the mean reward of the other G-1, and
raise the log-probability of the whole completion in proportion to that advantage:

    A_i  = r_i - mean_{j != i} r_j  =  G/(G-1) * (r_i - mean(r))
    loss = -mean_i [ A_i * sum_t log pi(y_i,t) ]        (the whole completion is one action)

Why leave-one-out: the baseline for completion i must not depend on y_i, or it biases the gradient.
The mean of the other G-1 rewards is independent of y_i, so E[A_i grad log pi(y_i)] is the true policy
gradient, with far less variance than the raw reward. It is also why a group whose G rewards are all
equal contributes nothing: no completion did better than its siblings, so there is nothing to learn.

Why a sum over tokens: the completion is one action whose log-probability is the sum of its token
log-probs, so the REINFORCE estimator multiplies A_i by that sum. A longer completion therefore gets
a proportionally larger push; the GRPO family changes exactly this normalisation (see those files).

One gradient step per batch, on the batch just sampled: the policy that sampled is the one being
updated, so the importance ratio is exactly 1, nothing is clipped and the KL to the sampler is 0.
Those columns are still logged so that every file's output lines up with its siblings'.
What to watch instead: reward and test_acc rising, entropy falling (the policy sharpening), and len
settling at the answer length plus one end-of-sequence token.

How to read this file (every sibling has the same layout): `Args` is the whole configuration, one
flag per field; under ALGO LOGIC sit the advantage, the KL estimator, the aggregation, the loss and
one update, each a small function the tests check by hand; under TRY NOT TO MODIFY is the loop that
samples, scores, updates and logs. toy_tasks.py holds everything that is not the method.

Run: uv run minimal_pg.py            (flags: uv run minimal_pg.py --help)
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
    steps: int = 200
    """RL steps; each samples a fresh batch of prompts"""
    prompts_per_step: int = 32
    """prompts per step"""
    group_size: int = 8
    """completions sampled per prompt (G); the baseline needs at least 2"""
    lr: float = 1e-3
    """AdamW learning rate"""
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
    """Leave-one-out baseline. rewards (P, G) -> advantages (P, G); exactly 0 for a group whose rewards
    are all equal."""
    g = rewards.size(1)
    flat = rewards.max(1, keepdim=True).values == rewards.min(1, keepdim=True).values  # (P, 1)
    # r - mean alone would not do: in float32 the mean of eight 0.6s is one rounding step (6e-8) off
    return torch.where(flat, torch.zeros_like(rewards), g / (g - 1) * (rewards - rewards.mean(1, keepdim=True)))


def kl_k3(logp, ref_logp):
    """Schulman's k3 estimator of KL(pi || ref) at the sampled tokens: exp(d) - d - 1, d = ref - pi."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def aggregate(per_token, mask, n):
    """Sum over each completion's tokens (one action per completion), then over the completions given,
    divided by n, the whole batch's number of completions: the batch mean, added up micro-batch by
    micro-batch (each micro-batch's own mean would weigh a small micro-batch's completions more)."""
    return (per_token * mask).sum(1).sum() / n


def policy_loss(logp, old_logp, adv, mask, n):
    """REINFORCE loss and its diagnostics. logp, old_logp, mask: (N, T); adv: (N,); n: the batch's completions."""
    ratio = torch.exp(logp - old_logp)  # (N, T); 1 exactly: one update per batch
    per_token = -adv[:, None] * logp  # (N, T)
    stats = {"ratio": tt.masked_mean(ratio, mask),
             "clip_frac": tt.masked_mean(((ratio - 1).abs() > 0.2).float(), mask),  # no clip: drift past +-0.2
             "kl": tt.masked_mean(kl_k3(logp, old_logp), mask)}  # k3 to the sampling policy
    return aggregate(per_token, mask, n), {k: v.detach() for k, v in stats.items()}


def update(model, optimizer, rollout, adv, step, args):
    """One optimizer step on a sampled batch, its gradient accumulated over micro-batches of whole
    groups; returns the whole batch's loss, diagnostics and entropy, whatever --micro_batch is."""
    n, metrics = len(adv), tt.BatchMetrics(rollout.completion_mask.sum())  # counted before the split
    optimizer.zero_grad()
    for rows in tt.micro_batches(n, args.micro_batch * args.group_size):  # row slices of whole groups
        part = rollout.rows(rows)
        mask = part.completion_mask  # (n_mb, T)
        logp, entropy = tt.token_logprobs(model, part)  # (n_mb, T) each
        loss, stats = policy_loss(logp, logp.detach(), adv[rows], mask, n)
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
        adv = group_advantages(rewards).view(-1)  # (N,) one advantage per completion
        loss, stats, entropy = update(model, optimizer, rollout, adv, step, args)
        grad_norm = stats.pop("grad_norm")
        logger.step(step, reward=rewards.mean(), loss=loss, entropy=entropy, **stats,
                    grad_norm=grad_norm, len=rollout.lengths.mean(), gen_tokens=int(rollout.lengths.sum()),
                    **task.extra_metrics(rollout.texts))
        if (args.eval_every and step % args.eval_every == 0) or step == args.steps:
            test_acc, exact, test_extra = tt.evaluate(model, tok, task, device, args.max_new_tokens, mb_rows)
            logger.eval(step, test_acc, exact, **test_extra)
    logger.final(test_acc, exact, base_acc)


if __name__ == "__main__":
    main()
