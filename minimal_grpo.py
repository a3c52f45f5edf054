"""GRPO: Group Relative Policy Optimization, the parent of the clipped-surrogate files.

Paper: Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open
Language Models", arXiv 2402.03300 (reference code: TRL loss_type="grpo", verl
compute_grpo_outcome_advantage with loss_agg_mode="seq-mean-token-mean").
Parent: minimal_pg.py.
The change: standardise each reward within its group, and optimise PPO's clipped surrogate over
several inner epochs on the same batch, minus a k3 KL penalty to a frozen copy of the base model:

    A_i   = (r_i - mean(r)) / (std(r) + 1e-4)       (population std; TRL/verl use the unbiased one)
    rho   = pi(y_i,t) / pi_old(y_i,t)
    J_i,t = min(rho A_i, clip(rho, 1-eps, 1+eps) A_i) - beta * k3(pi || pi_ref)
    loss  = -mean_i [ (1/|y_i|) sum_t J_i,t ]       (token mean per completion, then completion mean)

A subtlety of the KL term, not a departure (the paper and verl do exactly this): the *value* of k3
estimates KL(pi || pi_ref), but what a loss contributes is its gradient, and the gradient of k3 at a
sampled token is (1 - pi_ref/pi) grad log pi, whose expectation under pi is the gradient of the other
direction, KL(pi_ref || pi). So the penalty pulls the policy to keep covering whatever the base model
would say (mass-covering), rather than only to stay inside it; the logged kl is the k3 value.

Departure from the paper: 4 inner epochs per batch where the paper takes one gradient step per
exploration stage. With one step rho is exactly 1 and the clip never fires (try --epochs 1); with four,
the ratio, the clip fraction and the entropy collapse that docs/grpo.md describes are all visible.

Run: uv run minimal_grpo.py          (flags: uv run minimal_grpo.py --help)
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
    prompts_per_step: int = 32
    """prompts per step"""
    group_size: int = 8
    """completions sampled per prompt (G); the baseline needs at least 2"""
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


def group_advantages(rewards, eps=1e-4):
    """Group z-score with the population std. rewards (P, G) -> advantages (P, G); exactly 0 for a
    group whose rewards are all equal."""
    mean, std = rewards.mean(1, keepdim=True), rewards.std(1, unbiased=False, keepdim=True)
    flat = rewards.max(1, keepdim=True).values == rewards.min(1, keepdim=True).values  # (P, 1)
    # std > 0 would not do: in float32 the mean of eight 0.6s is one rounding step (6e-8) off (their std is
    # 0 in a batch of groups, 6e-8 alone), and dividing r - mean by std + eps would give advantages of 6e-4
    return torch.where(flat, torch.zeros_like(rewards), (rewards - mean) / (std + eps))


def kl_k3(logp, ref_logp):
    """Schulman's k3 estimator of KL(pi || ref) at the sampled tokens: exp(d) - d - 1, d = ref - pi."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def aggregate(per_token, mask, n):
    """Per-sequence token mean (the 1/|y_i| factor), then a sum over the completions given divided by n,
    the whole batch's number of completions: the batch mean, added up micro-batch by micro-batch."""
    return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / n


def policy_loss(logp, old_logp, ref_logp, adv, mask, clip_eps, beta, n):
    """Clipped surrogate minus k3 KL, and its diagnostics. logp, old_logp, ref_logp, mask: (N, T); adv: (N,);
    n: the batch's completions."""
    ratio = torch.exp(logp - old_logp)  # (N, T); 1 in the first inner epoch
    surrogate = torch.min(ratio * adv[:, None], ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv[:, None])
    kl = kl_k3(logp, ref_logp)  # (N, T) k3 to the frozen base model, inside the per-token sum
    per_token = -(surrogate - beta * kl)  # (N, T)
    # the tokens whose gradient the clip removed (TRL's clip_ratio/region_mean, verl's pg_clipfrac): a
    # ratio outside the band on the side the advantage pushes towards; outside on the other side, the
    # unclipped term is the smaller one and the gradient flows
    clipped = ((ratio > 1 + clip_eps) & (adv[:, None] > 0)) | ((ratio < 1 - clip_eps) & (adv[:, None] < 0))  # (N, T)
    stats = {"ratio": tt.masked_mean(ratio, mask),
             "clip_frac": tt.masked_mean(clipped.float(), mask),
             "kl": tt.masked_mean(kl, mask)}
    return aggregate(per_token, mask, n), {k: v.detach() for k, v in stats.items()}


def update(model, optimizer, rollout, adv, old_logp, ref_logp, step, args):
    """One optimizer step on a sampled batch, its gradient accumulated over micro-batches of whole
    groups; returns the whole batch's loss, diagnostics and entropy, whatever --micro_batch is."""
    n, metrics = len(adv), tt.BatchMetrics(rollout.completion_mask.sum())  # counted before the split
    optimizer.zero_grad()
    for rows in tt.micro_batches(n, args.micro_batch * args.group_size):  # row slices of whole groups
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


def check_args(args):
    tt.check_common_args(args, min_group=2)
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
    mb_rows = args.micro_batch * args.group_size  # rows per forward pass, whole groups (0: the whole batch)
    base_acc, exact, test_extra = tt.evaluate(model, tok, task, device, args.max_new_tokens, mb_rows)
    logger.eval(0, base_acc, exact, **test_extra)

    for step in range(1, args.steps + 1):
        examples = task.sample(rng, args.prompts_per_step)
        rollout, rewards = tt.rollout_groups(model, tok, task, examples, args.group_size, args, device)
        adv = group_advantages(rewards).view(-1)  # (N,) one advantage per completion
        old_logp, _ = tt.score(model, rollout, mb_rows)  # (N, T) pi_old, frozen for every epoch
        ref_logp = tt.score(ref_model, rollout, mb_rows)[0] if args.beta > 0 else old_logp
        for epoch in range(args.epochs):  # the ratio and clip fraction logged are the last epoch's
            loss, stats, entropy = update(model, optimizer, rollout, adv, old_logp, ref_logp, step, args)
        grad_norm = stats.pop("grad_norm")
        logger.step(step, reward=rewards.mean(), loss=loss, entropy=entropy, **stats,
                    grad_norm=grad_norm, len=rollout.lengths.mean(), gen_tokens=int(rollout.lengths.sum()),
                    len_wrong=tt.mean_length_wrong(rollout, rewards), **task.extra_metrics(rollout.texts))
        if (args.eval_every and step % args.eval_every == 0) or step == args.steps:
            test_acc, exact, test_extra = tt.evaluate(model, tok, task, device, args.max_new_tokens, mb_rows)
            logger.eval(step, test_acc, exact, **test_extra)
    logger.final(test_acc, exact, base_acc)


if __name__ == "__main__":
    main()
