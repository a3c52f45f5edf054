"""Pedagogical RL: a teacher with privileged context, rewarded for being learnable by its student.

Blog: Chakraborty, Ziems et al. 2026, "Pedagogical RL: Teaching Models to Teach Themselves from Privileged
Information" (no arXiv id); its stored copy stops before any formula, so these are rl-experiments' pedagogy
sandbox's (deepakvijaykee/rl-experiments, pedagogy_sandbox/losses.py, train.py), which follows it. Parent:
minimal_grpo.py (the teacher's update). The change: RL trains a teacher that sees privileged context c before the
student's prompt x, for task success times learnability to the current student (the same tokens without c); the
student only imitates fresh teacher samples, gated against what surprises it:

    g_t   = max_a log pi_S(a | x, y_<t) - log pi_S(y_t | x, y_<t)   (surprise gap: student view, temp. 1)
    spike = (logsumexp_t(beta g_t) - log n) / beta                  (soft max over the n tokens, EOS included)
    R'    = R * exp(-lam spike)                                     (teacher's GRPO reward, no KL; R binary)
    w_t   = sg sigmoid(kappa (log pi_S(y_t | x, y_<t) - gamma))     (the student's gate)
    loss  = mean_b [ sum_t w_t (-log pi_S(y_t)) / sum_t w_t ]       (the student's, on fresh teacher samples)

Defaults as the sandbox's: beta 5, lam 0.5, kappa 4, gamma -2.5. The toy (--task keyed, a KeyedReverseTask)
has two correct answers, the reversal and a key one letter off, both in the teacher's context: only
learnability tells them apart (R binary: with partial credit R' would pay the teacher to teach the student its
mistakes). Read learnability_pass and update (the teacher), then student_update.
Departures from the sandbox: 4 teacher epochs, not 1 (the clip can bind here); 32 x 8 teacher and 256 student
samples a step, not 12 x 8 and 96; 60 steps, not 300; AdamW (weight decay 0.01: weights shrink 1e-5 a step, 0.24 %
over the 240 teacher steps), not Adam; a group that ties gets exactly 0 and eps is 1e-4, where the sandbox tests
std > 1e-8 and divides by std + 1e-8 (eight float32 0.6s: the mean is one rounding step off, std 6e-8 passes, and
all eight get +0.86); EOS scored and counted in n, each completion's token mean before the batch mean (one length,
no EOS there); the teacher's copy warm-ups and the student's 40-step base (there, two copies of one random init).

Run: uv run minimal_pedagogical.py          (flags: uv run minimal_pedagogical.py --help)
"""
import copy
import random
from dataclasses import dataclass

import torch

import toy_tasks as tt


@dataclass
class Args:
    task: str = "keyed"
    """task: keyed (reversal; the verifier also accepts a per-prompt key), reverse --binary, or add"""
    eval_size: int = 0
    """held-out prompts evaluated, the first of the held-out set (0: every one)"""
    binary: bool = False
    """score reverse by exact match (required with --task reverse: the teacher's reward needs a binary R)"""
    model: str = ""
    """Hugging Face causal LM (hub id or local folder); empty builds the tiny default Llama"""
    warmup_steps: int = -1
    """supervised warm-up steps that make the tiny default a partly competent base model (-1: the task's
    own, 40 for reverse; 0: start from random weights)"""
    teacher_warmup_steps: int = 100
    """supervised steps teaching the teacher (a copy of the base) to copy the first answer in its context"""
    teacher_mix_steps: int = 60
    """further supervised steps that teach it to copy either listed answer, each half the time (one that
    always copied the first would write one string G times: a flat group, nothing to choose)"""
    shared: bool = False
    """one network plays both roles (its copy warm-up moves the student's base too); default: two copies"""
    seed: int = 0
    """seed for weights, prompts and sampling: the same seed prints the same lines on CPU"""
    steps: int = 60
    """steps; each is one teacher update (epochs gradient steps) and one student update"""
    prompts_per_step: int = 32
    """prompts per teacher update"""
    group_size: int = 8
    """teacher completions sampled per prompt (G); the baseline needs at least 2"""
    student_batch: int = 256
    """fresh teacher completions (one per prompt) the student imitates per step"""
    lr: float = 1e-3
    """AdamW learning rate of the teacher"""
    student_lr: float = 1e-3
    """AdamW learning rate of the student"""
    epochs: int = 4
    """inner epochs: teacher gradient steps on each sampled batch (the sandbox takes 1)"""
    clip_eps: float = 0.2
    """PPO clip range: the ratio is clipped to [1 - clip_eps, 1 + clip_eps]"""
    lam: float = 0.5
    """learnability weight lambda in exp(-lam spike) (0: the teacher is rewarded for task success alone)"""
    spike_beta: float = 5.0
    """beta of the spike penalty, a soft maximum of the surprise gaps (the mean gap at 0, the max at inf)"""
    kappa: float = 4.0
    """sharpness of the student's gate sigmoid(kappa (log pi_S - gamma))"""
    gamma: float = -2.5
    """the student's gate is 1/2 at log pi_S = gamma; tokens much less likely than exp(gamma) are ignored"""
    max_grad_norm: float = 1.0
    """gradient-norm clip"""
    max_new_tokens: int = 10
    """token budget per completion; one that never emits EOS is truncated and marked"""
    temperature: float = 1.0
    """the teacher's sampling temperature (its log-probs are taken at the same temperature)"""
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


