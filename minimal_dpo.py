"""DPO: Direct Preference Optimization, online (pairs from the policy's own samples) or offline.

Papers: Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward
Model", arXiv 2305.18290; Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback",
arXiv 2402.04792 (online DPO: pairs sampled from the current policy at every step).
The same loss at scale: TRL's DPOTrainer (loss_type="sigmoid") and trl.experimental's OnlineDPOTrainer.
Parent: minimal_grpo.py (the frozen reference and the group sampling stay).
The change: no advantage, no ratio, no clip. From each group the best and the worst completion by task
reward form a pair (y_w, y_l); a group whose rewards all tie gives none. With sequence log-probs as token
sums, log pi(y) = sum_t log pi(y_t), and beta = 0.1:

    h    = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))      (the margin)
    loss = -mean_pairs log sigmoid(beta h)          dloss/dh = -beta sigmoid(-beta h) / (pairs)

beta h is the difference of DPO's implicit rewards beta log(pi/pi_ref); the loss is a logistic
regression that the policy wins by ranking the chosen completion above the rejected one *relative to
the reference*. It is satisfied by raising y_w or by lowering y_l: nothing in it says which, and on a
policy that already puts most of its mass on a few answers lowering y_l is the cheap way (nanoRL's
observation; docs/dpo.md measures it). At h = 0 (the first step, pi = pi_ref) its gradient is exactly
beta times a pairwise policy gradient with advantage +1 on y_w and -1 on y_l; away from it each pair is
weighted by sigmoid(-beta h), so pairs already ranked right stop counting: this is what bounds the
update, where GRPO needs a clip.

Online (default): pairs from the current policy at every step. `--offline`: pairs drawn once, before
training, from the base model, and reused: DPO on a fixed preference set. The pool holds one batch per
step by default (the same prompts, the same number of pairs as online: only the sampler differs), or
`--offline_batches` batches cycled through. For offline pairs the sampler is the reference, so the
reference log-probs are cached once and `ratio`, `clip_frac` and `kl` all measure how far the policy has
moved from the pairs' sampler.

One gradient step per batch (--epochs 1), as in Guo et al. and TRL's online trainer, where GRPO takes 4:
nothing in DPO needs a ratio to the sampler, and with nothing to stop it re-fitting the same 32 pairs,
--epochs 4 collapsed the entropy and ended below the base here (docs/dpo.md). So the default learns from
two of each group's eight samples with one step per batch, and is the slowest learner of the GRPO
family: it takes PG's 200 steps, and its tested floor is PG's 0.85 held-out accuracy, not the others' 0.90.
Micro-batches hold whole pairs (--micro_batch prompts = as many pairs, two rows each), and the loss is
divided by the whole batch's number of pairs, counted before the split.

Logged after the shared keys (ratio and clip_frac: to the pairs' sampler, as PG logs them; kl: k3 to the
frozen reference at the pairs' tokens): `chosen_logp` and `rejected_logp`, the mean change of log pi(y_w)
and log pi(y_l) against the reference (sequence sums, nats); `margin`, the mean h; `pref_acc`, the share of
pairs with h > 0 (the implicit reward ranks them right); `pairs`, the share of groups that formed one.
All are measured in the step's forward pass, before its update.

Run: uv run minimal_dpo.py           (flags: uv run minimal_dpo.py --help)
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
    steps: int = 200
    """RL steps; each samples a fresh batch of prompts (PG's 200: one step per batch of two samples in eight)"""
    prompts_per_step: int = 32
    """prompts per step"""
    group_size: int = 8
    """completions sampled per prompt (G); its best and worst form the pair, so at least 2"""
    lr: float = 1e-3
    """AdamW learning rate"""
    epochs: int = 1
    """inner epochs: gradient steps on each batch of pairs (Guo et al. and TRL's online trainer take 1)"""
    beta: float = 0.1
    """DPO's beta: the scale of the implicit reward beta log(pi/pi_ref) (larger: stay closer to the reference)"""
    offline: bool = False
    """draw the pairs once from the base model before training and reuse them (offline DPO on a fixed set)"""
    offline_batches: int = 0
    """with --offline, batches of pairs drawn before training and cycled through (0: one per step)"""
    max_grad_norm: float = 1.0
    """gradient-norm clip"""
    max_new_tokens: int = -1
    """token budget per completion, cut off without EOS (-1: the task's own, 10 for the toys, 256 for gsm8k)"""
    temperature: float = 1.0
    """sampling temperature; pi and pi_ref are scored at 1, as in TRL (the logged entropy is at this one)"""
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


def make_pairs(rewards):
    """Best against worst. rewards (P, G) -> (chosen, rejected, formed): the rows, in the flattened (P * G)
    batch, of each group's first completion with the highest reward and first with the lowest (ties go to
    the earliest sample), for the groups that formed a pair; formed (P,) bool is False where all tie."""
    offset = torch.arange(rewards.size(0), device=rewards.device) * rewards.size(1)  # (P,) first row of each group
    formed = rewards.max(1).values > rewards.min(1).values  # (P,) a flat group says nothing about preference
    chosen, rejected = offset + rewards.argmax(1), offset + rewards.argmin(1)  # torch: first index of max / min
    return chosen[formed], rejected[formed], formed


def pair_rows(rollout, chosen, rejected):
    """The pairs as a smaller Rollout, chosen and rejected interleaved: rows 2k and 2k + 1 are pair k, so a
    row slice of even length holds whole pairs."""
    idx = torch.stack([chosen, rejected], 1).view(-1)  # (2K,)
    r = rollout
    return tt.Rollout(r.prompt_ids[idx], r.prompt_mask[idx], r.completion_ids[idx], r.completion_mask[idx],
                      r.truncated[idx], [r.texts[i] for i in idx.tolist()], r.temperature)


def kl_k3(logp, ref_logp):
    """Schulman's k3 estimator of KL(pi || ref) at the sampled tokens: exp(d) - d - 1, d = ref - pi."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def sequence_logratios(logp, ref_logp, mask):
    """log pi(y) - log pi_ref(y) of each completion, token sums: (2K, T) -> (K, 2), [:, 0] chosen, [:, 1] rejected."""
    return ((logp - ref_logp) * mask).sum(1).view(-1, 2)


def dpo_loss(margin, beta, n):
    """-log sigmoid(beta h) summed over the pairs given, divided by n, the whole batch's number of pairs
    (the batch mean, added up micro-batch by micro-batch). margin: (K,) h, the chosen's log-ratio minus the
    rejected's."""
    return -torch.nn.functional.logsigmoid(beta * margin).sum() / n


def pref_acc(margin):
    """Share of pairs the implicit reward ranks right, h > 0 strictly (a tie, as at pi = pi_ref, is not)."""
    return (margin > 0).float().mean()


def policy_loss(logp, old_logp, ref_logp, mask, beta, n):
    """DPO loss, its diagnostics and each pair's log-ratios. logp, old_logp, ref_logp, mask: (2K, T), rows 2k
    and 2k + 1 chosen and rejected; n: the batch's pairs."""
    ratio = torch.exp(logp - old_logp)  # (2K, T) to the pairs' sampler; 1 online, in the first epoch
    logratios = sequence_logratios(logp, ref_logp, mask)  # (K, 2)
    stats = {"ratio": tt.masked_mean(ratio, mask),
             "clip_frac": tt.masked_mean(((ratio - 1).abs() > 0.2).float(), mask),  # no clip: drift past +-0.2
             "kl": tt.masked_mean(kl_k3(logp, ref_logp), mask)}  # k3 to the frozen reference, at the pairs' tokens
    margin = logratios[:, 0] - logratios[:, 1]  # (K,)
    return dpo_loss(margin, beta, n), {k: v.detach() for k, v in stats.items()}, logratios.detach()


def pair_metrics(logratios):
    """chosen_logp, rejected_logp, margin, pref_acc over the batch's pairs, from their (K, 2) log-ratios."""
    margin = logratios[:, 0] - logratios[:, 1]
    return {"chosen_logp": logratios[:, 0].mean(), "rejected_logp": logratios[:, 1].mean(),
            "margin": margin.mean(), "pref_acc": pref_acc(margin)}


def update(model, optimizer, pairs, old_logp, ref_logp, step, args):
    """One optimizer step on a batch of pairs, its gradient accumulated over micro-batches of whole
    pairs; returns the whole batch's loss, diagnostics, entropy and pair metrics, whatever --micro_batch is."""
    n, metrics = pairs.completion_ids.size(0) // 2, tt.BatchMetrics(pairs.completion_mask.sum())  # counted before the split
    if n == 0:  # every group tied: no pair, nothing to prefer, so no optimizer step at all (AdamW would
        zero = torch.tensor(0.0)  # still move the weights: momentum and weight decay); logged as 0, pairs=0 says why
        return zero, {"ratio": zero + 1, "clip_frac": zero, "kl": zero, "grad_norm": zero}, zero, \
            {"chosen_logp": zero, "rejected_logp": zero, "margin": zero, "pref_acc": zero}
    optimizer.zero_grad()
    logratios = []
    for rows in tt.micro_batches(2 * n, args.micro_batch * 2):  # row slices of whole pairs, one per prompt
        part = pairs.rows(rows)
        mask = part.completion_mask  # (n_mb, T)
        logits = tt.completion_logits(model, part, 1.0)  # (n_mb, T, V) scored at temperature 1, as TRL scores
        logp = logits.log_softmax(-1).gather(-1, part.completion_ids[..., None]).squeeze(-1)  # (n_mb, T)
        entropy = tt.entropy_from_logprobs((logits.detach() / part.temperature).log_softmax(-1))  # as sampled
        loss, stats, part_logratios = policy_loss(logp, old_logp[rows], ref_logp[rows], mask, args.beta, n)
        tt.check_finite(loss, step)
        loss.backward()  # gradients add up over the micro-batches into the whole batch's
        metrics.add(mask, loss, entropy=tt.masked_mean(entropy, mask), **stats)
        logratios.append(part_logratios)
    stats = metrics.totals()
    stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    optimizer.step()
    loss, entropy = stats.pop("loss"), stats.pop("entropy")
    return loss, stats, entropy, pair_metrics(torch.cat(logratios))


def sample_pairs(sampler, ref_model, tok, task, examples, args, device):
    """Sample G completions per prompt from `sampler`, pair each group's best and worst, and score the
    pairs under the reference: (pairs, rewards (P, G), ref_logp (2K, T), formed (P,), generated tokens)."""
    rollout, rewards = tt.rollout_groups(sampler, tok, task, examples, args.group_size, args, device)
    chosen, rejected, formed = make_pairs(rewards)
    pairs = pair_rows(rollout, chosen, rejected)
    ref_logp = tt.score(ref_model, pairs, args.micro_batch * 2, 1.0)[0] if formed.any() else pairs.completion_mask
    return pairs, rewards, ref_logp, formed, int(rollout.lengths.sum())


def check_args(args):
    tt.check_common_args(args, min_group=2)
    if args.epochs < 1:
        tt.fail(f"--epochs must be at least 1, got {args.epochs}")
    if not args.beta > 0:
        tt.fail(f"--beta must be positive (DPO's implicit reward is beta log(pi/pi_ref)), got {args.beta}")
    if args.offline_batches < 0 or (args.offline_batches and not args.offline):
        tt.fail(f"--offline_batches must be 0 or more, and needs --offline, got {args.offline_batches}")


# TRY NOT TO MODIFY: the loop every file shares.


def main():
    args = tt.parse_args(Args)
    check_args(args)
    task, model, tok, device, logger, rng = tt.setup(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)  # the frozen base: pi_ref of the implicit reward
    mb_rows = args.micro_batch * args.group_size  # rows per forward pass, whole groups (0: the whole batch)
    mb_pairs = args.micro_batch * 2  # rows per forward pass over pairs, whole pairs
    if args.offline:  # a fixed preference set: pairs from the base model, drawn once, before training
        pool = [sample_pairs(ref_model, ref_model, tok, task, task.sample(rng, args.prompts_per_step), args, device)
                for _ in range(args.offline_batches or args.steps)]
        if not any(batch[3].any() for batch in pool):
            tt.fail("--offline: every group the base model sampled tied, so there is nothing to pair; drop "
                    "--offline, or raise --group_size or --offline_batches")
        logger.info("offline", batches=len(pool), pairs=torch.cat([b[3] for b in pool]).float().mean(),
                    reward=torch.stack([b[1].mean() for b in pool]).mean(), gen_tokens=sum(b[4] for b in pool))

    base_acc, exact, test_extra = tt.evaluate(model, tok, task, device, args.max_new_tokens, mb_rows)
    logger.eval(0, base_acc, exact, **test_extra)

    for step in range(1, args.steps + 1):
        if args.offline:  # the pairs' sampler is the reference: old_logp is ref_logp, cached
            pairs, rewards, ref_logp, formed, _ = pool[(step - 1) % len(pool)]
            old_logp, gen_tokens = ref_logp, 0
        else:  # online: fresh pairs from the current policy
            examples = task.sample(rng, args.prompts_per_step)
            pairs, rewards, ref_logp, formed, gen_tokens = sample_pairs(model, ref_model, tok, task, examples, args, device)
            old_logp = tt.score(model, pairs, mb_pairs, 1.0)[0] if formed.any() else ref_logp  # (2K, T) pi_old, frozen for every epoch
        for epoch in range(args.epochs):  # the ratio logged is the last epoch's; the pair metrics are its forward pass's
            loss, stats, entropy, prefs = update(model, optimizer, pairs, old_logp, ref_logp, step, args)
        grad_norm = stats.pop("grad_norm")
        logger.step(step, reward=rewards.mean(), loss=loss, entropy=entropy, **stats,
                    grad_norm=grad_norm, len=pairs.lengths.sum() / max(len(pairs.texts), 1), gen_tokens=gen_tokens, **prefs,
                    pairs=formed.float().mean(), **task.extra_metrics(pairs.texts))
        if (args.eval_every and step % args.eval_every == 0) or step == args.steps:
            test_acc, exact, test_extra = tt.evaluate(model, tok, task, device, args.max_new_tokens, mb_rows)
            logger.eval(step, test_acc, exact, **test_extra)
    logger.final(test_acc, exact, base_acc)


if __name__ == "__main__":
    main()
