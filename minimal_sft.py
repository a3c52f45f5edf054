"""Supervised fine-tuning (SFT): imitate a target with weight 1, the baseline every RL method is measured against.

Papers: SFT on demonstrations is the first stage of every post-training recipe (Ouyang et al. 2022,
arXiv 2203.02155). `--source best` is online rejection sampling, one correct sample per prompt: closest to
RFT (Yuan et al. 2023, arXiv 2308.01825), which samples k paths per question once from the SFT model and
keeps every distinct correct one, where this file keeps the first fully right of G and samples afresh from
the current policy for every step. RAFT (Dong et al. 2023, arXiv 2304.06767) keeps each prompt's top-reward
sample whatever its reward, where this file keeps it only at reward 1. STaR (Zelikman et al. 2022, arXiv
2203.14465) keeps correct rationales and fine-tunes from the base after each round; here nothing restarts.
The same loss at scale: TRL's SFTTrainer with completion_only_loss, verl's fsdp_sft_trainer.
Parent: minimal_pg.py.
The change: the completion trained on is not sampled and weighted by an advantage; it is a target y*
with weight 1, and the loss is the token-mean negative log-likelihood over the whole batch's targets:

    loss = -sum_i sum_t log pi(y*_i,t) / sum_i |y*_i|      (token mean over the batch, EOS included)

`--source demo` (default): y* is the task's reference answer, as in nanoRL's minimal_sft.py. Nothing is
sampled (gen_tokens=0). The supervised warm-up that makes every file's base model *is* this method,
run for fewer steps (40 on reverse, batch 64, lr 3e-3): SFT here continues it with this file's settings.
`--source best`: sample G completions per prompt and imitate the first completion with the group's
highest reward, only when that reward is 1 (fully right); a prompt with none is skipped, and a step
where every prompt is skipped takes no optimizer step at all (AdamW would still move the weights).
PG with a binary reward differs in one sentence: it weights a right completion by
A = G/(G-1) (1 - p) (p the group's success rate, so a prompt already solved teaches nothing) and pushes
every wrong one down by G/(G-1) p, where best-of-group SFT imitates one right completion with weight 1
whatever p, and never says what not to do.

Why a token mean over the whole batch, not a mean of per-sequence means: it is what TRL's SFTTrainer
computes (transformers divides the summed token losses by the number of label tokens in the whole,
gradient-accumulated batch) and what the warm-up computes; a longer target weighs more, one token one
vote. The count is taken before the batch is cut into micro-batches, so they add up exactly (verl's
fsdp_sft_trainer averages per-micro-batch token means instead, which weighs a short micro-batch more).

The shared columns keep their meaning: one step per batch, so ratio = 1, clip_frac = 0 and kl = 0 (k3 to
the policy before the step) as PG logs them; `reward` is the reward of what the step trained on (1 by
construction: a reference answer, or a fully right sample), and `len` its length. Then `nll` (the
token-mean NLL, equal to `loss` here: the number SFT papers report), and with --source best
`sampled_reward` (the sampled groups' mean reward, PG's `reward`) and `kept` (share of prompts imitated).

How to read this file: as minimal_pg.py. `diff minimal_pg.py minimal_sft.py` is the lesson.

Run: uv run minimal_sft.py           (flags: uv run minimal_sft.py --help)
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
    """training steps; each draws a fresh batch of prompts"""
    prompts_per_step: int = 32
    """prompts per step"""
    group_size: int = 8
    """completions sampled per prompt (G) with --source best; --source demo samples none"""
    source: str = "demo"
    """what to imitate: demo (the task's reference answer) or best (each prompt's best sampled completion,
    when it is fully right: rejection-sampling fine-tuning)"""
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


def best_of_group(rewards):
    """Rejection sampling. rewards (P, G) -> keep (P, G) bool: in each row the first completion with the
    row's highest reward (ties go to the earliest sample), kept only when that reward is 1, fully right."""
    best = rewards.argmax(1)  # (P,) torch returns the first index of the maximum
    keep = torch.zeros_like(rewards, dtype=torch.bool)
    keep[torch.arange(rewards.size(0)), best] = True
    return keep & (rewards == 1)  # char_accuracy is n/n = 1.0 exactly for a right answer


def demo_rollout(tok, task, examples, device):
    """The reference answers as a Rollout, as if sampled: each prompt, then its answer and EOS (the warm-up
    builds the same batch). Not sampled, so scored at temperature 1."""
    prompt_ids, prompt_mask = tt.encode(tok, [ex.prompt for ex in examples], device)
    eos = tok.eos_token if task.ends_with_eos else ""
    answers = tok([ex.answer + eos for ex in examples], add_special_tokens=False, padding=True,
                  padding_side="right", return_tensors="pt").to(device)
    truncated = torch.zeros(len(examples), dtype=torch.bool, device=device)
    return tt.Rollout(prompt_ids, prompt_mask, answers.input_ids, answers.attention_mask.float(), truncated,
                      [ex.answer for ex in examples])