def surprise_gaps(logp_all, tokens):
    """g_t = max_a log pi_S(a) - log pi_S(y_t): 0 where the student would have written the teacher's
    token itself. logp_all (N, T, V) student log-probs; tokens (N, T) -> gaps (N, T), all >= 0."""
    return logp_all.max(-1).values - logp_all.gather(-1, tokens[..., None]).squeeze(-1)


def spike_penalty(gaps, mask, beta):
    """spike = (logsumexp_t(beta g_t) - log n) / beta over each completion's n real tokens (EOS included,
    padding not: n is the completion's own length). gaps, mask (N, T) -> (N,)."""
    scaled = (beta * gaps).masked_fill(mask == 0, float("-inf"))  # padding adds exp(-inf) = 0
    return (torch.logsumexp(scaled, 1) - torch.log(mask.sum(1))) / beta


def learnability(spike, lam):
    """exp(-lam spike), in (0, 1]: 1 for a completion the student would have written itself."""
    return torch.exp(-lam * spike)


@torch.no_grad()
def learnability_pass(student, view, args):
    """The current student, frozen, scores the teacher's tokens on the *student* view (its own prompt, never
    the context) at temperature 1, no graph, a micro-batch at a time -> learnability, spike, (N,) each."""
    spikes = []
    for rows in tt.micro_batches(view.completion_ids.size(0), args.micro_batch * args.group_size):
        part = view.rows(rows)
        logp_all = tt.completion_logits(student, part, 1.0).log_softmax(-1)  # (n_mb, T, V)
        gaps = surprise_gaps(logp_all, part.completion_ids)  # (n_mb, T)
        spikes.append(spike_penalty(gaps, part.completion_mask, args.spike_beta))
    spike = torch.cat(spikes)  # (N,)
    return learnability(spike, args.lam), spike


def aggregate(per_token, mask, n):
    """Per-sequence token mean (the 1/|y_i| factor), then a sum over the completions given divided by n,
    the whole batch's number of completions: the batch mean, added up micro-batch by micro-batch."""
    return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / n


def policy_loss(logp, old_logp, adv, mask, clip_eps, n):
    """Clipped surrogate with no KL term, and its diagnostics. logp, old_logp, mask: (N, T); adv: (N,);
    n: the batch's completions."""
    ratio = torch.exp(logp - old_logp)  # (N, T); 1 in the first inner epoch
    surrogate = torch.min(ratio * adv[:, None], ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv[:, None])
    per_token = -surrogate  # (N, T)
    d = old_logp - logp  # (N, T) for the k3 drift diagnostic exp(d) - d - 1, as the parent's kl_k3
    # the tokens whose gradient the clip removed (TRL's clip_ratio/region_mean, verl's pg_clipfrac): a
    # ratio outside the band on the side the advantage pushes towards; outside on the other side, the
    # unclipped term is the smaller one and the gradient flows
    clipped = ((ratio > 1 + clip_eps) & (adv[:, None] > 0)) | ((ratio < 1 - clip_eps) & (adv[:, None] < 0))  # (N, T)
    stats = {"ratio": tt.masked_mean(ratio, mask),
             "clip_frac": tt.masked_mean(clipped.float(), mask),
             "kl": tt.masked_mean(torch.exp(d) - d - 1, mask)}  # k3 to the sampler: there is no reference
    return aggregate(per_token, mask, n), {k: v.detach() for k, v in stats.items()}


