"""VPO: Vector Policy Optimization. Train one completion to hold a set of answers that covers a trade-off.

Paper: Bahlous-Boldi et al. 2026, "Vector Policy Optimization: Training for Diversity Improves Test-Time
Search", arXiv 2605.22817 (reference code: ryanboldi/vpo, vpo/utils/vpo.py::vpo_advantage).
Parent: minimal_grpo.py.
The change: the reward is a vector and each completion holds m answers, "a1|a2|a3"; its advantage is
the group z-score of the best of its own answers under a random weighting, averaged over weightings:

    R_i   = (m, k) rewards of completion i, one row per answer (blank, copied or cut-off: a zero row)
    w_j   ~ Dirichlet(1, ..., 1), j = 1..N, N = 100, drawn once per group and shared by its completions
    s_i   = (1/N) sum_j max_a w_j . R_i[a]       (max over its own answers inside, mean over w outside)
    A_i   = (s_i - mean(s)) / (std(s) + 1e-4)    (GRPO's group z-score, exactly 0 on a flat group)

A_i goes on every token of completion i, separators included; the clipped update is GRPO's. Sharing
the draws within a group compares its completions on the same w (common random numbers).
The toy: reverse, each answer t scored (quality, brevity) = (char_accuracy(t, reverse(s)), 1 - min(|t|/n,
1)^2). A correct prefix of x n characters scores (x, 1 - x^2), a concave front: no answer is best for
every weighting, and each weighting prefers its own length (n = 4, under w_gold = (0.5, 0.5)):

    prefix length j       1              2              3              4
    (quality, brevity)    (.25, .94)     (.50, .75)     (.75, .44)     (1, 0)
    w_gold score          .594           .625 (best)    .594           .500
One answer is best at the half prefix (0.625 under w_gold, 0.5 under w = (1, 0)); a set can hold several
points of the front: "d|db|dbac" scores E_w max 0.765 at n = 4, and 1.0 under (1, 0). Ideal policies on
the test strings (n = 3..6) reach E_w best@3 0.725 (VPO: one character | half | all), 0.688 (sum: three
lengths near the middle) and 0.621 (m = 1); under w_gold all three are within 0.01 of 0.62 at k >= 3.
Baselines, flags on the same base and evaluation: --set_score sum (the repo's Multi-RLVR: the w_gold
scores of the distinct answers added), --set_score max (the best answer under w_gold), --m 1 --set_score
max (GRPO on w_gold . r) and --m 1 (GRPO on one random weighting per group). The base: 70 warm-up steps,
half of each batch "cabd=" -> "dbac", half "|cabd=" -> "dbac|dbac|dbac" (collapsed sets, like an LLM
repeating itself); plain-format greedy accuracy 0.556 / 0.596 / 0.740, seeds 0-2 (reverse's: .577 / .649 / .561).

test_acc is not a per-character accuracy: per test prompt, 9 answers are pooled from completions sampled
at temperature 0.7 (3 for m = 3, 9 for m = 1: k counts answers, as in the paper), and test_acc is the
expected best of 3 of them (exact over the 3-subsets), averaged over 100 fixed w ~ Dirichlet(1).
Departures: the parent's 4 epochs, beta 0.04 and per-sequence token mean, kept so that the diff is VPO alone
(paper: 1 epoch, k3 1e-3, batch token mean); eps 1e-4 (repo 1e-6); no dual clip; 60 steps, not 100.

Run: uv run minimal_vpo.py          (flags: uv run minimal_vpo.py --help)
"""
import copy
import math
from dataclasses import dataclass

import torch

import toy_tasks as tt

TEST_METRIC = "E_w best@3 of 9 sampled answers"  # what test_acc is here (compare.py labels its column)
ON_EVAL_LINE = ("best@1", "best@9", "gold@3", "diversity")  # the final line has every metric


