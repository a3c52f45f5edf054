"""DG: Delightful Policy Gradient. Gate each token's update by how delightful it was.

Paper: Osband 2026, "Delightful Policy Gradient", arXiv 2603.14608; the optional Kondo gate is from
Osband 2026, "Does This Gradient Spark Joy?", arXiv 2603.20526.
Parent: minimal_pg.py (its leave-one-out advantage is kept unchanged).
The change: weight every token's log-prob by a stop-gradient gate of its delight, the advantage
times the token's surprisal, so rare successes are learned from in full and rare failures are mostly
ignored, while confident tokens get half weight whichever way the reward went:

    A_i   = r_i - mean_{j != i} r_j               (leave-one-out, as in the parent)
    l_i,t = -log pi(y_i,t)                        (surprisal)
    w_i,t = sigmoid(A_i * l_i,t / eta)            (the gate: -> 1, -> 0, or 1/2 when l = 0)
    loss  = -mean_i [ sum_t sg(w_i,t * A_i) * log pi(y_i,t) ]

A choice, stated: the references write the loss as -mean_t, from fixed-length toys where every token
reduction is a constant multiple of every other. Completions here vary in length, and this file keeps
the parent's reduction: sum over each completion's tokens, mean over completions. Every token weighs
the same, as in a token mean; only the overall scale (the mean length) differs. A per-completion
token mean would instead make a token of a short completion count for more.
One update per batch and no importance ratio: nothing bounds the policy shift, so DG takes no
extra epochs; ratio is 1 and kl is 0 by construction, logged anyway.

--kondo adds the Kondo gate (the paper's Algorithm 1, as the rl-experiments KondoLoss implements it):
a forward pass without grad prices every completion by its delight, chi_i = sum_t A_i * l_i,t (the
advantage times the whole completion's surprisal: the completion is one action, as in the parent),
and the forward and backward pass with grad run only on the completions the screen keeps:

    keep_i ~ Bernoulli(sigmoid((chi_i - lambda) / eta)),   lambda such that mean_i sigmoid(...) = rate

lambda is found by bisection, so --kondo_keep_rate of the batch is kept in expectation, and at
eta = 1 a negative-delight completion still has a chance. --kondo_hard takes the eta -> 0 limit:
exactly the top ceil(rate * N) completions by delight, no coin flips. The loss still divides by all
N completions: a dropped completion counts as zero, it does not inflate the others, and the kept
ones are not reweighted by their keep probability (as in the reference). A flat group's completions
(A = 0, so chi = 0) can pass the stochastic screen and then pay a backward pass for no gradient.
`kept` logs the share trained on, the backward compute paid.

Run: uv run minimal_dg.py            (flags: uv run minimal_dg.py --help; add --kondo for the gate)
"""
import math
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
    eta: float = 1.0
    """gate temperature: w = sigmoid(delight / eta); large eta flattens every gate towards 1/2"""
    kondo: bool = False
    """Kondo gate: run the backward pass only on the completions a delight screen keeps"""
    kondo_keep_rate: float = 0.5
    """with --kondo, the share of completions kept in expectation (sets the price lambda); 1 keeps all"""
    kondo_hard: bool = False
    """with --kondo, the screen's eta -> 0 limit: keep exactly the top ceil(rate * N) by delight"""
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


def token_delight(adv, logp):
    """Delight chi = A * surprisal, per token: positive for a surprise that paid off, negative for a
    surprise that did not, 0 for a token the policy was sure of. adv: (N,); logp: (N, T) -> (N, T)."""
    return adv[:, None] * -logp


def delight_gate(adv, logp, eta):
    """The gate w = sigmoid(chi / eta), (N, T) in (0, 1). The loss treats it as a constant."""
    return torch.sigmoid(token_delight(adv, logp) / eta)


def kondo_price(chi, rate, eta, iters=60):
    """The price lambda at which the screen keeps `rate` of the completions in expectation:
    mean_i sigmoid((chi_i - lambda) / eta) = rate, by bisection (the mean falls as lambda rises)."""
    lo, hi = chi.min() - 30 * eta, chi.max() + 30 * eta  # the mean is ~1 at lo and ~0 at hi
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if torch.sigmoid((chi - mid) / eta).mean() > rate else (lo, mid)
    return (lo + hi) / 2


def kondo_keep(chi, rate, eta, hard=False):
    """The screen: which completions get a backward pass. chi (N,) delights -> keep (N,) bool.
    Stochastic, keep_i ~ Bernoulli(sigmoid((chi_i - lambda) / eta)); or hard, the eta -> 0 limit that
    keeps exactly the top ceil(rate * N), ties broken by position."""
    if hard:
        keep = torch.zeros_like(chi, dtype=torch.bool)
        keep[chi.argsort(descending=True, stable=True)[:math.ceil(rate * chi.numel())]] = True
        return keep
    return torch.bernoulli(torch.sigmoid((chi - kondo_price(chi, rate, eta)) / eta)).bool()