def update(model, optimizer, rollout, adv, old_logp, step, args):
    """One optimizer step on a sampled batch, its gradient accumulated over micro-batches of whole
    groups; returns the whole batch's loss, diagnostics and entropy, whatever --micro_batch is."""
    n, metrics = len(adv), tt.BatchMetrics(rollout.completion_mask.sum())  # counted before the split
    optimizer.zero_grad()
    for rows in tt.micro_batches(n, args.micro_batch * args.group_size):  # row slices of whole groups
        part = rollout.rows(rows)
        mask = part.completion_mask  # (n_mb, T)
        logp, entropy = tt.token_logprobs(model, part)  # (n_mb, T) each
        loss, stats = policy_loss(logp, old_logp[rows], adv[rows], mask, args.clip_eps, n)
        tt.check_finite(loss, step)
        loss.backward()  # gradients add up over the micro-batches into the whole batch's
        metrics.add(mask, loss, entropy=tt.masked_mean(entropy, mask), **stats)
    stats = metrics.totals()
    stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    optimizer.step()
    loss, entropy = stats.pop("loss"), stats.pop("entropy")
    return loss, stats, entropy


def imitation_gate(logp, kappa, gamma):
    """w_t = sigmoid(kappa (log pi_S(y_t) - gamma)): about 1 for a token the student finds plausible, about 0
    for one it finds surprising. The loss treats it as a constant."""
    return torch.sigmoid(kappa * (logp - gamma))


def imitation_loss(logp, mask, kappa, gamma, n):
    """Surprisal-gated imitation: mean_b [sum_t w_t (-log pi_S(y_t)) / sum_t w_t], each completion normalised
    by its own gate mass, the mean over n, the batch's completions. logp, mask (N, T) -> (loss, mean gate)."""
    gate = imitation_gate(logp.detach(), kappa, gamma) * mask  # (N, T) no gradient through the gate
    per_completion = (gate * -logp).sum(1) / gate.sum(1).clamp(min=1e-8)  # (N,)
    return per_completion.sum() / n, tt.masked_mean(gate, mask)


def student_update(student, optimizer, teacher, tok, task, examples, step, args, device):
    """The student's step: one fresh teacher completion per example (not the batch the teacher was just
    trained on, nor filtered by correctness), imitated on the student view with the gate recomputed under the
    current student, --micro_batch examples at a time. Returns the loss, the mean gate, the tokens sampled."""
    rollout, _ = tt.rollout_groups(teacher, tok, task, examples, 1, args, device, teacher=True)
    view = tt.with_prompts(rollout, tok, [ex.prompt for ex in examples], device)
    n, metrics = len(examples), tt.BatchMetrics(view.completion_mask.sum())  # counted before the split
    optimizer.zero_grad()
    for rows in tt.micro_batches(n, args.micro_batch):  # one completion per example
        part = view.rows(rows)
        logp, _ = tt.token_logprobs(student, part, temperature=1.0)  # (b, T) the student view, temperature 1
        loss, gate = imitation_loss(logp, part.completion_mask, args.kappa, args.gamma, n)
        tt.check_finite(loss, step, "student loss")
        loss.backward()  # gradients add up over the micro-batches into the whole batch's
        metrics.add(part.completion_mask, loss, gate=gate)
    torch.nn.utils.clip_grad_norm_(student.parameters(), args.max_grad_norm)
    optimizer.step()
    totals = metrics.totals()
    return totals["loss"], totals["gate"], int(rollout.lengths.sum())


def check_args(args):
    if args.task in ("gsm8k", "tokrev"):  # tokrev has no context separator, gsm8k no toy two-answer verifier
        tt.fail(f"--task {args.task} is not wired here (no toy context to copy); use keyed, reverse --binary or add")
    tt.check_common_args(args, min_group=2)
    if args.task == "reverse" and not args.binary:
        tt.fail("--task reverse needs --binary: with partial credit R' pays the teacher to teach mistakes")
    if args.epochs < 1:
        tt.fail(f"--epochs must be at least 1, got {args.epochs}")
    if not 0 < args.clip_eps < 1:
        tt.fail(f"--clip_eps must lie strictly between 0 and 1, got {args.clip_eps}")
    if args.student_batch < 1:
        tt.fail(f"--student_batch must be a positive whole number, got {args.student_batch}")
    for name in ("teacher_warmup_steps", "teacher_mix_steps", "lam"):
        if getattr(args, name) < 0:
            tt.fail(f"--{name} must not be negative, got {getattr(args, name)}")
    for name in ("student_lr", "spike_beta", "kappa"):
        if not getattr(args, name) > 0:
            tt.fail(f"--{name} must be positive, got {getattr(args, name)}")


