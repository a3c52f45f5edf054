"""Tests of minimal_ppo.py: token rewards, GAE (by hand, and against its definition on ragged batches),
whitening, the clipped value loss on both sides, explained variance, the limit where PPO's policy loss is
GRPO's, the critic (which state it reads, no vocabulary logits, its two starts, a model it cannot fit),
micro-batches of both models, and the file run as a user runs it."""
import random

import pytest
import torch

import minimal_grpo as grpo
import minimal_ppo as ppo
import toy_tasks as tt
from conftest import (FAST, SHARED_KEYS, SHORT, assert_same_update, gradient_and_log, ragged_rollout, step_line,
                      tiny_policy)

OWN_KEYS = ["len_wrong", "value_loss", "vf_clip_frac", "explained_var", "value"]


# ---------------------------------------------------------------------------------------------
# Rewards, advantages and targets against numbers worked out by hand.


def test_token_rewards_put_the_kl_everywhere_and_the_reward_on_the_last_token():
    # beta 0.5; row 0 ends at t = 1 (its EOS), row 1 was cut off by the budget (no EOS, all 3 tokens).
    # row 0: -0.5 * [0.2, -0.4] = [-0.1, 0.2], reward 1 on t = 1 -> [-0.1, 1.2, 0] (padding stays 0)
    # row 1: -0.5 * [0.1, 0.0, 0.3] = [-0.05, 0, -0.15], reward 0.5 on t = 2 -> [-0.05, 0, 0.35]
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    old = torch.tensor([[0.2, -0.4, 9.0], [0.1, 0.0, 0.3]])
    r = ppo.token_rewards(torch.tensor([1.0, 0.5]), old, torch.zeros(2, 3), mask, beta=0.5)
    assert torch.allclose(r, torch.tensor([[-0.1, 1.2, 0.0], [-0.05, 0.0, 0.35]]))


def test_gae_by_hand():
    # gamma 1, lam 0.5, one completion of 3 tokens, r = [0, 0, 1], V = [0.5, 0.6, 0.8], V after it 0:
    #   delta = [0 + 0.6 - 0.5, 0 + 0.8 - 0.6, 1 + 0 - 0.8] = [0.1, 0.2, 0.2]
    #   A_2 = 0.2;  A_1 = 0.2 + 0.5 * 0.2 = 0.3;  A_0 = 0.1 + 0.5 * 0.3 = 0.25;  R = A + V = [0.75, 0.9, 1.0]
    adv, ret = ppo.gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.8]]), torch.ones(1, 3), 1.0, 0.5)
    assert torch.allclose(adv, torch.tensor([[0.25, 0.3, 0.2]])) and torch.allclose(ret, torch.tensor([[0.75, 0.9, 1.0]]))
    # gamma 0.9, lam 1, a completion of 2 tokens in a width of 3, garbage on its padding (r 5, V 9):
    #   delta_1 = 1 + 0.9 * 0 - 0.7 = 0.3 (the value after the last token is 0, not the 9 on the padding)
    #   delta_0 = 0.1 + 0.9 * 0.7 - 0.4 = 0.33;  A_0 = 0.33 + 0.9 * 0.3 = 0.6 = (0.1 + 0.9 * 1) - 0.4, the
    #   Monte-Carlo return minus V at lam = 1;  R = [1.0, 1.0], and 0 on the padding
    adv, ret = ppo.gae(torch.tensor([[0.1, 1.0, 5.0]]), torch.tensor([[0.4, 0.7, 9.0]]),
                       torch.tensor([[1.0, 1.0, 0.0]]), 0.9, 1.0)
    assert torch.allclose(adv, torch.tensor([[0.6, 0.3, 0.0]])) and torch.allclose(ret, torch.tensor([[1.0, 1.0, 0.0]]))
    # lam 0: one-step TD errors; gamma 0: A_t = r_t - V_t
    rew, val, mask = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.8]]), torch.ones(1, 3)
    assert torch.allclose(ppo.gae(rew, val, mask, 1.0, 0.0)[0], torch.tensor([[0.1, 0.2, 0.2]]))
    assert torch.allclose(ppo.gae(rew, val, mask, 0.0, 0.95)[0], torch.tensor([[-0.5, -0.6, 0.2]]))


