"""OPD: on-policy distillation. The student samples; a frozen teacher scores every sampled token.

Papers: Agarwal et al., "On-Policy Distillation of Language Models: Learning from Self-Generated
Mistakes" (GKD), ICLR 2024, arXiv 2306.13649; Lu et al. (Thinking Machines), "On-Policy
Distillation", 2025 blog; Gu et al., "MiniLLM", arXiv 2306.08543.
Parent: minimal_pg.py (one gradient step per batch, REINFORCE loss, no clip, no reference model).
The change: the advantage. No reward, no baseline: a frozen teacher pi_T scores the student's own
tokens, and each token is credited with its own log-ratio, and with nothing that came after it:

    A_t  = -(log pi_S(a_t) - log pi_T(a_t))                 (a number: detached, discount 0)
    loss = -mean_i [ sum_t A_t * log pi_S(y_i,t) ]          --estimator sampled (the default)
    loss =  mean_i [ sum_t KL(pi_S || pi_T)(. | y_i,<t) ]   --estimator full (GKD, lambda = beta = 1)

The two losses have the same expected gradient. At a visited position, averaging the sampled
gradient over the token a ~ pi_S gives sum_a pi_S(a) (log pi_S(a) - log pi_T(a)) grad log pi_S(a),
which is grad KL(pi_S || pi_T) because sum_a pi_S(a) grad log pi_S(a) = grad 1 = 0. The full
estimator does that sum over the vocabulary exactly instead of drawing one token: the same direction
with less noise, at the price of the teacher's whole distribution (so a shared vocabulary). Neither
charges a token for the prefixes it leads to (tinker's kl_discount_factor = 0; a discount would add
every later log-ratio to A_t, and its variance with it). A is detached whole: a live log pi_S inside
it would add log pi_S grad log pi_S, whose expectation is -grad H(pi_S), an entropy bonus of weight 1.
The task reward is logged as `reward` and never trained on (--binary changes that column only; tested).
Why the toy shows it: the reward gives one number per completion (with --binary, mostly 0 for every
completion of a group at the base), the teacher a verdict on every token, whatever the reward.

The same loss at scale, up to one positive factor per batch (the same direction; when the gradient norm
exceeds the clip with and without it, as on this toy, the same step): --estimator sampled has
tinker-cookbook's gradient (distillation/train_on_policy.py: kl_penalty_coef=1, kl_discount_factor=0,
loss_fn="importance_sampling", num_substeps=1), which sums every token of the N completions: ours times N.
Its logged loss is -sum A, not our -mean sum A log pi_S. --estimator full equals TRL's GKD loss
(generalized_jsd_loss with beta=1, the reverse KL, at temperature 1, fully on-policy: lmbda=1) times M/N,
M the batch's tokens: it divides by tokens, we by completions. GKDTrainer itself divides by the token
count of the dataset's reference replies, not of the student's samples; TRL 1.16 recommends its
DistillationTrainer for lmbda=1. One forward pass gives both the sampler's and the learner's log-probs
(tinker's ratio is exactly 1 here). At --temperature other than 1 neither reference applies: the student
is scored at its sampling temperature, the teacher at 1.

The teacher (toy_tasks.load_teacher): the same 2-layer Llama and tokenizer, trained in memory by the
supervised warm-up for --teacher_steps with the learning rate decayed to 0, from its own seeds (neither
its weights nor its data shift the student's; tested); frozen (eval mode, no gradients, no optimizer);
below --teacher_min_acc the run stops before any RL. --teacher loads any causal LM that shares the
student's vocabulary; a --model student must name one. Departures: 256 prompts x 1 completion per step
(GRPO's 256 samples without the groups no baseline needs), lr 1e-3 and AdamW (weight decay 0.01) with
gradient clip 1, as the siblings (tinker: Adam, beta2 0.95, LoRA). What to watch: teacher_kl (sampled)
tracking reverse_kl (exact) towards 0, top1_agree towards 1, test_acc towards the teacher's.
--grad_var_batches K measures both estimators' gradients on the same K batches at the base instead.

Run: uv run minimal_opd.py            (flags: uv run minimal_opd.py --help; --estimator full for GKD)
"""
from dataclasses import dataclass