# TRY NOT TO MODIFY: the loop every file shares.


def main():
    args = tt.parse_args(Args)
    check_args(args)
    task, student, tok, device, logger, rng = tt.setup(args)
    teacher = student if args.shared else copy.deepcopy(student)  # two copies of the same base by default
    pick = random.Random(args.seed)  # which listed answer each mixed warm-up example is taught to copy
    tt.supervised_warmup(teacher, tok, task, args.teacher_warmup_steps, args.seed,
                         view=lambda ex: tt.copy_view(task, ex))  # copy the first listed answer
    tt.supervised_warmup(teacher, tok, task, args.teacher_mix_steps, args.seed + 1,
                         view=lambda ex: tt.copy_view(task, ex, pick))  # then either, at random
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=args.lr)
    student_optimizer = torch.optim.AdamW(student.parameters(), lr=args.student_lr)  # its own moments, even --shared
    copy_acc, key_rate = tt.evaluate_teacher(teacher, tok, task, device, args.max_new_tokens)
    logger.info("teacher", copy_acc=copy_acc, key_rate=key_rate)
    mb_rows = args.micro_batch * args.group_size  # rows per forward pass, whole groups (0: the whole batch)
    base_acc, exact, test_extra = tt.evaluate(student, tok, task, device, args.max_new_tokens, mb_rows)
    sampled = tt.sampled_exact(student, tok, task, device, args.max_new_tokens)  # exact, temperature 1
    logger.eval(0, base_acc, exact, **test_extra, sampled_exact=sampled)

    for step in range(1, args.steps + 1):
        examples = task.sample(rng, args.prompts_per_step)
        rollout, rewards = tt.rollout_groups(teacher, tok, task, examples, args.group_size, args, device, teacher=True)
        repeated = [ex for ex in examples for _ in range(args.group_size)]
        view = tt.with_prompts(rollout, tok, [ex.prompt for ex in repeated], device)  # (N, T) student view
        learn, spike = learnability_pass(student, view, args)  # (N,) each
        is_key = tt.is_other_answer(rollout.texts, rewards.view(-1).tolist(), repeated)  # (N,)
        ped_rewards = rewards * learn.view_as(rewards)  # (P, G) R' = R * learnability
        adv = group_advantages(ped_rewards).view(-1)  # (N,) one advantage per completion
        old_logp, _ = tt.score(teacher, rollout, mb_rows)  # (N, T) pi_old, frozen for every epoch
        for epoch in range(args.epochs):  # the ratio and clip fraction logged are the last epoch's
            loss, stats, entropy = update(teacher, optimizer, rollout, adv, old_logp, step, args)
        grad_norm = stats.pop("grad_norm")
        fresh = task.sample(rng, args.student_batch)
        student_loss, gate, student_tokens = student_update(student, student_optimizer, teacher, tok, task,
                                                            fresh, step, args, device)
        logger.step(step, reward=ped_rewards.mean(), loss=loss, entropy=entropy, **stats,
                    grad_norm=grad_norm, len=rollout.lengths.mean(),
                    gen_tokens=int(rollout.lengths.sum()) + student_tokens, task_reward=rewards.mean(),
                    learnability=learn.mean(), spike=spike.mean(), key_rate=is_key.mean(),
                    gate=gate, student_loss=student_loss)
        if (args.eval_every and step % args.eval_every == 0) or step == args.steps:
            test_acc, exact, test_extra = tt.evaluate(student, tok, task, device, args.max_new_tokens, mb_rows)
            sampled = tt.sampled_exact(student, tok, task, device, args.max_new_tokens)
            logger.eval(step, test_acc, exact, **test_extra, sampled_exact=sampled)
    copy_acc, key_rate = tt.evaluate_teacher(teacher, tok, task, device, args.max_new_tokens)
    logger.info("teacher", copy_acc=copy_acc, key_rate=key_rate)
    logger.final(test_acc, exact, base_acc, sampled_exact=sampled)


if __name__ == "__main__":
    main()
