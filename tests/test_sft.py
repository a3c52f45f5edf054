"""minimal_sft.py's loop, spied on in a two-step run: the loss's normaliser counts the target's tokens
only (each answer's characters and its EOS), never the prompt's, the padding, or one micro-batch's."""
import pytest

import minimal_sft as sft
import toy_tasks as tt

# demos: they need no competent base, and their answers are ragged. --source best trains through the same
# update() (test_every_file.py runs it); its targets need a base that gets one of 8 samples fully right.
FAST = ["--steps", 2, "--warmup_steps", 2, "--eval_every", 0, "--prompts_per_step", 4, "--micro_batch", 2]


def test_the_normaliser_counts_only_the_targets_tokens(monkeypatch, run_fast):
    updates, losses = [], []
    update, sft_loss = sft.update, sft.sft_loss

    def spy_update(model, optimizer, rollout, step, args):
        before, first = {k: v.clone() for k, v in model.state_dict().items()}, len(losses)
        out = update(model, optimizer, rollout, step, args)
        updates.append((model, before, rollout, out[0], first))
        return out
    monkeypatch.setattr(sft, "update", spy_update)
    setup = tt.setup

    def short_setup(*a, **k):  # 32 held-out prompts: the evaluation plays no part here
        out = setup(*a, **k)
        out[0].test = out[0].test[:32]
        return out
    monkeypatch.setattr(tt, "setup", short_setup)
    monkeypatch.setattr(sft, "sft_loss", lambda *a: losses.append(a[3]) or sft_loss(*a))
    p = run_fast("minimal_sft.py", *FAST, "--source", "demo")
    assert p.returncode == 0, p.stderr
    for model, before, rollout, loss, first in updates:
        # the target's tokens, counted from its text: one token per character, plus the EOS it ends with
        targets = sum(len(t) + (not cut) for t, cut in zip(rollout.texts, rollout.truncated.tolist()))
        assert targets == rollout.completion_mask.sum()
        assert targets < rollout.completion_mask.numel()  # ragged targets: the padding would count otherwise
        parts = losses[first:first + len(tt.micro_batches(len(rollout.texts), 2))]  # this update's micro-batches
        assert parts and all(tokens == targets for tokens in parts), \
            f"the normaliser is {parts}, the targets hold {targets} tokens"
        # and the loss the update reports is the mean NLL over those tokens, under the policy it started from
        after = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(before)
        logp, _ = tt.score(model, rollout)
        model.load_state_dict(after)
        assert float(loss) == pytest.approx(-(logp * rollout.completion_mask).sum().item() / targets, rel=1e-5)
    assert len(updates) == 2
