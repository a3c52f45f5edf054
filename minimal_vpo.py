"""VPO: Vector Policy Optimization. Train one completion to hold a set of answers that covers a trade-off.

Paper: Bahlous-Boldi et al. 2026, "Vector Policy Optimization: Training for Diversity Improves Test-Time
Search", arXiv 2605.22817 (reference code: ryanboldi/vpo, vpo/utils/vpo.py::vpo_advantage).
Parent: minimal_grpo.py. The change: the reward is a vector, a completion holds m answers "a1|a2|a3", and
its advantage is the group z-score of its best answer under a random weighting, averaged over weightings:

    R_i   = (m, k) rewards of completion i, one row per answer (blank, copied or cut-off: a zero row)
    w_j   ~ Dirichlet(1, ..., 1), j = 1..N, N = 100, drawn once per group and shared by its completions
    s_i   = (1/N) sum_j max_a w_j . R_i[a]       (max over its own answers inside, mean over w outside)
    A_i   = (s_i - mean(s)) / (std(s) + 1e-4)    (GRPO's z-score, on every token of completion i)

The toy (toy_tasks.AnswerSetTask): reverse, answer t scored (quality, brevity) = (char_accuracy(t, rev),
1 - (|t|/n)^2 if t is a prefix of rev, else 0, as the paper's maze pays nothing to a route that misses
the exit). A correct prefix of x n characters scores (x, 1 - x^2), a concave front: each weighting wants
its own length, so a set beats any one answer. For rev = "dbac", prefixes of 1-4 characters score .594,
.625, .594, .500 under w_gold = (.5, .5); E_w max is .625 for "db", .760 for "d|dbac", .765 for "d|db|dbac".
Read vpo_scores (the change), then evaluate: test_acc is E_w best@3 over the answers of 10 completions
per test prompt, the repo's maze protocol. Baselines are flags: --set_score sum or max, --m 1 (see --help).
Departures, GRPO's settings kept so that the diff is VPO alone (the repo's in brackets): 4 epochs (1, in 2
mini-batch steps), beta 0.04 (k3 1e-3 clamped to +-10), per-sequence token mean (token mean), no dual clip
(3), 60 steps, eps 1e-4 (1e-6: A is theirs times (std + 1e-6)/(std + 1e-4), within 1 % once std > 0.01),
the baselines' population std (Bessel's in the repo's GRPO and Multi-RLVR: their A is ours / 1.069 at G = 8).

Run: uv run minimal_vpo.py          (flags: uv run minimal_vpo.py --help)
"""
import copy
import math
from dataclasses import dataclass

import torch

import toy_tasks as tt

TEST_METRIC = "E_w best@3 of 10 completions' answers"  # what test_acc is here (compare.py labels its column)
ON_EVAL_LINE = ("best@1", "best@9", "gold@3", "diversity")  # the final line has every metric


@dataclass
class Args:
    task, binary = "reverse", False  # not flags: the (quality, brevity) reward is defined on reverse only
    eval_size: int = 0
    """held-out prompts evaluated, the first of the held-out set (0: all 256, each with --eval_chains samples)"""
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
    """answers per completion, written "a1|a2|a3" after a prompt marked "|"; 1: the plain format (with vpo,
    the repo's vpo_single: the mean of 100 draws is w_gold give or take 0.029, so GRPO on w_gold . r)"""
    set_score: str = "vpo"
    """what a completion's answers earn: vpo (E_w of the best answer, w ~ Dirichlet(1)), sum (the distinct
    answers' w_gold scores added: the repo's Multi-RLVR) or max (the best under w_gold; --m 1: GRPO on it)"""
    n_weights: int = 100
    """VPO: Dirichlet(1) weight draws per group, shared by all its completions (the repo's n_selections;
    1 with --m 1: random-weight GRPO, one w per prompt, as the paper's augment.py)"""
    w_gold: float = 0.5
    """the deployment weighting w_gold = (w_gold, 1 - w_gold) of (quality, brevity), for sum and max"""
    eval_chains: int = 10
    """completions sampled per test prompt for best@k, whatever m (the repo's n_chains): 30 answers, m = 3"""
    eval_every: int = 20
    """held-out evaluation every this many steps (0: only at the end)"""
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


