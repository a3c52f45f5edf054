"""PPO: Proximal Policy Optimization with a learned critic, the algorithm every other file is defined against.

Papers: Schulman et al. 2017, arXiv 1707.06347 (PPO); Schulman et al. 2016, arXiv 1506.02438 (GAE); Ziegler
et al. 2019, arXiv 1909.08593 and Ouyang et al. 2022, arXiv 2203.02155 (PPO for language models); Huang et
al. 2024, arXiv 2403.17031 (its implementation details). Reference code: trl.experimental.ppo in TRL 1.12.0
(the last TRL with PPO) and verl's adv_estimator=gae. Parent: minimal_grpo.py.
The change: the baseline is a learned value V(s_t) at every token instead of the group's mean reward, so the
advantage is per token, and the KL to the frozen base moves from the loss into the reward:

    r_t   = -beta (log pi_old - log pi_ref)_t + R [t = last]     (k1 KL at every token, the task reward once)
    A_t   = sum_k (gamma lam)^k delta_t+k,  delta_t = r_t + gamma V_t+1 - V_t,  V after the last token = 0
    R_t   = A_t + V_t  (the critic's target);  A_t whitened over the batch's completion tokens
    J_i,t = min(rho A_t, clip(rho, 1-eps, 1+eps) A_t)                   (GRPO's clipped surrogate, no KL term)
    L_V   = 1/2 mean_t max((V - R_t)^2, (clip(V, V_old +- 0.2) - R_t)^2),  weight vf_coef = 0.1

The KL sits in the reward because a critic can carry it: in the return, a token is also charged for the
divergence of the tokens it leads to (InstructGPT's objective E[R - beta KL]). GRPO's one standardised advantage
per completion would fold it into one number scaled by the group's std, so DeepSeekMath puts k3 in the loss.
The critic: a copy of the base model's backbone (no LM head) with a linear head on its last hidden state and
its own AdamW, trained in the same inner epochs and micro-batches. TRL starts it from the reward model; we
have none, so --critic_init base copies the warmed-up base policy, which already reads the task (scratch:
fresh weights, as nanoRL). Its head starts at zero, so V = 0 at the first step. Every completion is its own
episode: the default samples 256 prompts once each (--group_size 1: GRPO's 256 completions a step).
TRL's PPOConfig defaults kept: 4 epochs of 1 mini-batch, cliprange 0.2, vf_coef 0.1, cliprange_value 0.2, gamma 1,
lam 0.95, whiten_rewards False, kl_coef 0.05, kl_estimator k1. Departures: (1) each completion's token mean, then the
batch mean (verl's seq-mean-token-mean), where TRL takes one token mean (ragged lengths: gradient cosine 0.72); (2) the
reward is paid on the EOS, where TRL pays it on the state after it (a trained V there moves whitened A by up to 0.12);
(3) two AdamW, each model's gradient clipped at 1.0 on its own, as verl does (TRL: one AdamW, no clip); (4) lr 1e-3.
Read: rollout -> token_rewards -> gae -> whiten (main), then update() steps both models.
Run: uv run minimal_ppo.py          (flags: uv run minimal_ppo.py --help)
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
    prompts_per_step: int = 256
    """prompts per step"""
    group_size: int = 1
    """completions sampled per prompt; each is its own episode (no group baseline), so 1 is enough"""
    lr: float = 1e-3
    """AdamW learning rate, of the policy and of the critic"""
    epochs: int = 4
    """inner epochs: gradient steps of both models on each sampled batch (TRL's num_ppo_epochs)"""
    clip_eps: float = 0.2
    """PPO clip range: the ratio is clipped to [1 - clip_eps, 1 + clip_eps]"""
    beta: float = 0.05
    """weight of the k1 KL penalty to the frozen base model, inside the reward (TRL's kl_coef; 0: no reference model)"""
    gamma: float = 1.0
    """discount over the completion's tokens"""
    lam: float = 0.95
    """GAE lambda: 1 is the Monte-Carlo return minus V, 0 the one-step TD error"""
    vf_coef: float = 0.1
    """scales the value loss (TRL's vf_coef, kept for parity); with the critic's own Adam optimizer it barely changes
    the critic's step (0.1 -> 1.0: 0.2 %) and matters only through the gradient clip (4.6 % with it); 0: V stays 0"""
    vf_clip: float = 0.2
    """value clip: the new value is clipped to V_old +- vf_clip in the clipped loss term (TRL's cliprange_value)"""
    critic_init: str = "base"
    """base (a copy of the base policy's backbone) or scratch (fresh random weights); the head starts at zero"""
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


class Critic(torch.nn.Module):
    """V(s_t) at every completion token: a linear head on the last hidden state of `model.base_model`, which every
    Hugging Face model defines (TRL reads its value model so): no vocabulary logits at any position."""

    def __init__(self, model, args):
        super().__init__()
        lm_head = model.get_output_embeddings()
        if model.base_model is model or not isinstance(lm_head, torch.nn.Linear):
            tt.fail(f"--model {args.model!r} has no backbone under a linear LM head to read a hidden state from, "
                    "so the critic's value head does not fit it")
        with torch.random.fork_rng(devices=[]):  # draws nothing from the stream that samples the prompts
            self.backbone = copy.deepcopy(model.base_model)
            if args.critic_init == "scratch":  # the same architecture, device and settings, fresh weights
                self.backbone.load_state_dict(type(model.base_model)(model.config).state_dict())
            self.head = torch.nn.Linear(lm_head.in_features, 1, device=lm_head.weight.device)
        self.head.weight.data.zero_(), self.head.bias.data.zero_()  # V = 0 everywhere before the first update
        self.backbone.autocast_dtype = model.autocast_dtype  # the policy's precision (tt.forward reads it)

    def forward(self, rollout):
        return self.head(tt.completion_hidden(self.backbone, rollout)).squeeze(-1)  # (N, T) V(s_t), s_t before token t

    @torch.no_grad()
    def score(self, rollout, rows=0):  # V_old: no graph, `rows` completions at a time (0: all at once)
        return torch.cat([self(rollout.rows(part)) for part in tt.micro_batches(rollout.completion_ids.size(0), rows)])


def token_rewards(rewards, old_logp, ref_logp, mask, beta):
    """Per-token rewards (N, T): -beta (log pi_old - log pi_ref) (k1) at every completion token, plus rewards (N,)
    on each one's last token (its EOS, or the budget's last token for a truncated one); 0 on padding."""
    r = -beta * (old_logp - ref_logp) * mask
    last = mask.sum(1).long() - 1  # (N,) every completion holds at least one token
    r[torch.arange(len(r)), last] += rewards
    return r


def gae(rewards, values, mask, gamma, lam):
    """Generalized advantage estimation, right to left. rewards, values, mask: (N, T). Past a completion's last
    token all is 0, so the value after it is 0: the end is terminal, also where the budget cut a completion off
    (nothing follows, its reward is paid). Returns A and the critic's targets R_t = A_t + V_t, 0 on padding."""
    rewards, values = rewards * mask, values * mask
    adv, running = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        next_value = values[:, t + 1] if t + 1 < rewards.size(1) else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (N,) TD error
        running = delta + gamma * lam * running
        adv[:, t] = running
    return adv * mask, (adv + values) * mask


def masked_var(x, mask):
    """Unbiased variance of x over the entries where mask is 1."""
    return (((x - tt.masked_mean(x, mask)) ** 2) * mask).sum() / (mask.sum() - 1).clamp(min=1)


def whiten(x, mask, eps=1e-8):
    """(x - mean) / sqrt(var + eps) over the masked entries, unbiased variance (TRL's and verl's
    masked_whiten); 0 on padding. Applied to the whole batch's advantages once, before any split."""
    return (x - tt.masked_mean(x, mask)) * torch.rsqrt(masked_var(x, mask) + eps) * mask


def explained_variance(values, returns, mask):
    """1 - Var(R - V) / Var(R) over completion tokens, as verl's critic/vf_explained_var (its + 1e-5 too):
    1 for a critic that predicts every return, 0 for one no better than their mean, below 0 for a worse one."""
    return 1 - masked_var(returns - values, mask) / (masked_var(returns, mask) + 1e-5)


def kl_k3(logp, ref_logp):
    """Schulman's k3 estimator of KL(pi || ref) at the sampled tokens: exp(d) - d - 1, d = ref - pi."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def aggregate(per_token, mask, n):
    """Per-sequence token mean (the 1/|y_i| factor), then a sum over the completions given divided by n,
    the whole batch's number of completions: the batch mean, added up micro-batch by micro-batch."""
    return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / n


def policy_loss(logp, old_logp, ref_logp, adv, mask, clip_eps, n):
    """Clipped surrogate and its diagnostics. logp, old_logp, ref_logp, adv, mask: (N, T); n: the batch's size."""
    ratio = torch.exp(logp - old_logp)  # (N, T); 1 in the first inner epoch
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    kl = kl_k3(logp, ref_logp)  # (N, T) k3 to the frozen base model: logged only, the penalty is in the reward
    per_token = -surrogate  # (N, T)
    # the tokens whose gradient the clip removed (TRL's clip_ratio/region_mean, verl's pg_clipfrac): a
    # ratio outside the band on the side the advantage pushes towards; outside on the other side, the
    # unclipped term is the smaller one and the gradient flows
    clipped = ((ratio > 1 + clip_eps) & (adv > 0)) | ((ratio < 1 - clip_eps) & (adv < 0))  # (N, T)
    stats = {"ratio": tt.masked_mean(ratio, mask),
             "clip_frac": tt.masked_mean(clipped.float(), mask),
             "kl": tt.masked_mean(kl, mask)}
    return aggregate(per_token, mask, n), {k: v.detach() for k, v in stats.items()}


def value_loss(values, old_values, returns, mask, vf_clip, tokens):
    """1/2 max((V - R)^2, (V_clip - R)^2), V_clip = V clamped to V_old +- vf_clip, summed over the whole batch's
    `tokens` (micro-batches add up to its token mean). vf_clip_frac: the share of tokens whose clipped term is
    strictly larger, so V gets no gradient there (TRL's val/clipfrac_avg, verl's critic/vf_clipfrac)."""
    # clamp V itself, as TRL and verl do: inside the band V_clip is V bit for bit, never counted as clipped
    clipped = values.clamp(old_values - vf_clip, old_values + vf_clip)
    unclipped_loss, clipped_loss = (values - returns) ** 2, (clipped - returns) ** 2  # (N, T) each
    per_token = 0.5 * torch.max(unclipped_loss, clipped_loss)
    stats = {"value_loss": tt.masked_mean(per_token, mask),
             "vf_clip_frac": tt.masked_mean((clipped_loss > unclipped_loss).float(), mask)}
    return (per_token * mask).sum() / tokens, {k: v.detach() for k, v in stats.items()}


def update(model, optimizer, critic, critic_optimizer, rollout, adv, returns, old_logp, old_values, ref_logp,
           step, args):
    """One optimizer step of each model, gradients accumulated over the same micro-batches of whole groups;
    returns the whole batch's loss, diagnostics, entropy and critic diagnostics, whatever --micro_batch is."""
    n, metrics = len(adv), tt.BatchMetrics(rollout.completion_mask.sum())  # counted before the split
    optimizer.zero_grad()
    critic_optimizer.zero_grad()
    for rows in tt.micro_batches(n, args.micro_batch * args.group_size):  # row slices of whole groups
        part = rollout.rows(rows)
        mask = part.completion_mask  # (n_mb, T)
        logp, entropy = tt.token_logprobs(model, part)  # (n_mb, T) each
        loss, stats = policy_loss(logp, old_logp[rows], ref_logp[rows], adv[rows], mask, args.clip_eps, n)
        v_loss, v_stats = value_loss(critic(part), old_values[rows], returns[rows], mask, args.vf_clip, metrics.tokens)
        tt.check_finite(loss, step)
        tt.check_finite(v_loss, step, "value loss")
        (loss + args.vf_coef * v_loss).backward()  # two separate networks: each gets its own loss's gradient
        metrics.add(mask, loss, entropy=tt.masked_mean(entropy, mask), **stats, **v_stats)
    stats = metrics.totals()
    critic_stats = {k: stats.pop(k) for k in ("value_loss", "vf_clip_frac")}
    stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    torch.nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)
    optimizer.step()
    critic_optimizer.step()
    loss, entropy = stats.pop("loss"), stats.pop("entropy")
    return loss, stats, entropy, critic_stats