@torch.no_grad()
def kondo_pass(model, rollout, adv, args):
    """The Kondo gate's pricing pass, forward passes without a graph (a micro-batch at a time). Returns
    which completions get a backward pass, (N,) bool, and the token entropies, (N, T), for the log."""
    logp, entropy = tt.score(model, rollout, args.micro_batch * args.group_size)  # (N, T) each
    chi = (token_delight(adv, logp) * rollout.completion_mask).sum(1)  # (N,) A_i times the whole surprisal
    return kondo_keep(chi, args.kondo_keep_rate, args.eta, args.kondo_hard), entropy


def kl_k3(logp, ref_logp):
    """Schulman's k3 estimator of KL(pi || ref) at the sampled tokens: exp(d) - d - 1, d = ref - pi."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def aggregate(per_token, mask, n):
    """Sum over each completion's tokens, then divide by n, the whole batch's number of completions
    sampled (the rows given may be fewer: a micro-batch, or what the Kondo gate kept)."""
    return (per_token * mask).sum() / n


def policy_loss(logp, old_logp, adv, mask, eta, n):
    """DG loss and its diagnostics. logp, old_logp, mask: (K, T); adv: (K,); n: completions sampled."""
    ratio = torch.exp(logp - old_logp)  # (K, T); 1 exactly: one update per batch
    gate = delight_gate(adv, logp.detach(), eta)  # (K, T) no gradient through the gate
    per_token = -(gate * adv[:, None]).detach() * logp  # (K, T) sg(w A) log pi: gradient only via log pi
    stats = {"ratio": tt.masked_mean(ratio, mask),
             "clip_frac": tt.masked_mean(((ratio - 1).abs() > 0.2).float(), mask),  # no clip: drift past +-0.2
             "kl": tt.masked_mean(kl_k3(logp, old_logp), mask),  # k3 to the sampling policy
             "gate": tt.masked_mean(gate, mask)}
    return aggregate(per_token, mask, n), {k: v.detach() for k, v in stats.items()}


def update(model, optimizer, rollout, adv, step, args):
    """One optimizer step on a sampled batch, its gradient accumulated over micro-batches of whole
    groups (the Kondo screen drops completions inside them); returns the whole batch's loss,
    diagnostics and entropy, whatever --micro_batch is."""
    mask = rollout.completion_mask  # (N, T)
    keep, entropy = torch.ones_like(adv, dtype=torch.bool), None  # (N,) without the gate, all train
    if args.kondo:
        keep, entropy = kondo_pass(model, rollout, adv, args)  # (N,) bool; (N, T)
        if not keep.any():  # the screen kept nothing: no step at all
            zero = torch.zeros((), device=adv.device)
            stats = dict(ratio=zero + 1, clip_frac=zero, kl=zero, gate=zero, grad_norm=zero, kept=zero)
            return zero, stats, tt.masked_mean(entropy, mask)
    n, metrics = len(adv), tt.BatchMetrics(mask[keep].sum())  # the kept tokens, counted before the split
    optimizer.zero_grad()
    for rows in tt.micro_batches(n, args.micro_batch * args.group_size):  # row slices of whole groups
        if not keep[rows].any():
            continue
        part = rollout.rows(rows).select(keep[rows])  # the kept completions of these groups, K of them
        logp, kept_entropy = tt.token_logprobs(model, part)  # (K, T) each
        loss, stats = policy_loss(logp, logp.detach(), adv[rows][keep[rows]], part.completion_mask, args.eta, n)
        tt.check_finite(loss, step)
        loss.backward()  # gradients add up over the micro-batches into the whole batch's
        metrics.add(part.completion_mask, loss, entropy=tt.masked_mean(kept_entropy, part.completion_mask), **stats)
    stats = metrics.totals()
    stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    optimizer.step()
    stats["kept"] = keep.float().mean()  # share of completions that paid for a backward pass
    loss, kept_entropy = stats.pop("loss"), stats.pop("entropy")
    entropy = kept_entropy if entropy is None else tt.masked_mean(entropy, mask)  # the metric covers the whole batch
    return loss, stats, entropy


def check_args(args):
    tt.check_common_args(args, min_group=2)
    if not args.eta > 0:
        tt.fail(f"--eta must be positive, got {args.eta}")
    if not 0 < args.kondo_keep_rate <= 1:
        tt.fail(f"--kondo_keep_rate must lie in (0, 1], got {args.kondo_keep_rate}")
    if args.kondo_hard and not args.kondo:
        tt.fail("--kondo_hard only applies with --kondo")


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
        grad_norm, gate, kept = stats.pop("grad_norm"), stats.pop("gate"), stats.pop("kept")
        logger.step(step, reward=rewards.mean(), loss=loss, entropy=entropy, **stats,
                    grad_norm=grad_norm, len=rollout.lengths.mean(), gen_tokens=int(rollout.lengths.sum()), gate=gate, kept=kept,
                    **task.extra_metrics(rollout.texts))
        if (args.eval_every and step % args.eval_every == 0) or step == args.steps:
            test_acc, exact, test_extra = tt.evaluate(model, tok, task, device, args.max_new_tokens, mb_rows)
            logger.eval(step, test_acc, exact, **test_extra)
    logger.final(test_acc, exact, base_acc)


if __name__ == "__main__":
    main()