import torch

import toy_tasks as tt


@dataclass
class Args:
    task: str = "reverse"
    """task to train on: reverse (dense per-character reward), add (exact-match reward) or gsm8k (a real task
    for a --model with a --teacher; test_acc is then the share of held-out problems answered right)"""
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
    max_new_tokens: int = -1
    """token budget per completion, cut off without EOS (-1: the task's own, 10 for the toys, 256 for gsm8k)"""
    temperature: float = 1.0
    """sampling temperature (the student's log-probs are taken at the same temperature, the teacher's at 1)"""
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


def kl(logp_all, other_logp_all):
    """Exact KL(p || q) at every position, summed over the vocabulary: (N, T, V) x 2 -> (N, T). With the
    student first it is the reverse KL(pi_S || pi_T) that OPD minimises; with the teacher first, the
    forward KL(pi_T || pi_S) that supervised distillation would."""
    return (logp_all.exp() * (logp_all - other_logp_all)).sum(-1)


def entropy(logp_all):
    """Entropy of each next-token distribution: (N, T, V) -> (N, T)."""
    return -(logp_all.exp() * logp_all).sum(-1)


def kl_k3(logp, ref_logp):
    """Schulman's k3 estimator of KL(pi || ref) at the sampled tokens: exp(d) - d - 1, d = ref - pi."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def aggregate(per_token, mask, n):
    """Sum over each completion's tokens, then over the completions given, divided by n, the whole
    batch's number of completions (both estimators): the batch mean, added up micro-batch by micro-batch."""
    return (per_token * mask).sum(1).sum() / n


def policy_loss(logp, old_logp, adv, mask, n, full_kl=None):
    """Either estimator's loss and the shared diagnostics. logp, old_logp, adv, mask: (N, T), one advantage
    per token; n: the batch's completions. full_kl (N, T), the exact KL at each position with its graph,
    selects the full estimator; without it, the sampled one."""
    ratio = torch.exp(logp - old_logp)  # (N, T); 1 exactly: one update per batch
    if full_kl is None:
        per_token = -adv * logp  # (N, T) sampled: each token credited with its own term only (discount 0)
    else:
        per_token = full_kl  # (N, T) full: the same expected gradient, each position's token summed out exactly
    stats = {"ratio": tt.masked_mean(ratio, mask),
             "clip_frac": tt.masked_mean(((ratio - 1).abs() > 0.2).float(), mask),  # no clip: drift past +-0.2
             "kl": tt.masked_mean(kl_k3(logp, old_logp), mask)}  # k3 to the sampling policy
    return aggregate(per_token, mask, n), {k: v.detach() for k, v in stats.items()}


@torch.no_grad()
def teacher_logprobs(teacher, rollout):
    """The frozen teacher's log-probs over the vocabulary at every completion position, (N, T, V), at
    temperature 1 whatever temperature the student sampled at: the teacher only scores."""
    return tt.completion_logits(teacher, rollout, 1.0).log_softmax(-1)


def distill_loss(model, teacher, rollout, estimator, n):
    """Either estimator's loss on one micro-batch (divided by n, the batch's completions), the shared
    diagnostics, the student's token entropies (N, T) and the teacher diagnostics. The teacher scores
    this micro-batch only: its logits are as large as the student's."""
    mask = rollout.completion_mask  # (N, T)
    teacher_logp_all = teacher_logprobs(teacher, rollout)  # (N, T, V)
    logp_all = tt.completion_logits(model, rollout, rollout.temperature).log_softmax(-1)  # (N, T, V) as sampled
    pick = lambda x: x.gather(-1, rollout.completion_ids[..., None]).squeeze(-1)  # (N, T) the sampled tokens
    logp, teacher_logp = pick(logp_all), pick(teacher_logp_all)
    adv = distill_advantages(logp, teacher_logp)  # (N, T)
    full_kl = kl(logp_all, teacher_logp_all) if estimator == "full" else None
    loss, stats = policy_loss(logp, logp.detach(), adv, mask, n, full_kl)
    logp_all = logp_all.detach()
    teaching = {"teacher_kl": tt.masked_mean(-adv, mask),  # the sampled estimate of reverse_kl
                "reverse_kl": tt.masked_mean(kl(logp_all, teacher_logp_all), mask),
                "forward_kl": tt.masked_mean(kl(teacher_logp_all, logp_all), mask),
                "teacher_entropy": tt.masked_mean(entropy(teacher_logp_all), mask),
                "top1_agree": tt.masked_mean((logp_all.argmax(-1) == teacher_logp_all.argmax(-1)).float(), mask)}
    return loss, stats, entropy(logp_all), teaching