@dataclass
class Args:
    task: str = "reverse"
    """task to train on: only reverse, whose answers the (quality, brevity) vector reward scores"""
    binary: bool = False
    """exact-match scoring does not apply: every answer is scored by a reward vector (must stay off)"""
    model: str = ""
    """Hugging Face causal LM (hub id or local folder); empty builds the tiny default Llama"""
    warmup_steps: int = -1
    """supervised warm-up steps that make the tiny default a partly competent base model (-1: the task's
    own, 70 for answer sets, half of them in each format; 0: start from random weights)"""
    seed: int = 0
    """seed for weights, prompts and sampling: the same seed prints the same lines on CPU"""
    steps: int = 60
    """RL steps; each samples a fresh batch of prompts (60, not GRPO's 100: completions are 3 times longer)"""
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
    max_new_tokens: int = 24
    """token budget per completion, at least m answers of 7 tokens; a truncated last answer scores 0"""
    temperature: float = 1.0
    """sampling temperature (log-probs are taken at the same temperature)"""
    m: int = 3
    """answers per completion, written "a1|a2|a3" after a prompt marked "|"; 1: the plain format"""
    set_score: str = "vpo"
    """what a completion's answers earn: vpo (E_w of the best answer under w ~ Dirichlet(1)), sum (the
    answers' w_gold scores added, copies and blanks earning 0: Multi-RLVR) or max (best under w_gold)"""
    n_weights: int = 100
    """VPO: Dirichlet(1) weight draws per group, shared by all its completions (the repo's n_selections)"""
    w_gold: float = 0.5
    """the deployment weighting w_gold = (w_gold, 1 - w_gold) of (quality, brevity), for sum and max"""
    eval_answers: int = 9
    """answers pooled per test prompt for best@k: eval_answers / m sampled completions"""
    eval_temperature: float = 0.7
    """sampling temperature of the held-out evaluation (the paper's 0.7)"""
    eval_every: int = 20
    """held-out evaluation every this many steps (0: only at the end)"""
    micro_batch: int = 0
    """prompts per micro-batch: each forward and backward pass holds this many prompts' completions, and
    their gradients add up to one optimizer step (0: the whole batch at once)"""
    dtype: str = "auto"
    """auto (bfloat16 autocast for a --model on CUDA, float32 otherwise), float32 or bfloat16"""
    grad_checkpointing: bool = False
    """recompute activations in the backward pass instead of storing them (for a large --model)"""
    device: str = "auto"
    """auto (the tiny default on the CPU; a --model on CUDA, then MPS, then CPU), cpu, cuda or mps"""
    log_jsonl: str = ""
    """also write every step's metrics to this JSON-lines file"""


# ALGO LOGIC: everything that makes this method this method.


def dirichlet(shape, k, generator=None):
    """Weights w ~ Dirichlet(1, ..., 1), uniform on the k-simplex: (*shape, k), normalised Exp(1) draws."""
    w = torch.empty(*shape, k).exponential_(generator=generator)
    return w / w.sum(-1, keepdim=True)


def set_scores(R, w):
    """VPO's set score s = (1/N) sum_j max_a w_j . R[a]: the max over the completion's own m answers
    inside, the mean over the N weight draws outside. R (P, G, m, k) reward matrices; w (P, N, k), one
    set of draws per group, shared by its G completions so that they are compared on the same w. -> (P, G)"""
    scored = (R[:, :, :, None, :] * w[:, None, None, :, :]).sum(-1)  # (P, G, m, N) every answer, every w
    return scored.amax(2).mean(-1)


def scalar_scores(R, w_gold, how):
    """The baselines, under the fixed w_gold: "max" the best answer, "sum" every answer (copies and
    blanks are zero rows, so only distinct answers earn). R (P, G, m, k) -> (P, G)"""
    gold = (R * torch.tensor(w_gold, device=R.device)).sum(-1)  # (P, G, m)
    # summed in sorted order, so a reordered set gets a bit-identical score and a flat group stays flat
    return gold.amax(-1) if how == "max" else gold.sort(-1).values.sum(-1)