def check_args(args):
    tt.check_common_args(args, min_group=1)
    if args.epochs < 1:
        tt.fail(f"--epochs must be at least 1, got {args.epochs}")
    if not 0 < args.clip_eps < 1:
        tt.fail(f"--clip_eps must lie strictly between 0 and 1, got {args.clip_eps}")
    for name in ("beta", "vf_coef"):
        if getattr(args, name) < 0:
            tt.fail(f"--{name} must not be negative, got {getattr(args, name)}")
    for name in ("gamma", "lam"):
        if not 0 <= getattr(args, name) <= 1:
            tt.fail(f"--{name} must lie between 0 and 1, got {getattr(args, name)}")
    if not args.vf_clip > 0:
        tt.fail(f"--vf_clip must be positive, got {args.vf_clip}")
    if args.critic_init not in ("base", "scratch"):
        tt.fail(f"--critic_init {args.critic_init!r} is unknown; choose base or scratch")


# TRY NOT TO MODIFY: the loop every file shares.


def main():
    args = tt.parse_args(Args)
    check_args(args)
    task, model, tok, device, logger, rng = tt.setup(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    critic = Critic(model, args)  # before the reference copy: it starts from the same base
    critic_optimizer = torch.optim.AdamW(critic.parameters(), lr=args.lr)
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)  # the frozen base, for the KL term
    mb_rows = args.micro_batch * args.group_size  # rows per forward pass, whole groups (0: the whole batch)
    base_acc, exact, test_extra = tt.evaluate(model, tok, task, device, args.max_new_tokens, mb_rows)
    logger.eval(0, base_acc, exact, **test_extra)

    for step in range(1, args.steps + 1):
        examples = task.sample(rng, args.prompts_per_step)
        rollout, rewards = tt.rollout_groups(model, tok, task, examples, args.group_size, args, device)
        mask = rollout.completion_mask  # (N, T)
        old_logp, _ = tt.score(model, rollout, mb_rows)  # (N, T) pi_old, frozen for every epoch
        ref_logp = tt.score(ref_model, rollout, mb_rows)[0] if args.beta > 0 else old_logp
        old_values = critic.score(rollout, mb_rows)  # (N, T) V_old: the baseline, and the centre of the value clip
        r = token_rewards(rewards.view(-1), old_logp, ref_logp, mask, args.beta)  # (N, T)
        adv, returns = gae(r, old_values, mask, args.gamma, args.lam)  # (N, T) each
        adv = whiten(adv, mask)  # over the whole batch's completion tokens, once, before any micro-batch split
        for epoch in range(args.epochs):  # the ratio and clip fraction logged are the last epoch's
            loss, stats, entropy, critic_stats = update(model, optimizer, critic, critic_optimizer, rollout, adv,
                                                        returns, old_logp, old_values, ref_logp, step, args)
        grad_norm = stats.pop("grad_norm")
        logger.step(step, reward=rewards.mean(), loss=loss, entropy=entropy, **stats,
                    grad_norm=grad_norm, len=rollout.lengths.mean(), gen_tokens=int(rollout.lengths.sum()),
                    len_wrong=tt.mean_length_wrong(rollout, rewards), **critic_stats,
                    explained_var=explained_variance(old_values, returns, mask), value=tt.masked_mean(old_values, mask),
                    **task.extra_metrics(rollout.texts))
        if (args.eval_every and step % args.eval_every == 0) or step == args.steps:
            test_acc, exact, test_extra = tt.evaluate(model, tok, task, device, args.max_new_tokens, mb_rows)
            logger.eval(step, test_acc, exact, **test_extra)
    logger.final(test_acc, exact, base_acc)


if __name__ == "__main__":
    main()