def update(model, optimizer, rollout, teacher, step, args):
    """One optimizer step on a sampled batch, its gradient accumulated over micro-batches of whole
    groups; returns the whole batch's loss, diagnostics, entropy and teacher diagnostics."""
    n, metrics = len(rollout.texts), tt.BatchMetrics(rollout.completion_mask.sum())  # counted before the split
    optimizer.zero_grad()
    for rows in tt.micro_batches(n, args.micro_batch * args.group_size):  # row slices of whole groups
        part = rollout.rows(rows)
        mask = part.completion_mask  # (n_mb, T)
        loss, stats, entropy, teaching = distill_loss(model, teacher, part, args.estimator, n)
        tt.check_finite(loss, step)
        loss.backward()  # gradients add up over the micro-batches into the whole batch's
        metrics.add(mask, loss, entropy=tt.masked_mean(entropy, mask), **stats, **teaching)
    stats = metrics.totals()
    teaching = {k: stats.pop(k) for k in teaching}  # the teacher columns go after the shared ones
    stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    optimizer.step()
    loss, entropy = stats.pop("loss"), stats.pop("entropy")
    return loss, stats, entropy, teaching


def gradient_variance(model, tok, task, teacher, rng, device, logger, args):
    """Claim C2, at the base and without a step: both estimators' gradients on the same batches; logs
    each one's variance across batches (summed over parameters, before clipping) and its mean's norm."""
    grads = {"sampled": [], "full": []}
    for _ in range(args.grad_var_batches):
        examples = task.sample(rng, args.prompts_per_step)
        rollout, _ = tt.rollout_groups(model, tok, task, examples, args.group_size, args, device)
        n = len(rollout.texts)
        for estimator, g in grads.items():
            model.zero_grad()
            for rows in tt.micro_batches(n, args.micro_batch * args.group_size):
                distill_loss(model, teacher, rollout.rows(rows), estimator, n)[0].backward()
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
        tt.fail("--model needs a --teacher with the same vocabulary (the tiny teacher has the tiny student's)")
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
    mb_rows = args.micro_batch * args.group_size  # rows per forward pass, whole groups (0: the whole batch)
    base_acc, exact, test_extra = tt.evaluate(model, tok, task, device, args.max_new_tokens, mb_rows)
    logger.eval(0, base_acc, exact, **test_extra)
    if args.grad_var_batches:
        return gradient_variance(model, tok, task, teacher, rng, device, logger, args)

    for step in range(1, args.steps + 1):
        examples = task.sample(rng, args.prompts_per_step)
        rollout, rewards = tt.rollout_groups(model, tok, task, examples, args.group_size, args, device)
        loss, stats, entropy, teaching = update(model, optimizer, rollout, teacher, step, args)  # rewards: only logged
        grad_norm = stats.pop("grad_norm")
        logger.step(step, reward=rewards.mean(), loss=loss, entropy=entropy, **stats,
                    grad_norm=grad_norm, len=rollout.lengths.mean(), gen_tokens=int(rollout.lengths.sum()), **teaching,
                    **task.extra_metrics(rollout.texts))
        if (args.eval_every and step % args.eval_every == 0) or step == args.steps:
            test_acc, exact, test_extra = tt.evaluate(model, tok, task, device, args.max_new_tokens, mb_rows)
            logger.eval(step, test_acc, exact, **test_extra)
    logger.final(test_acc, exact, base_acc)


if __name__ == "__main__":
    main()