def scores(R, args):
    """The score each completion's advantage is the group z-score of. R (P, G, m, k) -> (P, G)"""
    if args.set_score == "vpo":
        return set_scores(R, dirichlet((R.size(0), args.n_weights), R.size(-1)).to(R.device))
    return scalar_scores(R, [args.w_gold, 1 - args.w_gold], args.set_score)


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
    if args.task != "reverse" or args.binary:
        tt.fail("--task must be reverse and --binary off: the (quality, brevity) reward is defined on reverse")
    tt.check_common_args(args, min_group=2)
    if args.epochs < 1:
        tt.fail(f"--epochs must be at least 1, got {args.epochs}")
    if not 0 < args.clip_eps < 1:
        tt.fail(f"--clip_eps must lie strictly between 0 and 1, got {args.clip_eps}")
    if args.beta < 0:
        tt.fail(f"--beta must not be negative, got {args.beta}")
    if args.m < 1 or args.n_weights < 1:
        tt.fail(f"--m and --n_weights must be at least 1, got {args.m} and {args.n_weights}")
    need = tt.AnswerSetTask(m=args.m).tokens_needed()
    if args.max_new_tokens < need:
        tt.fail(f"--max_new_tokens {args.max_new_tokens} cannot fit {args.m} answers of up to 6 characters, "
                f"each closed by '|' or EOS; give at least {need}")
    if args.set_score not in ("vpo", "sum", "max"):
        tt.fail(f"--set_score {args.set_score!r} is unknown; choose vpo, sum or max")
    if not 0 <= args.w_gold <= 1:
        tt.fail(f"--w_gold must lie between 0 and 1, got {args.w_gold}")
    if args.eval_answers < args.m or args.eval_answers % args.m:
        tt.fail(f"--eval_answers must be a positive multiple of --m {args.m}, got {args.eval_answers}")
    if not args.eval_temperature > 0:
        tt.fail(f"--eval_temperature must be positive, got {args.eval_temperature}")


# EVALUATION: test-time search over a pool of answers (this file's own; tt.evaluate scores one answer).


def best_at_k(values, k):
    """Expected best of k answers drawn without replacement from a pool of S, computed exactly: the i-th
    smallest value (i = 0..S-1) is the best of a random k-subset with probability C(i, k-1) / C(S, k).
    The paper's random-permutation estimate, without its noise. values (P, S, ...) -> (P, ...)"""
    S = values.size(1)
    p = torch.tensor([math.comb(i, k - 1) / math.comb(S, k) for i in range(S)], device=values.device)
    return (values.sort(1).values * p.view(S, *[1] * (values.dim() - 2))).sum(1)


def set_diversity(R):
    """Mean pairwise L1 distance between the reward vectors of a set's scored answers (non-zero rows),
    averaged over sets; a set with fewer than two counts 0. R (N, m, k) deduplicated -> scalar"""
    scored = R.abs().sum(-1) > 0  # (N, m)
    dist = (R[:, :, None] - R[:, None, :]).abs().sum(-1)  # (N, m, m) L1 between answers a and b
    pairs = scored[:, :, None] & scored[:, None, :] & torch.ones_like(dist[0], dtype=torch.bool).triu(1)
    return ((dist * pairs).sum((1, 2)) / pairs.sum((1, 2)).clamp(min=1)).mean()


