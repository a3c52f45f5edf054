"""DAPO: Decoupled Clip and Dynamic sAmpling Policy Optimization, GRPO with four fixes for long runs.

Paper: Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", arXiv 2503.14476
(reference code: verl recipe/dapo; TRL covers three of the four with loss_type="dapo", epsilon_high=0.28,
beta=0 and the reward trl.rewards.get_soft_overlong_punishment, but has no dynamic sampling).
Parent: minimal_grpo.py.
The change: four techniques on GRPO's clipped surrogate, with the KL term and the reference model gone.

  1. Clip-higher: clip(rho, 1 - eps_low, 1 + eps_high), eps_high = 0.28 > eps_low = 0.2. A symmetric
     clip stops pushing a token once its probability has grown by 20% on this batch: a rare token
     (pi_old = 0.01) gets no push past 0.012 while a likely one (0.9) may go to 1.08, so exploration
     dies and entropy collapses. More room upwards keeps rare tokens alive.
  2. Dynamic sampling: a group whose task rewards are all equal has advantage 0 for every completion,
     so it only shrinks the batch. Drop such groups and sample fresh rounds of prompts_per_step prompts
     until prompts_per_step informative groups are in hand, for at most --max_rounds rounds.
  3. Token-level loss: one mean over every token of the batch. GRPO's per-completion mean gives a
     token of a long completion less weight than one of a short completion (1/|y_i|).
  4. Overlong reward shaping: a length penalty R_len, added to the task reward before the advantage.

    R_i   = r_i + R_len(|y_i|),   A_i = (R_i - mean(R)) / (std(R) + 1e-4)     (GRPO's advantage)
    J_i,t = min(rho A_i, clip(rho, 1-eps_low, 1+eps_high) A_i)
    loss  = -(sum_i sum_t J_i,t) / (sum_i |y_i|)          (token mean over the whole batch)
    R_len = 0 if |y| <= L_max - L_cache;  ((L_max - L_cache) - |y|) / L_cache up to L_max;  -1 beyond

Toy choices and departures from the paper, each deliberate:
- L_max is the generation budget --max_new_tokens (10), as in the paper (20480 = 16384 + a 4096 cache)
  and in verl (max_response_length). L_cache = 3 puts the ramp on 8, 9 and 10 tokens: just past the
  longest correct answer (6 characters + EOS = 7 tokens), so only rambling is penalised, and the base
  model rambles often enough that the ramp is hit from step 1 (the log's `overlong` share). |y|
  counts the EOS. A truncated completion (no EOS within the budget) has |y| = L_max and so gets -1,
  the bottom of the ramp, as in verl; the "beyond L_max" branch cannot fire here, but is kept.
- The paper's task reward is +1 or -1; the toy keeps its [0, 1] per-character reward, so the -1 at
  the budget outweighs any task reward.
- Groups are filtered on the task reward before shaping (verl: filter_groups.metric=acc).
- If --max_rounds is reached the step trains on the groups it kept (the log shows rounds=max_rounds);
  verl raises an error instead. With none kept at all, the run stops with an error.
- 4 full-batch inner epochs per batch, inherited from minimal_grpo.py (the paper takes 16 mini-batch
  steps per batch).
- 70 steps by default, not GRPO's 100. Dynamic sampling gets expensive as the policy improves: once
  most groups are all right, a step needs 8 to 10 rounds to find 32 informative groups (timings:
  docs/dapo.md).
- Logged `reward` is the mean task reward over every group sampled in the step (so it compares with
  the other files); `kept` is the share of sampled groups that were informative, `rounds` the rounds
  used, `overlong` the share of trained completions with R_len < 0; the other metrics are over the
  trained batch.

Run: uv run minimal_dapo.py          (flags: uv run minimal_dapo.py --help)
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
    steps: int = 70
    """RL steps; each samples fresh prompts (70, not GRPO's 100: late steps sample up to 10 rounds)"""
    prompts_per_step: int = 32
    """informative groups trained on per step (dynamic sampling), and prompts per sampling round"""
    group_size: int = 8
    """completions sampled per prompt (G); the baseline needs at least 2"""
    lr: float = 1e-3
    """AdamW learning rate"""
    epochs: int = 4
    """inner epochs: gradient steps on each sampled batch (the paper takes 16 mini-batch steps)"""
    clip_eps: float = 0.2
    """lower clip range eps_low: the ratio is clipped to [1 - clip_eps, 1 + clip_eps_high]"""
    clip_eps_high: float = 0.28
    """upper clip range eps_high (clip-higher); equal to --clip_eps gives GRPO's symmetric clip"""
    max_rounds: int = 10
    """dynamic sampling: most sampling rounds per step (verl's max_num_gen_batches)"""
    overlong_cache: int = 3
    """L_cache: the length penalty ramps from 0 to -1 over the last L_cache tokens of the budget L_max"""
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


def overlong_penalty(lengths, max_len, cache):
    """Soft overlong punishment R_len: 0 up to L_max - L_cache tokens, then a straight line down to -1
    at L_max, and -1 beyond. lengths (N,) in tokens, EOS included -> penalties (N,), all <= 0."""
    ramp = ((max_len - cache) - lengths) / cache  # (N,) > 0 before the ramp, -1 at exactly L_max
    return torch.where(lengths > max_len, torch.full_like(ramp, -1.0), ramp.clamp(max=0))


def kl_k3(logp, ref_logp):
    """Schulman's k3 estimator of KL(pi || ref) at the sampled tokens: exp(d) - d - 1, d = ref - pi."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def aggregate(per_token, mask, tokens):
    """Token mean over the whole batch: every token of every completion given, summed, divided by
    `tokens`, the whole batch's token count (counted once before the batch is split into micro-batches:
    each micro-batch's own count would give its tokens a weight that depends on how the batch was cut)."""
    return (per_token * mask).sum() / tokens


def policy_loss(logp, old_logp, adv, mask, clip_eps, clip_eps_high, tokens):
    """Clipped surrogate with a higher upper edge and no KL term, and its diagnostics.
    logp, old_logp, mask: (N, T); adv: (N,); tokens: the batch's completion tokens."""
    ratio = torch.exp(logp - old_logp)  # (N, T); 1 in the first inner epoch
    clamped = ratio.clamp(1 - clip_eps, 1 + clip_eps_high)  # (N, T) asymmetric: room to raise a token
    surrogate = torch.min(ratio * adv[:, None], clamped * adv[:, None])  # (N, T)
    per_token = -surrogate  # (N, T)
    # the tokens whose gradient the clip removed (TRL's clip_ratio/region_mean, verl's pg_clipfrac): a
    # ratio outside the band on the side the advantage pushes towards; outside on the other side, the
    # unclipped term is the smaller one and the gradient flows
    clipped = (((ratio > 1 + clip_eps_high) & (adv[:, None] > 0))
               | ((ratio < 1 - clip_eps) & (adv[:, None] < 0)))  # (N, T)
    stats = {"ratio": tt.masked_mean(ratio, mask),
             "clip_frac": tt.masked_mean(clipped.float(), mask),
             "kl": tt.masked_mean(kl_k3(logp, old_logp), mask)}  # k3 to the sampler: there is no reference
    return aggregate(per_token, mask, tokens), {k: v.detach() for k, v in stats.items()}


def update(model, optimizer, rollout, adv, old_logp, step, args):
    """One optimizer step on a sampled batch, its gradient accumulated over micro-batches of whole
    groups; returns the whole batch's loss, diagnostics and entropy, whatever --micro_batch is."""
    tokens = rollout.completion_mask.sum().clamp(min=1)  # the normaliser, counted before the split
    n, metrics = len(adv), tt.BatchMetrics(tokens)
    optimizer.zero_grad()
    for rows in tt.micro_batches(n, args.micro_batch * args.group_size):  # row slices of whole groups
        part = rollout.rows(rows)
        mask = part.completion_mask  # (n_mb, T)
        logp, entropy = tt.token_logprobs(model, part)  # (n_mb, T) each
        loss, stats = policy_loss(logp, old_logp[rows], adv[rows], mask, args.clip_eps, args.clip_eps_high,
                                  tokens)
        tt.check_finite(loss, step)
        loss.backward()  # gradients add up over the micro-batches into the whole batch's
        metrics.add(mask, loss, entropy=tt.masked_mean(entropy, mask), **stats)
    stats = metrics.totals()
    stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    optimizer.step()
    loss, entropy = stats.pop("loss"), stats.pop("entropy")
    return loss, stats, entropy


def informative_groups(rewards):
    """Dynamic sampling's filter: True for a group whose rewards are not all equal (all right or all
    equally wrong gives every completion advantage 0). rewards (P, G) -> keep (P,) bool."""
    return rewards.max(1).values > rewards.min(1).values


def cat_rollouts(parts, pad_id):
    """Stack Rollouts sampled separately (their widths may differ): prompts stay left-padded,
    completions right-padded, and the new padding is masked out like the old."""
    pad = torch.nn.functional.pad
    p, t = max(r.prompt_ids.size(1) for r in parts), max(r.completion_ids.size(1) for r in parts)
    return tt.Rollout(torch.cat([pad(r.prompt_ids, (p - r.prompt_ids.size(1), 0), value=pad_id) for r in parts]),
                      torch.cat([pad(r.prompt_mask, (p - r.prompt_mask.size(1), 0)) for r in parts]),
                      torch.cat([pad(r.completion_ids, (0, t - r.completion_ids.size(1)), value=pad_id) for r in parts]),
                      torch.cat([pad(r.completion_mask, (0, t - r.completion_mask.size(1))) for r in parts]),
                      torch.cat([r.truncated for r in parts]), [x for r in parts for x in r.texts],
                      parts[0].temperature)


def dynamic_sample(model, tok, task, rng, step, args, device):
    """Sample rounds of prompts_per_step fresh prompts and keep the informative groups, until
    prompts_per_step are kept or max_rounds rounds are spent. Returns the Rollout and task rewards (K, G)
    of the first K <= prompts_per_step kept groups, and the sampling statistics for the log."""
    parts, kept, sampled, reward_sum, gen_tokens = [], 0, 0, 0.0, 0.0
    for rounds in range(1, args.max_rounds + 1):
        examples = task.sample(rng, args.prompts_per_step)
        rollout, rewards = tt.rollout_groups(model, tok, task, examples, args.group_size, args, device)
        keep = informative_groups(rewards)  # (P,) bool; a group is group_size consecutive rows
        parts.append((rollout.select(keep.repeat_interleave(args.group_size)), rewards[keep]))
        kept, sampled = kept + int(keep.sum()), sampled + len(examples)
        reward_sum += rewards.sum()  # every sampled group counts towards the logged reward
        gen_tokens += rollout.lengths.sum()  # and every sampled token towards the generation cost
        if kept >= args.prompts_per_step:
            break
    if kept == 0:
        tt.fail(f"dynamic sampling found no group with unequal rewards in --max_rounds {args.max_rounds} "
                f"rounds at step {step}; raise --max_rounds or --temperature")
    # rounds differ in prompt and completion width: cat_rollouts pads them to one width, masked out
    rollout = cat_rollouts([r for r, _ in parts], tok.pad_token_id)
    rewards = torch.cat([r for _, r in parts])  # (K', G) every kept group, in sampling order
    first = torch.arange(kept, device=rewards.device) < args.prompts_per_step  # (K',) drop the surplus
    rollout, rewards = rollout.select(first.repeat_interleave(args.group_size)), rewards[first]  # K groups
    return rollout, rewards, {"reward": reward_sum / (sampled * args.group_size), "kept": kept / sampled,
                              "rounds": rounds, "gen_tokens": gen_tokens}


def check_args(args):
    tt.check_common_args(args, min_group=2)
    if args.epochs < 1:
        tt.fail(f"--epochs must be at least 1, got {args.epochs}")
    if not 0 < args.clip_eps < 1:
        tt.fail(f"--clip_eps must lie strictly between 0 and 1, got {args.clip_eps}")
    if not args.clip_eps_high >= args.clip_eps:
        tt.fail(f"--clip_eps_high must be at least --clip_eps ({args.clip_eps}), got {args.clip_eps_high}")
    if args.max_rounds < 1:
        tt.fail(f"--max_rounds must be at least 1, got {args.max_rounds}")
    if not 1 <= args.overlong_cache < args.max_new_tokens:
        tt.fail(f"--overlong_cache must be at least 1 and below --max_new_tokens ({args.max_new_tokens}), "
                f"got {args.overlong_cache}")


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
        rollout, rewards, sampling = dynamic_sample(model, tok, task, rng, step, args, device)
        penalty = overlong_penalty(rollout.lengths, args.max_new_tokens, args.overlong_cache)  # (N,) <= 0
        adv = group_advantages(rewards + penalty.view_as(rewards)).view(-1)  # (N,) one per completion
        old_logp, _ = tt.score(model, rollout, mb_rows)  # (N, T) pi_old, frozen for every epoch
        for epoch in range(args.epochs):  # the ratio and clip fraction logged are the last epoch's
            loss, stats, entropy = update(model, optimizer, rollout, adv, old_logp, step, args)
        grad_norm = stats.pop("grad_norm")
        logger.step(step, reward=sampling["reward"], loss=loss, entropy=entropy, **stats,
                    grad_norm=grad_norm, len=rollout.lengths.mean(), gen_tokens=int(sampling["gen_tokens"]),
                    len_wrong=tt.mean_length_wrong(rollout, rewards), kept=sampling["kept"],
                    rounds=sampling["rounds"], overlong=(penalty < 0).float().mean(),
                    **task.extra_metrics(rollout.texts))
        if (args.eval_every and step % args.eval_every == 0) or step == args.steps:
            test_acc, exact, test_extra = tt.evaluate(model, tok, task, device, args.max_new_tokens, mb_rows)
            logger.eval(step, test_acc, exact, **test_extra)
    logger.final(test_acc, exact, base_acc)


if __name__ == "__main__":
    main()
