"""Tests of minimal_pg.py: the leave-one-out advantage and the diagnostics against hand-worked numbers, the
update's pi_old, and the file run as a user runs it. (Its k3, its unclipped diagnostics, its wiring in the
main loop, its micro-batches, its repeatability and its bad flags are checked with every file's, in
test_every_file.py.)"""
import math

import pytest
import torch

import minimal_pg as pg
from conftest import SHORT, check_two_steps_end_to_end, gradient_and_log, ragged_rollout, tiny_policy


# ---------------------------------------------------------------------------------------------------------
# The advantage and the diagnostics against numbers worked out by hand.


def test_pg_leave_one_out_advantage():
    # r = [1, 0, 0, 0]: A_0 = 1 - mean(0, 0, 0) = 1;  A_1 = 0 - mean(1, 0, 0) = -1/3.
    adv = pg.group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]]))
    assert torch.allclose(adv[0], torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))
    assert torch.equal(adv[1], torch.zeros(4))  # no signal when the group agrees


def test_pg_diagnostics_hand_worked():
    # the ratio, drift share and k3 are computed, not fed: pi_old = 0.5 and pi = 0.5, 0.75, 0.25 and a
    # padded token. ratio = 1, 1.5, 0.5 -> mean 1; |ratio - 1| > 0.2 on 2 of 3 tokens;
    # k3 = 0, (2/3 - ln(2/3) - 1) = 0.072132, (2 - ln 2 - 1) = 0.306853 -> mean 0.126328
    logp = torch.log(torch.tensor([[0.5, 0.75], [0.25, 0.9]]))
    stats = pg.policy_loss(logp, torch.full((2, 2), math.log(0.5)), torch.tensor([1.0, -1.0]),
                           torch.tensor([[1.0, 1.0], [1.0, 0.0]]), 2)[1]
    assert stats["ratio"].item() == pytest.approx(1.0) and stats["clip_frac"].item() == pytest.approx(2 / 3)
    assert stats["kl"].item() == pytest.approx(0.126328, abs=1e-6)


def test_pg_update_takes_pi_old_from_the_same_pass():
    # one update per batch: the ratio is exactly 1, nothing drifts and the kl to pi_old is exactly 0,
    # as the update itself computes them (not as a test that feeds logp as old_logp would)
    task, tok, model = tiny_policy()
    rollout, _ = ragged_rollout(tok, task, 3, 4)
    args = pg.Args(group_size=4, prompts_per_step=3, max_grad_norm=1e9)
    _, log = gradient_and_log(model, lambda opt: pg.update(model, opt, rollout, torch.randn(12), 1, args))
    assert log["ratio"] == 1.0 and log["clip_frac"] == 0.0 and log["kl"] == 0.0


# ---------------------------------------------------------------------------------------------------------
# The file as a user runs it.


def test_two_steps_end_to_end(short_run):
    check_two_steps_end_to_end(short_run("minimal_pg.py", *SHORT["pg"]))