@torch.no_grad()
def evaluate(model, tok, task, device, args):
    """Held-out test-time search: per test prompt, eval_answers / m completions sampled at temperature 0.7,
    their answers pooled (k in best@k counts answers: one VPO completion weighs as much as m single-answer
    ones; a copy counts here, blanks and cut-off answers score 0). Returns (test_acc = E_w best@3, exact,
    the policy's entropy at temperature 1 along the samples, {metric: value})."""
    chains = args.eval_answers // args.m
    examples = [ex for ex in task.test for _ in range(chains)]
    texts, truncated, entropy, tokens = [], [], 0.0, 0
    model.eval()
    with torch.random.fork_rng():  # a fixed stream of its own: evaluating never shifts the training run
        torch.manual_seed(12345)
        rows = args.micro_batch * args.group_size  # the logits held at once, as in training (tt.evaluate)
        for part in tt.micro_batches(len(examples), rows * args.max_new_tokens):
            ids, mask = tt.encode(tok, [ex.prompt for ex in examples[part]], device)
            rollout = tt.sample(model, tok, ids, mask, args.max_new_tokens, args.eval_temperature)
            entropy = entropy + (tt.score(model, rollout, rows, temperature=1.0)[1] * rollout.completion_mask).sum()
            texts, truncated = texts + rollout.texts, truncated + rollout.truncated.tolist()
            tokens = tokens + rollout.completion_mask.sum()
    model.train()
    entropy = entropy / tokens.clamp(min=1)  # a token mean over every sampled answer
    done = list(zip(texts, examples, truncated))
    R = torch.tensor([task.reward_matrix(t, ex, cut, dedup=False) for t, ex, cut in done])  # (N, m, 2)
    pool = R.view(len(task.test), args.eval_answers, 2)  # (P, S, 2) every answer to one prompt
    w = dirichlet((100,), 2, torch.Generator().manual_seed(0))  # (100, 2) the same draws in every run
    found = {f"best@{k}": best_at_k(pool @ w.T, k).mean() for k in (1, 3, 9)}  # mean over prompts and w
    found |= {f"gold@{k}": best_at_k(pool @ torch.tensor([args.w_gold, 1 - args.w_gold]), k).mean() for k in (1, 3, 9)}
    for w1 in (1.0, 0.75, 0.5, 0.25, 0.0):  # the weight panel, w = (w1, 1 - w1)
        found[f"best@3_w{w1:g}"] = best_at_k(pool @ torch.tensor([w1, 1 - w1]), 3).mean()
    found["diversity"] = set_diversity(torch.tensor([task.reward_matrix(t, ex, cut) for t, ex, cut in done]))
    parts = [tt.parse_answers(t, args.m, cut, dedup=False) for t, _, cut in done]
    for a in range(args.m):  # each slot's mean answer length over n: VPO's ideal is about (1/n, 1/2, 1)
        found[f"slot{a + 1}"] = sum(len(p[a]) / len(ex.answer) for p, (_, ex, _) in zip(parts, done)) / len(done)
    exact = sum(a == ex.answer for p, (_, ex, _) in zip(parts, done) for a in p) / (len(done) * args.m)
    return found.pop("best@3"), exact, float(entropy), found


# TRY NOT TO MODIFY: the loop every file shares.


def main():
    args = tt.parse_args(Args)
    check_args(args)
    task, model, tok, device, logger, rng = tt.setup(args, tt.AnswerSetTask(m=args.m))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)  # the frozen base, for the KL term
    mb_rows = args.micro_batch * args.group_size  # rows per forward pass, whole groups (0: the whole batch)
    base_acc, exact, test_entropy, found = evaluate(model, tok, task, device, args)
    logger.eval(0, base_acc, exact, entropy=test_entropy, **{k: found[k] for k in ON_EVAL_LINE})

    for step in range(1, args.steps + 1):
        examples = task.sample(rng, args.prompts_per_step)
        rollout, R = tt.rollout_groups(model, tok, task, examples, args.group_size, args, device)  # R (P, G, m, 2)
        rewards = scores(R, args)  # (P, G) one score per completion, from its whole answer set
        adv = group_advantages(rewards).view(-1)  # (N,) one advantage per completion, on all its tokens
        old_logp, _ = tt.score(model, rollout, mb_rows)  # (N, T) pi_old, frozen for every epoch
        ref_logp = tt.score(ref_model, rollout, mb_rows)[0] if args.beta > 0 else old_logp
        for epoch in range(args.epochs):  # the ratio and clip fraction logged are the last epoch's
            loss, stats, entropy = update(model, optimizer, rollout, adv, old_logp, ref_logp, step, args)
        grad_norm = stats.pop("grad_norm")
        logger.step(step, reward=rewards.mean(), loss=loss, entropy=entropy, **stats,
                    grad_norm=grad_norm, len=rollout.lengths.mean(), gen_tokens=int(rollout.lengths.sum()),
                    answers=(R.abs().sum(-1) > 0).sum(-1).float().mean(), diversity=set_diversity(R.flatten(0, 1)))
        if (args.eval_every and step % args.eval_every == 0) or step == args.steps:
            test_acc, exact, test_entropy, found = evaluate(model, tok, task, device, args)
            logger.eval(step, test_acc, exact, entropy=test_entropy, **{k: found[k] for k in ON_EVAL_LINE})
    logger.final(test_acc, exact, base_acc, **found)


if __name__ == "__main__":
    main()