def vpo_scores(R, w):
    """VPO's set score s = (1/N) sum_j max_a w_j . R[a]: the max over the completion's own m answers
    inside, the mean over the N weight draws outside. R (P, G, m, k) reward matrices; w (P, N, k), one
    set of draws per group, shared by its G completions so that they are compared on the same w. -> (P, G)"""
    values = (R[:, :, :, None, :] * w[:, None, None, :, :]).sum(-1)  # (P, G, m, N) every answer, every w
    return values.amax(2).mean(-1)


def gold_scores(R, w_gold, how):
    """The baselines, under the fixed w_gold: "max" the best answer, "sum" every answer (copies and
    blanks are zero rows, so only distinct answers earn). R (P, G, m, k) -> (P, G)"""
    gold = (R * torch.tensor(w_gold, device=R.device)).sum(-1)  # (P, G, m)
    # summed in sorted order, so a reordered set gets a bit-identical score and a flat group stays flat
    return gold.amax(-1) if how == "max" else gold.sort(-1).values.sum(-1)


def completion_scores(R, args):
    """The score each completion's advantage is the group z-score of. R (P, G, m, k) -> (P, G)"""
    if args.set_score == "vpo":  # w ~ Dirichlet(1, ..., 1): uniform on the simplex, N draws per group
        w = torch.distributions.Dirichlet(torch.ones(R.size(-1))).sample((R.size(0), args.n_weights))
        return vpo_scores(R, w.to(R.device))  # (P, N, k)
    return gold_scores(R, [args.w_gold, 1 - args.w_gold], args.set_score)


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
    if args.m < 1 or args.n_weights < 1:
        tt.fail(f"--m and --n_weights must be at least 1, got {args.m} and {args.n_weights}")
    if args.max_new_tokens < (need := tt.AnswerSetTask(m=args.m).tokens_needed()):
        tt.fail(f"--max_new_tokens {args.max_new_tokens} cannot fit {args.m} answers; give {need}")
    if args.set_score not in ("vpo", "sum", "max"):
        tt.fail(f"--set_score {args.set_score!r} is unknown; choose vpo, sum or max")
    if not 0 <= args.w_gold <= 1:
        tt.fail(f"--w_gold must lie between 0 and 1, got {args.w_gold}")
    if args.eval_chains * args.m < 9:
        tt.fail(f"--eval_chains {args.eval_chains} x --m {args.m} answers are too few for best@9: give 9")


# EVALUATION: test-time search over a pool of answers (this file's own; tt.evaluate scores one answer).


def best_at_k(values, k):
    """Expected best of k answers drawn without replacement from a pool of S, exactly (the paper's random-
    permutation estimate without its noise): the i-th smallest value (i = 0..S-1) is the best of a random
    k-subset with probability C(i, k-1) / C(S, k). values (P, S, ...) -> (P, ...)"""
    S = values.size(1)
    p = torch.tensor([math.comb(i, k - 1) / math.comb(S, k) for i in range(S)], device=values.device)
    return (values.sort(1).values * p.view(S, *[1] * (values.dim() - 2))).sum(1)


def scored(R):
    """Which answers earn something: the non-zero rows of reward matrices (..., m, k) -> (..., m)."""
    return R.abs().sum(-1) > 0


def set_diversity(R):
    """Mean pairwise L1 distance between the reward vectors of a set's scored answers, averaged over
    sets; a set with fewer than two counts 0. R (N, m, k) deduplicated -> scalar"""
    dist = (R[:, :, None] - R[:, None, :]).abs().sum(-1)  # (N, m, m) L1 between answers a and b
    pairs = scored(R)[:, :, None] & scored(R)[:, None, :] & torch.ones_like(dist[0], dtype=torch.bool).triu(1)
    return ((dist * pairs).sum((1, 2)) / pairs.sum((1, 2)).clamp(min=1)).mean()


