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
    """task to train on: reverse (dense per-character reward) or add (exact-match reward)"""
    binary: bool = False
    """score reverse by exact match (1 or 0) instead of per-character credit"""
    model: str = ""
    """Hugging Face causal LM (hub id or local folder); empty builds the tiny default Llama"""
    warmup_steps: int = -1
    """supervised warm-up steps that make the tiny default a partly competent base model (-1: the task's
    own, 40 for reverse; 0: start from random weights)"""
    seed: int = 0
    """seed for weights, prompts and sampling: the same seed prints the same lines on CPU"""
    steps: int = 150
    """RL steps; each samples a fresh batch of prompts"""
    prompts_per_step: int = 256
    """prompts per step"""
    group_size: int = 1
    """completions sampled per prompt; OPD has no baseline, so one is enough (256 x 1 = GRPO's 32 x 8)"""
    lr: float = 1e-3
    """AdamW learning rate"""
    max_grad_norm: float = 1.0
    """gradient-norm clip"""
    max_new_tokens: int = 10
    """token budget per completion; one that never emits EOS is truncated and marked"""
    temperature: float = 1.0
    """sampling temperature (the student's log-probs are taken at the same temperature, the teacher's at 1)"""
    eval_every: int = 20
    """greedy held-out evaluation every this many steps (0: only at the end)"""
    device: str = "auto"
    """auto, cpu, cuda or mps"""
    log_jsonl: str = ""
    """also write every step's metrics to this JSON-lines file"""
    estimator: str = "sampled"
    """sampled: REINFORCE on -(log pi_S - log pi_T) at each sampled token (Thinking Machines); full: the exact
    reverse KL over the vocabulary at each visited position (GKD, lambda = beta = 1)"""
    teacher: str = ""
    """Hugging Face causal LM sharing the student's vocabulary; empty trains the tiny Llama as teacher"""
    teacher_steps: int = 200
    """supervised steps that train the tiny teacher in memory (from its own seeds)"""
    teacher_min_acc: float = 0.97
    """stop before any RL if the teacher's held-out accuracy is below this"""
    grad_var_batches: int = 0
    """measure instead of train: both estimators' gradients at the base on this many batches, then stop"""


# ALGO LOGIC: everything that makes this method this method.


def distill_advantages(logp, teacher_logp):
    """The sampled-token advantage A_t = -(log pi_S(a_t) - log pi_T(a_t)), (N, T), detached whole: the
    student's own log-prob inside it is a number, not a path for the gradient. Positive where the
    teacher likes the token more than the student does, negative where less."""
    return -(logp - teacher_logp).detach()


def reverse_kl(logp_all, teacher_logp_all):
    """Exact KL(pi_S || pi_T) at every position, summed over the vocabulary: (N, T, V) x 2 -> (N, T).
    With the arguments swapped it is the forward KL(pi_T || pi_S)."""
    return (logp_all.exp() * (logp_all - teacher_logp_all)).sum(-1)


def entropy(logp_all):
    """Entropy of each next-token distribution: (N, T, V) -> (N, T)."""
    return -(logp_all.exp() * logp_all).sum(-1)


def kl_k3(logp, ref_logp):
    """Schulman's k3 estimator of KL(pi || ref) at the sampled tokens: exp(d) - d - 1, d = ref - pi."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def aggregate(per_token, mask):
    """Sum over each completion's tokens, then mean over completions (both estimators)."""
    return (per_token * mask).sum(1).mean()


def policy_loss(logp, old_logp, adv, mask):
    """REINFORCE loss and its diagnostics. logp, old_logp, adv, mask: (N, T), one advantage per token."""
    ratio = torch.exp(logp - old_logp)  # (N, T); 1 exactly: one update per batch
    per_token = -adv * logp  # (N, T) each token credited with its own term only (discount 0)
    stats = {"ratio": tt.masked_mean(ratio, mask),
             "clip_frac": tt.masked_mean(((ratio - 1).abs() > 0.2).float(), mask),  # no clip: drift past +-0.2
             "kl": tt.masked_mean(kl_k3(logp, old_logp), mask)}  # k3 to the sampling policy
    return aggregate(per_token, mask), {k: v.detach() for k, v in stats.items()}


@torch.no_grad()
def teacher_logprobs(teacher, rollout):
    """The frozen teacher's log-probs over the vocabulary at every completion position, (N, T, V), at
    temperature 1 whatever temperature the student sampled at: the teacher only scores."""
    return tt.completion_logits(teacher, rollout, 1.0).log_softmax(-1)


