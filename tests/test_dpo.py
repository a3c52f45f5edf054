"""minimal_dpo.py's temperature: pi and pi_ref are scored at temperature 1, as TRL's DPO and online-DPO
trainers score them, whatever --temperature sampled the pairs; the logged entropy stays that of the
distribution the tokens were sampled from. (At the default --temperature 1 the two are the same numbers,
so the default run prints what it printed before.)"""
import copy

import pytest
import torch

import microbatch as mbt
import minimal_dpo as dpo
import toy_tasks as tt

FAST = ["--steps", 2, "--warmup_steps", 10, "--eval_every", 0, "--prompts_per_step", 4]


def sampled_pairs(temperature):
    """Three pairs from a ragged batch said to be sampled at `temperature`: each group's best against its
    worst by a made-up reward."""
    task, tok, model = mbt.tiny_policy()
    rollout, _ = mbt.ragged_rollout(tok, task, 3, 4, temperature=temperature)
    rewards = torch.tensor([[0.0, 1.0, 0.5, 0.2], [0.9, 0.1, 0.3, 0.4], [0.2, 0.4, 0.0, 1.0]])
    chosen, rejected, _ = dpo.make_pairs(rewards)
    return model, dpo.pair_rows(rollout, chosen, rejected)


def dpo_loss_at(model, pairs, ref, temperature, beta=0.1):
    logp, entropy = tt.token_logprobs(model, pairs, temperature)
    margin = dpo.sequence_logratios(logp, ref, pairs.completion_mask) @ torch.tensor([1.0, -1.0])
    return -torch.nn.functional.logsigmoid(beta * margin).sum() / len(margin), entropy


def test_update_scores_the_policy_at_temperature_one_and_logs_the_sampling_entropy():
    model, pairs = sampled_pairs(0.7)
    mask = pairs.completion_mask
    torch.manual_seed(0)
    with torch.no_grad():
        old = tt.token_logprobs(model, pairs, 1.0)[0]
    ref = old + 0.3 * torch.randn_like(old)
    args = dpo.Args(group_size=4, prompts_per_step=3, micro_batch=1, max_grad_norm=1e9)
    grad, log = mbt.gradient_and_log(model, lambda opt: dpo.update(model, opt, pairs, old, ref, 1, args))
    grads = {}
    for temperature in (1.0, 0.7):
        model.zero_grad()
        loss, entropy = dpo_loss_at(model, pairs, ref, temperature)
        loss.backward()
        grads[temperature] = torch.cat([p.grad.flatten() for p in model.parameters()])
        if temperature == 1.0:
            assert log["value0"] == pytest.approx(loss.item(), rel=1e-5)
        else:  # the entropy logged: the distribution the tokens were sampled from, at 0.7
            assert log["value2"] == pytest.approx(((entropy * mask).sum() / mask.sum()).item(), rel=1e-5)
    assert torch.allclose(grad, grads[1.0], atol=1e-6), "the policy is not scored at temperature 1"
    assert ((grads[0.7] - grads[1.0]).norm() / grads[1.0].norm()) > 0.05  # 0.7 would read differently
    assert log["ratio"] == pytest.approx(1.0, abs=1e-6)  # pi_old and pi at the same temperature


def test_the_loop_scores_pi_old_and_the_reference_at_temperature_one(monkeypatch, run_fast):
    seen, setup, update = {}, tt.setup, dpo.update

    def spy_setup(*a, **k):
        out = setup(*a, **k)
        seen["base"] = copy.deepcopy(out[1])
        out[0].test = out[0].test[:32]  # 32 held-out prompts: the evaluation plays no part here
        return out

    def spy_update(model, optimizer, pairs, old_logp, ref_logp, step, args):
        seen.setdefault("calls", []).append((copy.deepcopy(model), pairs, old_logp, ref_logp))
        return update(model, optimizer, pairs, old_logp, ref_logp, step, args)
    monkeypatch.setattr(tt, "setup", spy_setup)
    monkeypatch.setattr(dpo, "update", spy_update)
    p = run_fast("minimal_dpo.py", *FAST, "--temperature", 0.7)
    assert p.returncode == 0, p.stderr
    assert len(seen["calls"]) == 2
    gap = 0.0
    for sampler, pairs, old_logp, ref_logp in seen["calls"]:  # one epoch: the model that sampled
        mask = pairs.completion_mask
        assert pairs.temperature == 0.7 and mask.sum() > 0
        for got, model in ((old_logp, sampler), (ref_logp, seen["base"])):
            assert torch.allclose(got * mask, tt.score(model, pairs, temperature=1.0)[0] * mask, atol=1e-5)
            gap = max(gap, ((got - tt.score(model, pairs)[0]) * mask).abs().max().item())  # at 0.7
    assert gap > 0.1