@torch.no_grad()
def evaluate(model, tok, task, device, args):
    """Test-time search as the repo's maze runs it: per test prompt, eval_chains completions at temperature
    0.7, answers pooled (copies count; blanks, cut-off answers score 0). Returns test_acc = E_w best@3,
    exact = share of completions holding the reversal, entropy at temperature 1 along them, {metric: v}."""
    examples = [ex for ex in task.test for _ in range(args.eval_chains)]
    texts, truncated, entropy, tokens = [], [], 0.0, 0
    model.eval()
    with torch.random.fork_rng():  # a fixed stream of its own: evaluating never shifts the training run
        torch.manual_seed(12345)
        rows = args.micro_batch * args.group_size  # the logits held at once, as in training (tt.evaluate)
        for part in tt.micro_batches(len(examples), rows * args.max_new_tokens):
            ids, mask = tt.encode(tok, [ex.prompt for ex in examples[part]], device)
            rollout = tt.sample(model, tok, ids, mask, args.max_new_tokens, 0.7)  # the paper's temperature
            entropy = entropy + (tt.score(model, rollout, rows, 1.0)[1] * rollout.completion_mask).sum()
            texts, truncated = texts + rollout.texts, truncated + rollout.truncated.tolist()
            tokens = tokens + rollout.completion_mask.sum()
    model.train()
    entropy = entropy / tokens.clamp(min=1)  # a token mean over every sampled answer
    done = list(zip(texts, examples, truncated))
    R = torch.tensor([task.reward_matrix(t, ex, cut, dedup=False) for t, ex, cut in done])  # (N, m, 2)
    pool = R.view(len(task.test), args.eval_chains * args.m, 2)  # (P, S, 2) every answer to one prompt
    # E_w on the midpoint grid w1 = (i + 1/2)/100 (Dirichlet(1, 1) is uniform in w1): exact to 1e-4, untilted
    w1 = (torch.arange(100) + 0.5) / 100
    gold, grid = torch.tensor([args.w_gold, 1 - args.w_gold]), torch.stack([w1, 1 - w1], 1)  # (2,), (100, 2)
    found = {f"best@{k}": best_at_k(pool @ grid.T, k).mean() for k in (1, 3, 9)}  # mean over prompts and w
    found |= {f"gold@{k}": best_at_k(pool @ gold, k).mean() for k in (1, 3, 9)}
    for w1 in (1.0, 0.75, 0.5, 0.25, 0.0):  # the weight panel, w = (w1, 1 - w1)
        found[f"best@3_w{w1:g}"] = best_at_k(pool @ torch.tensor([w1, 1 - w1]), 3).mean()
    found["diversity"] = set_diversity(torch.tensor([task.reward_matrix(t, ex, cut) for t, ex, cut in done]))
    parts = [tt.parse_answers(t, args.m, cut, dedup=False) for t, _, cut in done]
    lengths = torch.tensor([[len(a) / len(ex.answer) for a in p] for p, (_, ex, _) in zip(parts, done)])
    found |= {f"slot{a + 1}": v for a, v in enumerate(lengths.mean(0))}  # each slot's mean answer length / n
    exact = sum(ex.answer in p for p, (_, ex, _) in zip(parts, done)) / len(done)
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
        rollout, R = tt.rollout_groups(model, tok, task, examples, args.group_size, args, device)
        rewards = completion_scores(R, args)  # R (P, G, m, 2) -> (P, G): one score per completion's set
        adv = group_advantages(rewards).view(-1)  # (N,) one advantage per completion, on all its tokens
        old_logp, _ = tt.score(model, rollout, mb_rows)  # (N, T) pi_old, frozen for every epoch
        ref_logp = tt.score(ref_model, rollout, mb_rows)[0] if args.beta > 0 else old_logp
        for epoch in range(args.epochs):  # the ratio and clip fraction logged are the last epoch's
            loss, stats, entropy = update(model, optimizer, rollout, adv, old_logp, ref_logp, step, args)
        grad_norm = stats.pop("grad_norm")
        logger.step(step, reward=rewards.mean(), loss=loss, entropy=entropy, **stats,
                    grad_norm=grad_norm, len=rollout.lengths.mean(), gen_tokens=int(rollout.lengths.sum()),
                    answers=scored(R).sum(-1).float().mean(), diversity=set_diversity(R.flatten(0, 1)))
        if (args.eval_every and step % args.eval_every == 0) or step == args.steps:
            test_acc, exact, test_entropy, found = evaluate(model, tok, task, device, args)
            logger.eval(step, test_acc, exact, entropy=test_entropy, **{k: found[k] for k in ON_EVAL_LINE})
    logger.final(test_acc, exact, base_acc, **found)


if __name__ == "__main__":
    main()