def test_a_completion_cut_off_by_the_budget_is_terminal():
    # no EOS within the 3-token budget: the reward is paid on its last token and nothing is bootstrapped
    # after it, so at lam = 1 every A_t is the reward minus V_t: [1 - 0.2, 1 - 0.3, 1 - 0.4]
    mask = torch.ones(1, 3)
    r = ppo.token_rewards(torch.tensor([1.0]), torch.zeros(1, 3), torch.zeros(1, 3), mask, beta=0.05)
    adv, ret = ppo.gae(r, torch.tensor([[0.2, 0.3, 0.4]]), mask, 1.0, 1.0)
    assert torch.allclose(adv, torch.tensor([[0.8, 0.7, 0.6]])) and torch.allclose(ret, torch.ones(1, 3))


def gae_by_definition(rewards, values, lengths, gamma, lam):
    """The slow reference: per completion, in Python floats, A_t = sum_{k>=t} (gamma lam)^(k-t) delta_k over
    its own tokens only, delta_k = r_k + gamma V_{k+1} - V_k with V_L = 0 (no recursion, no masks)."""
    adv = torch.zeros_like(rewards, dtype=torch.float64)
    for i, length in enumerate(lengths):
        r, v = rewards[i].tolist()[:length], values[i].tolist()[:length] + [0.0]
        delta = [r[k] + gamma * v[k + 1] - v[k] for k in range(length)]
        for t in range(length):
            adv[i, t] = sum((gamma * lam) ** (k - t) * delta[k] for k in range(t, length))
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0), (0.7, 0.0), (0.0, 0.8)])
def test_gae_equals_its_definition_on_ragged_batches(gamma, lam):
    torch.manual_seed(0)
    n, width = 12, 9
    lengths = [random.Random(i).randint(1, width) for i in range(n - 1)] + [width]  # the last one truncated
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).float()
    rewards, values = torch.randn(n, width), torch.randn(n, width)  # garbage on the padding too
    adv, ret = ppo.gae(rewards, values, mask, gamma, lam)
    expected = gae_by_definition(rewards, values, lengths, gamma, lam).float()
    assert torch.allclose(adv, expected, atol=1e-5)
    assert torch.allclose(ret, (expected + values) * mask, atol=1e-5)