def distill_loss(model, rollout, teacher_logp_all, estimator):
    """Either estimator's loss on a batch, the shared diagnostics, the teacher diagnostics and the
    student's token entropies (N, T)."""
    mask = rollout.completion_mask  # (N, T)
    logp_all = tt.completion_logits(model, rollout, rollout.temperature).log_softmax(-1)  # (N, T, V) as sampled
    pick = lambda x: x.gather(-1, rollout.completion_ids[..., None]).squeeze(-1)  # (N, T) the sampled tokens
    logp, teacher_logp = pick(logp_all), pick(teacher_logp_all)
    adv = distill_advantages(logp, teacher_logp)  # (N, T)
    loss, stats = policy_loss(logp, logp.detach(), adv, mask)
    if estimator == "full":  # the same expected gradient, each position's token summed out exactly
        loss = aggregate(reverse_kl(logp_all, teacher_logp_all), mask)
    logp_all = logp_all.detach()
    teaching = {"teacher_kl": tt.masked_mean(-adv, mask),  # the sampled estimate of reverse_kl
                "reverse_kl": tt.masked_mean(reverse_kl(logp_all, teacher_logp_all), mask),
                "forward_kl": tt.masked_mean(reverse_kl(teacher_logp_all, logp_all), mask),
                "teacher_entropy": tt.masked_mean(entropy(teacher_logp_all), mask),
                "top1_agree": tt.masked_mean((logp_all.argmax(-1) == teacher_logp_all.argmax(-1)).float(), mask)}
    return loss, stats, teaching, entropy(logp_all)


def update(model, optimizer, rollout, teacher_logp_all, step, args):
    """One gradient step on a sampled batch; returns the loss, its diagnostics and the entropy."""
    mask = rollout.completion_mask  # (N, T)
    loss, stats, teaching, entropy = distill_loss(model, rollout, teacher_logp_all, args.estimator)
    tt.check_finite(loss, step)
    optimizer.zero_grad()
    loss.backward()
    stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    optimizer.step()
    return loss.detach(), stats, tt.masked_mean(entropy, mask), teaching


def gradient_variance(model, tok, task, teacher, rng, device, logger, args):
    """Claim C2, at the base and without a step: both estimators' gradients on the same batches; logs
    each one's variance across batches (summed over parameters, before clipping) and its mean's norm."""
    grads = {"sampled": [], "full": []}
    for _ in range(args.grad_var_batches):
        examples = task.sample(rng, args.prompts_per_step)
        rollout, _ = tt.rollout_groups(model, tok, task, examples, args.group_size, args, device)
        teacher_logp_all = teacher_logprobs(teacher, rollout)
        for estimator, g in grads.items():
            model.zero_grad()
            distill_loss(model, rollout, teacher_logp_all, estimator)[0].backward()
            g.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    g = {estimator: torch.stack(v) for estimator, v in grads.items()}  # (batches, parameters) each
    logger.info("grad", sampled_var=g["sampled"].var(0).sum(), full_var=g["full"].var(0).sum(),
                sampled_mean_norm=g["sampled"].mean(0).norm(), full_mean_norm=g["full"].mean(0).norm(),
                cos_of_means=torch.cosine_similarity(g["sampled"].mean(0), g["full"].mean(0), 0))


def check_args(args):
    tt.check_common_args(args, min_group=1)  # no baseline: one completion per prompt is enough
    if args.estimator not in ("sampled", "full"):
        tt.fail(f"--estimator {args.estimator!r} is unknown; choose sampled or full")
    if args.model and not args.teacher:
        tt.fail("--model needs a --teacher that shares its vocabulary (the tiny teacher shares only the tiny student's)")
    if not args.teacher and args.teacher_steps < 1:
        tt.fail(f"--teacher_steps must be a positive whole number, got {args.teacher_steps}")
    if not 0 <= args.teacher_min_acc <= 1:
        tt.fail(f"--teacher_min_acc must lie in [0, 1], got {args.teacher_min_acc}")
    if args.grad_var_batches < 0 or args.grad_var_batches == 1:
        tt.fail(f"--grad_var_batches must be 0 (train) or at least 2 (a variance), got {args.grad_var_batches}")


# TRY NOT TO MODIFY: the loop every file shares.


def main():
    args = tt.parse_args(Args)
    check_args(args)
    task, model, tok, device, logger, rng = tt.setup(args)
    teacher, record = tt.load_teacher(args, task, tok, model, device)  # frozen, checked, from its own seeds
    logger.info("teacher", **record)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    base_acc, exact = tt.evaluate(model, tok, task, device, args.max_new_tokens)
    logger.eval(0, base_acc, exact)
    if args.grad_var_batches:
        return gradient_variance(model, tok, task, teacher, rng, device, logger, args)

    for step in range(1, args.steps + 1):
        examples = task.sample(rng, args.prompts_per_step)
        rollout, rewards = tt.rollout_groups(model, tok, task, examples, args.group_size, args, device)
        teacher_logp_all = teacher_logprobs(teacher, rollout)  # (N, T, V); the rewards are only logged
        loss, stats, entropy, teaching = update(model, optimizer, rollout, teacher_logp_all, step, args)
        grad_norm = stats.pop("grad_norm")
        logger.step(step, reward=rewards.mean(), loss=loss, entropy=entropy, **stats,
                    grad_norm=grad_norm, len=rollout.lengths.mean(), gen_tokens=int(rollout.lengths.sum()), **teaching)
        if (args.eval_every and step % args.eval_every == 0) or step == args.steps:
            test_acc, exact = tt.evaluate(model, tok, task, device, args.max_new_tokens)
            logger.eval(step, test_acc, exact)
    logger.final(test_acc, exact, base_acc)


if __name__ == "__main__":
    main()