def kl_k3(logp, ref_logp):
    """Schulman's k3 estimator of KL(pi || ref) at the sampled tokens: exp(d) - d - 1, d = ref - pi."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def aggregate(per_token, mask, tokens):
    """Token mean over the whole batch: the sum over every target token given, divided by `tokens`, the
    whole batch's target tokens counted before the split, so micro-batch losses add up to the batch's
    (each micro-batch's own token mean would weigh a micro-batch of short targets more)."""
    return (per_token * mask).sum() / tokens


def sft_loss(logp, old_logp, mask, tokens):
    """Token-mean NLL and its diagnostics. logp, old_logp, mask: (N, T); tokens: the batch's target tokens."""
    ratio = torch.exp(logp - old_logp)  # (N, T); 1 exactly: one update per batch
    per_token = -logp  # (N, T) weight 1 on every target token: no advantage
    stats = {"ratio": tt.masked_mean(ratio, mask),
             "clip_frac": tt.masked_mean(((ratio - 1).abs() > 0.2).float(), mask),  # no clip: drift past +-0.2
             "kl": tt.masked_mean(kl_k3(logp, old_logp), mask)}  # k3 to the policy before the step
    return aggregate(per_token, mask, tokens), {k: v.detach() for k, v in stats.items()}


def update(model, optimizer, rollout, step, args):
    """One optimizer step on the batch's targets, its gradient accumulated over micro-batches of targets;
    returns the whole batch's loss, diagnostics and entropy, whatever --micro_batch is."""
    n, metrics = rollout.completion_ids.size(0), tt.BatchMetrics(rollout.completion_mask.sum())  # counted before the split
    if n == 0:  # no prompt had a fully right completion: nothing to imitate, so no optimizer step at all (AdamW
        zero = torch.tensor(0.0)  # would still move the weights: momentum and weight decay); logged as 0, kept=0 says why
        return zero, {"ratio": zero + 1, "clip_frac": zero, "kl": zero, "grad_norm": zero}, zero
    optimizer.zero_grad()
    for rows in tt.micro_batches(n, args.micro_batch):  # one target per prompt: rows are prompts
        part = rollout.rows(rows)
        mask = part.completion_mask  # (n_mb, T)
        logp, entropy = tt.token_logprobs(model, part)  # (n_mb, T) each
        loss, stats = sft_loss(logp, logp.detach(), mask, metrics.tokens)
        tt.check_finite(loss, step)
        loss.backward()  # gradients add up over the micro-batches into the whole batch's
        metrics.add(mask, loss, entropy=tt.masked_mean(entropy, mask), **stats)
    stats = metrics.totals()
    stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    optimizer.step()
    loss, entropy = stats.pop("loss"), stats.pop("entropy")
    return loss, stats, entropy


def check_args(args):
    tt.check_common_args(args, min_group=1)
    if args.source not in ("demo", "best"):
        tt.fail(f"--source {args.source!r} is unknown; choose demo (the reference answers) or best (each "
                "prompt's best sampled completion, when fully right)")


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
        if args.source == "demo":  # the reference answers: reward 1, nothing sampled
            rollout, rewards, extra = demo_rollout(tok, task, examples, device), torch.ones(len(examples)), {}
        else:  # sample the groups, imitate each prompt's best completion when it is fully right
            sampled, group_rewards = tt.rollout_groups(model, tok, task, examples, args.group_size, args, device)
            keep = best_of_group(group_rewards).view(-1)  # (N,) at most one per prompt
            rollout, rewards = sampled.select(keep), group_rewards.view(-1)[keep]
            extra = {"sampled_reward": group_rewards.mean(), "kept": keep.sum() / len(examples)}
        loss, stats, entropy = update(model, optimizer, rollout, step, args)
        grad_norm = stats.pop("grad_norm")
        gen_tokens = int(sampled.lengths.sum()) if args.source == "best" else 0
        n = max(len(rewards), 1)  # what the step trained on; none (kept=0) logs 0
        logger.step(step, reward=rewards.sum() / n, loss=loss, entropy=entropy, **stats,
                    grad_norm=grad_norm, len=rollout.lengths.sum() / n, gen_tokens=gen_tokens, nll=loss, **extra,
                    **task.extra_metrics(rollout.texts))
        if (args.eval_every and step % args.eval_every == 0) or step == args.steps:
            test_acc, exact, test_extra = tt.evaluate(model, tok, task, device, args.max_new_tokens, mb_rows)
            logger.eval(step, test_acc, exact, **test_extra)
    logger.final(test_acc, exact, base_acc)


if __name__ == "__main__":
    main()