def test_whiten_over_the_masked_tokens_with_the_unbiased_variance():
    # tokens 1, 2, 3 (the 99 is padding): mean 2, unbiased variance (1 + 0 + 1) / 2 = 1, so [-1, 0, 1];
    # the population variance (2/3) would give +-1.2247
    x, mask = torch.tensor([[1.0, 2.0, 99.0], [3.0, 0.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert torch.allclose(ppo.whiten(x, mask), torch.tensor([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]), atol=1e-6)


def trl_value_loss(vpred, values, returns, mask, cliprange_value):
    """TRL 1.12.0 trl.experimental.ppo PPOTrainer.train's vf_loss and vf_clipfrac, restated."""
    vpredclipped = torch.clamp(vpred, values - cliprange_value, values + cliprange_value)
    vf_losses1, vf_losses2 = torch.square(vpred - returns), torch.square(vpredclipped - returns)
    vf_loss = 0.5 * ((torch.max(vf_losses1, vf_losses2) * mask).sum() / mask.sum())
    return vf_loss, ((vf_losses2 > vf_losses1).float() * mask).sum() / mask.sum()


def test_value_loss_on_both_sides_of_the_clip():
    # V_old = 0.5, clip 0.2, so V_clip lies in [0.3, 0.7]; five tokens:
    #   V 0.9, R 1: (0.9-1)^2 = 0.01 < (0.7-1)^2 = 0.09 -> the clipped term, 0.045, no gradient
    #   V 0.9, R 0: 0.81 > 0.49 -> unclipped, 0.405, dL/dV = V - R = 0.9
    #   V 0.1, R 0: 0.01 < (0.3-0)^2 = 0.09 -> clipped, 0.045, no gradient
    #   V 0.1, R 1: 0.81 > 0.49 -> unclipped, 0.405, dL/dV = -0.9
    #   V 0.6, R 1: inside the band, both 0.16 -> 0.08, not counted as clipped, dL/dV = -0.4
    # loss (0.045 + 0.405 + 0.045 + 0.405 + 0.08) / 5 = 0.196; vf_clip_frac 2/5; gradients / 5
    v = torch.tensor([[0.9], [0.9], [0.1], [0.1], [0.6]], requires_grad=True)
    old, ret, mask = torch.full((5, 1), 0.5), torch.tensor([[1.0], [0.0], [0.0], [1.0], [1.0]]), torch.ones(5, 1)
    loss, stats = ppo.value_loss(v, old, ret, mask, vf_clip=0.2, tokens=mask.sum())
    assert loss.item() == pytest.approx(0.196) and stats["value_loss"].item() == pytest.approx(0.196)
    assert stats["vf_clip_frac"].item() == pytest.approx(0.4)
    loss.backward()
    assert torch.allclose(v.grad.view(-1), torch.tensor([0.0, 0.9, 0.0, -0.9, -0.4]) / 5)


def test_value_loss_is_what_trl_computes():
    torch.manual_seed(0)
    old, ret = torch.rand(16, 7), torch.rand(16, 7)
    v = old + 0.4 * torch.randn(16, 7)
    mask = (torch.rand(16, 7) < 0.8).float()
    loss, stats = ppo.value_loss(v, old, ret, mask, 0.2, mask.sum())
    trl_loss, trl_clipfrac = trl_value_loss(v, old, ret, mask, 0.2)
    assert 0.1 < trl_clipfrac < 0.6
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-6)
    assert stats["vf_clip_frac"].item() == pytest.approx(trl_clipfrac.item(), abs=1e-7)
    # inside the band V_clip is V itself: equal terms, never counted. V_old + clamp(V - V_old) is not V bit
    # for bit where V and V_old are more than a factor 2 apart, and would count about half of those
    near_zero_old, inside = 0.1 * torch.rand(16, 7), 0.1 * torch.rand(16, 7)
    assert ppo.value_loss(inside, near_zero_old, ret, mask, 0.2, mask.sum())[1]["vf_clip_frac"].item() == 0.0


def test_explained_variance_by_hand():
    # returns [1, 0, 1, 0] (a fifth entry is padding): unbiased Var(R) = 1/3.
    # V = R: 1.  V = [1, 0, 0, 0]: R - V = [0, 0, 1, 0], mean 1/4, Var = (3/16 + 9/16) / 3 = 1/4, so
    # 1 - (1/4) / (1/3 + 1e-5) = 0.25002.  V = 0.5 everywhere: Var(R - V) = Var(R): 1 - (1/3) / (1/3 + 1e-5) = 3e-5
    ret, mask = torch.tensor([[1.0, 0.0, 1.0, 0.0, 7.0]]), torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    assert ppo.explained_variance(ret, ret, mask).item() == pytest.approx(1.0)
    assert ppo.explained_variance(torch.tensor([[1.0, 0.0, 0.0, 0.0, -3.0]]), ret, mask).item() == pytest.approx(0.25002, abs=1e-5)
    assert ppo.explained_variance(torch.full((1, 5), 0.5), ret, mask).item() == pytest.approx(3e-5, abs=1e-6)


def test_policy_loss_is_grpos_surrogate_without_the_kl_term():
    # the limit: an advantage constant along each completion and GRPO's beta 0 -> the same loss and
    # gradient; and the reference no longer enters the loss, only the logged kl
    torch.manual_seed(0)
    old, ref = torch.randn(6, 5), torch.randn(6, 5)
    logp_ppo = (old + 0.3 * torch.randn(6, 5)).requires_grad_()
    logp_grpo = logp_ppo.detach().clone().requires_grad_()
    adv, mask = torch.randn(6), (torch.rand(6, 5) < 0.8).float()
    mask[:, 0] = 1
    loss_ppo, stats_ppo = ppo.policy_loss(logp_ppo, old, ref, adv[:, None].expand(6, 5), mask, 0.2, 6)
    loss_grpo, stats_grpo = grpo.policy_loss(logp_grpo, old, ref, adv, mask, 0.2, beta=0.0, n=6)
    assert loss_ppo.item() == pytest.approx(loss_grpo.item(), rel=1e-6)
    loss_ppo.backward()
    loss_grpo.backward()
    assert torch.allclose(logp_ppo.grad, logp_grpo.grad, atol=1e-7)
    assert all(stats_ppo[k].item() == pytest.approx(stats_grpo[k].item()) for k in ("ratio", "clip_frac", "kl"))
    same = ppo.policy_loss(logp_ppo, old, logp_ppo.detach(), adv[:, None].expand(6, 5), mask, 0.2, 6)
    assert same[0].item() == loss_ppo.item() and same[1]["kl"].item() == 0.0 < stats_ppo["kl"].item()


# ---------------------------------------------------------------------------------------------
# The critic.


def critic_for(model, init="base", seed=0):
    model.autocast_dtype = None  # what tt.load_policy sets for the tiny default on the CPU
    return ppo.Critic(model, ppo.Args(critic_init=init, seed=seed))


def test_the_critic_reads_the_state_before_each_token():
    task, tok, model = tiny_policy()
    rollout, _ = ragged_rollout(tok, task, 2, 2)
    critic = critic_for(model)
    torch.nn.init.normal_(critic.head.weight)
    with torch.no_grad():
        # the hidden states are the ones the LM head reads: through it they give the policy's logits
        hidden = tt.completion_hidden(model.base_model, rollout)
        assert torch.allclose(model.get_output_embeddings()(hidden), tt.completion_logits(model, rollout, 1.0), atol=1e-5)
        values = critic(rollout)
        a, b = tok.convert_tokens_to_ids(["a", "b"])
        rows = rollout.completion_mask[:, 3] == 1  # the completions that go on past token 3
        rollout.completion_ids[:, 2] = torch.where(rollout.completion_ids[:, 2] == a, b, a)
        after = critic(rollout)
    # V_t is the value of the state before token t: changing token 2 leaves V_0..V_2, moves V_3
    assert values.shape == rollout.completion_ids.shape and rows.sum() == 2
    assert torch.allclose(after[:, :3], values[:, :3], atol=1e-6)
    assert ((after[rows, 3] - values[rows, 3]).abs() > 1e-4).all()


def test_the_critic_computes_no_vocabulary_logits_and_draws_no_random_numbers():
    task, tok, model = tiny_policy()
    state = torch.get_rng_state()
    base, scratch = critic_for(model, "base"), critic_for(model, "scratch")
    assert torch.equal(torch.get_rng_state(), state)  # the prompts and samples stay those of the parent's run
    backbone = sum(p.numel() for p in model.base_model.parameters())
    hidden = model.config.hidden_size
    for critic in (base, scratch):  # the backbone and a (hidden -> 1) head, no LM head
        assert sum(p.numel() for p in critic.parameters()) == backbone + hidden + 1
        assert (critic.head.weight == 0).all() and (critic.head.bias == 0).all()
    rollout, _ = ragged_rollout(tok, task, 2, 2)
    assert (base.score(rollout) == 0).all()  # a zero head: V = 0 before the first update
    pairs = list(zip(model.base_model.parameters(), base.backbone.parameters(), scratch.backbone.parameters()))
    assert all(torch.equal(p, b) and p.data_ptr() != b.data_ptr() for p, b, _ in pairs)  # a copy, not shared
    assert not all(torch.equal(p, s) for p, _, s in pairs)  # fresh weights


class NoBackbone(torch.nn.Module):
    """A causal LM stand-in whose base_model is itself (no submodule under its LM head)."""

    def __init__(self):
        super().__init__()
        self.lm_head = torch.nn.Linear(4, 10)

    @property
    def base_model(self):
        return self

    def get_output_embeddings(self):
        return self.lm_head


def test_a_model_without_a_backbone_stops_with_one_sentence(capsys):
    with pytest.raises(SystemExit) as e:
        ppo.Critic(NoBackbone(), ppo.Args(model="some/model"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: --model 'some/model'") and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# Micro-batches: both models' gradients and every logged value, whatever --micro_batch is.

P, G = 3, 4


def ppo_batch():
    task, tok, model = tiny_policy()
    rollout, _ = ragged_rollout(tok, task, P, G)
    critic = critic_for(model)
    torch.nn.init.normal_(critic.head.weight, std=0.3)
    torch.manual_seed(1)
    n, t = rollout.completion_ids.shape
    mask = rollout.completion_mask
    with torch.no_grad():
        now, values = tt.token_logprobs(model, rollout)[0], critic(rollout)
    old, ref = now + 0.3 * torch.randn(n, t), now + 0.3 * torch.randn(n, t)
    old_values = values + 0.3 * torch.randn(n, t)  # V - V_old spread across the value clip's band
    returns, adv = torch.rand(n, t) * mask, ppo.whiten(torch.randn(n, t), mask)
    return model, critic, rollout, adv, returns, old, old_values, ref


def compare_micro_batches(model, critic, run):
    both = torch.nn.ModuleList([model, critic])  # one stand-in optimizer keeps both models' gradients
    results = {}
    for mb in (0, 1, 2):
        args = ppo.Args(group_size=G, prompts_per_step=P, micro_batch=mb, max_grad_norm=1e9)
        results[mb] = gradient_and_log(both, lambda opt: run(opt, args))
    return assert_same_update(results)


def test_ppo_micro_batches_are_exact_for_both_models(monkeypatch):
    model, critic, rollout, adv, returns, old, old_values, ref = ppo_batch()
    run = lambda opt, a: ppo.update(model, opt, critic, opt, rollout, adv, returns, old, old_values, ref, 1, a)
    compare_micro_batches(model, critic, run)
    # the value loss divided by each micro-batch's own token count (TRL's masked_mean per micro-batch)
    own = ppo.value_loss
    monkeypatch.setattr(ppo, "value_loss", lambda v, o, r, mask, c, tokens: own(v, o, r, mask, c, mask.sum()))
    with pytest.raises(AssertionError, match="gradient differs"):
        compare_micro_batches(model, critic, run)


# ---------------------------------------------------------------------------------------------
# The file as a user runs it.


def test_two_steps_end_to_end(short_run):
    p = short_run("minimal_ppo.py", *SHORT["ppo"])
    lines = p.stdout.strip().splitlines()
    assert list(step_line(p, 2)) == SHARED_KEYS + OWN_KEYS  # the shared keys first, the method's own after
    assert step_line(p)["value"] == "0.0000"  # the head starts at zero
    assert lines[-1].startswith("final test_acc=") and " time_s=" in lines[-1]


def test_first_batch_is_grpos_when_the_budget_is(run_fast):
    # building the critic draws no random numbers, so at GRPO's 32 x 8 the first sampled batch is GRPO's
    args = ["--steps", 1, "--warmup_steps", 2, "--eval_every", 0, "--prompts_per_step", 4, "--group_size", 8]
    a, b = step_line(run_fast("minimal_ppo.py", *args)), step_line(run_fast("minimal_grpo.py", *args))
    assert all(a[k] == b[k] for k in ("reward", "len", "gen_tokens", "len_wrong"))


def test_pretrained_model_from_a_local_folder(run_fast, tmp_path):
    task, tok, model = tiny_policy()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    p = run_fast("minimal_ppo.py", "--model", tmp_path, *FAST, "--critic_init", "scratch")
    assert p.returncode == 0, p.stderr


# ---------------------------------------------------------------------------------------------
# The loop's wiring of the two models' targets, spied on in a two-step run with two epochs and two
# micro-batches: the critic learns towards the raw GAE returns, the policy from the whitened advantages.


def test_critic_learns_the_raw_gae_returns_and_only_the_policy_gets_whitened_advantages(monkeypatch, run_fast):
    seen, gae = {"gae": [], "update": [], "value_loss": [], "policy_loss": []}, ppo.gae

    def spy(name, keep):  # record keep(args) before the call: an update records where its loss calls start
        real = getattr(ppo, name)

        def call(*a, **k):
            seen[name].append(keep(a))
            return real(*a, **k)
        monkeypatch.setattr(ppo, name, call)
    spy("gae", lambda a: a)
    spy("update", lambda a: (a, len(seen["value_loss"])))
    spy("value_loss", lambda a: a[2])  # the returns it is given
    spy("policy_loss", lambda a: a[3])  # the advantages it is given
    p = run_fast("minimal_ppo.py", *FAST, "--epochs", 2, "--micro_batch", 2)
    assert p.returncode == 0, p.stderr
    assert len(seen["gae"]) == 2 and len(seen["update"]) == 4
    moved = 0.0
    for i, (rewards, values, mask, gamma, lam) in enumerate(seen["gae"]):
        raw_adv, raw_returns = gae(rewards, values, mask, gamma, lam)  # what the loop got back
        assert torch.allclose(raw_returns, (raw_adv + values) * mask)  # R_t = A_t + V_t, before whitening
        for a, first in seen["update"][2 * i:2 * i + 2]:  # both epochs of this step
            adv, returns, old_values = a[5], a[6], a[8]
            assert torch.equal(old_values, values)  # the baseline the returns were built on
            assert torch.equal(returns, raw_returns), "the critic's target is not the raw GAE return"
            assert torch.allclose(adv, ppo.whiten(raw_adv, mask), atol=1e-6), "the policy's advantage is not whitened"
            # and what each micro-batch's loss is given: the same tensors, row slice by row slice
            parts = range(first, first + 2)
            assert torch.equal(torch.cat([seen["value_loss"][j] for j in parts]), raw_returns)
            assert torch.equal(torch.cat([seen["policy_loss"][j] for j in parts]), adv)
        moved = max(moved, (raw_adv - ppo.whiten(raw_adv, mask)).abs().max())
    assert moved > 0.1  # whitening moved the advantages: on a batch where it did not, nothing would show
