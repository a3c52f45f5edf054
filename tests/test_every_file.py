"""The checks run over every file: each test here is parametrised over the files it applies to (each file's
own tests are in tests/test_<method>.py). First, every file's main loop watched while it runs (the spies
below); then flat groups get advantage exactly 0; one reference clipped surrogate (conftest.reference_clip)
against every clipped loss, k3 and its gradient in every file, the unclipped files' diagnostics, each
clipped update() on a ragged batch; the wiring of the GRPO family's, PG's and DG's main loops (conftest.Spy);
micro-batches (whole groups, exact gradients, the same step line end to end); the same seed prints the same
lines, in one process and across processes (slow); bad flags stop with one sentence; two steps on tokrev;
and every default run learns (slow).

Every file's main loop, watched while it runs. The unit tests check each function on given inputs; these
check that the loop hands each function the right inputs, step after step. Each file runs once, in process,
for 2 steps (2 inner epochs where it has them) at --temperature 0.7 and --max_grad_norm 1e-4, with spies on
its optimizers, its update calls, the sampler, the held-out evaluation and every forward pass; the tests
below read what the spies saw. At step 1 the policy still equals its reference and every optimizer holds one
fresh gradient, so a check that looked at step 1 only would miss most wiring bugs: these read every step.

- the reference (the GRPO family's KL, PPO's reward KL, DPO's log-ratio) is the frozen base while the policy
  moves, scored at the temperature the file names;
- each optimizer holds exactly its own model's parameters (PPO's critic, the pedagogical teacher and its
  student too), finds no gradient left over at any step (each step's gradients are poisoned with NaN after
  it, and at the optimizer's birth), and steps once per update call, never outside one; OPD's teacher is in
  none and never moves;
- the gradient-norm clip is applied: every step sees a gradient of norm max_grad_norm, not only a logged one;
- held-out evaluation decodes greedily with the policy being trained (VPO: its own test-time search, on it);
- every training sample is drawn at --temperature, and the logged entropy is that distribution's;
- dropout is off in every model that runs a forward pass: the --model (and OPD's --teacher) is a tiny Llama
  saved with attention_dropout 0.1."""
import copy
import importlib
import inspect
import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minimal_dapo as dapo
import minimal_dg as dg
import minimal_dpo as dpo
import minimal_drgrpo as drgrpo
import minimal_grpo as grpo
import minimal_opd as opd
import minimal_pedagogical as ped
import minimal_pg as pg
import minimal_ppo as ppo
import minimal_tpo as tpo
import minimal_tree_grpo as tree
import minimal_vpo as vpo
import toy_tasks as tt
from conftest import (IN_SITU, ROOT, SHORT, KeepGradient, Spy, check_epochs, check_update_in_situ, compare,
                      gradient_and_log, ragged_rollout, reference_clip, run_main, score, seq_mean, step_line,
                      strip_time, tiny_policy)

NAMES = ["pg", "grpo", "drgrpo", "dapo", "tpo", "dg", "vpo", "pedagogical", "opd", "tree_grpo", "ppo", "sft", "dpo"]
MODULES = {name: importlib.import_module(f"minimal_{name}") for name in NAMES}
TEMPERATURE, MAX_NORM, STEPS = 0.7, 1e-4, 2
FAST = ["--steps", STEPS, "--eval_every", 0, "--prompts_per_step", 4, "--device", "cpu",
        "--temperature", TEMPERATURE, "--max_grad_norm", MAX_NORM]
# the saved model already copies (see saved_models): no teacher warm-up is needed for rewards that differ
EXTRA = {"pedagogical": ["--teacher_warmup_steps", 0, "--teacher_mix_steps", 0, "--student_batch", 8],
         "sft": ["--source", "best", "--prompts_per_step", 8],  # sampled targets, some of them fully right
         "opd": ["--teacher_min_acc", 0],  # and --teacher, the saved one
         "vpo": ["--eval_chains", 3],
         "tree_grpo": ["--trees", 2]}
# groups of 4; DAPO, SFT, DPO and the pedagogical teacher keep 8, as they filter, pair or gate their groups
for name in ("pg", "grpo", "drgrpo", "tpo", "dg", "vpo"):
    EXTRA[name] = EXTRA.get(name, []) + ["--group_size", 4]
EPOCHS = {name: 2 if "epochs" in MODULES[name].Args.__dataclass_fields__ else 1 for name in NAMES}
# where the reference's log-probs enter update(): (argument, the temperature they are taken at). DPO scores
# pi and pi_ref at 1, as TRL does; the others at the temperature that sampled the tokens.
REFERENCE = {"grpo": (5, TEMPERATURE), "drgrpo": (5, TEMPERATURE), "vpo": (5, TEMPERATURE),
             "tree_grpo": (5, TEMPERATURE), "ppo": (9, TEMPERATURE), "dpo": (4, 1.0)}
ROLLOUT = {"ppo": 4}  # update()'s rollout argument; 2 in every other file
EVALUATING = ("evaluate", "search", "sampled_exact")  # sampling there is evaluation, not training


def live_dropout(model):
    """The dropout settings still on in a model: an nn.Dropout with p > 0, or a float *dropout / *pdrop
    setting above 0 on a module (Llama's attention reads `attention_dropout` at each call)."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            found.append(name)
        found += [f"{name}.{k}" for k, v in vars(module).items()
                  if isinstance(v, float) and v > 0 and ("dropout" in k or k.endswith("pdrop"))]
    return found


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """A tiny Llama warmed up on the keyed task's two views at once, saved with attention dropout 0.1: the
    prompt alone -> its reversal (the default base's warm-up, so it reverses as a base does), and the
    teacher view -> a listed answer (so the pedagogical teacher, a copy of it, already gets groups whose
    rewards differ). OPD's --teacher is the same model 20 warm-up steps earlier. keyed, reverse and the
    answer-set task share the alphabet, so the one tokenizer serves every file."""
    assert tt.KeyedReverseTask.alphabet == tt.AnswerSetTask.alphabet == tt.ReverseTask.alphabet
    root, task = tmp_path_factory.mktemp("dropout_models"), tt.make_task("keyed")
    tok, rng = tt.build_char_tokenizer(task.alphabet), random.Random(0)
    view = lambda ex: tt.copy_view(task, ex) if rng.random() < 0.5 else (ex.prompt, ex.answer)
    paths = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tt.build_tiny_model(tok)
        for name, steps in (("teacher", 40), ("policy", 20)):
            tt.supervised_warmup(model, tok, task, steps, len(paths), batch=16, view=view)
            model.config.attention_dropout = 0.1
            paths[name] = root / name
            model.save_pretrained(paths[name])
            tok.save_pretrained(paths[name])
    return paths


class Watch:
    """The spies of one run, and what they saw."""

    def __init__(self, mp, name):
        self.mp, self.name, self.module = mp, name, MODULES[name]
        self.context, self.optimizers, self.updates, self.samples, self.evals = [], [], [], [], []
        self.dropout, self.stale, self.kl_inputs, self.teacher = [], [], [], None
        setup, sample, forward = tt.setup, tt.sample, tt.forward
        signature = inspect.signature(sample)

        def spy_setup(*a, **k):
            out = setup(*a, **k)
            self.task, self.policy, self.tok = out[0], out[1], out[2]
            self.base = copy.deepcopy(out[1])  # the policy as built: the reference must stay this
            return out

        def spy_sample(*a, **k):
            bound = signature.bind(*a, **k)
            bound.apply_defaults()
            self.samples.append((bound.arguments["model"], bound.arguments["temperature"],
                                 bound.arguments["greedy"], tuple(self.context)))
            return sample(*a, **k)

        def spy_forward(model, *a, **k):
            on = live_dropout(model)
            if on:
                self.dropout.append((type(model).__name__, on[:3]))
            return forward(model, *a, **k)

        mp.setattr(tt, "setup", spy_setup)
        mp.setattr(tt, "sample", spy_sample)
        mp.setattr(tt, "forward", spy_forward)
        mp.setattr(torch.optim, "AdamW", self.optimizer_class())
        self.within(tt, "supervised_warmup", "warmup")
        self.within(tt, "evaluate", "evaluate", self.evals)
        self.within(tt, "evaluate_teacher", "evaluate")
        self.within(tt, "sampled_exact", "sampled_exact")
        self.within(tt, "load_teacher", "load_teacher")
        if name == "vpo":
            self.within(self.module, "evaluate", "search", self.evals)
        for fn in ("update", "student_update"):
            if hasattr(self.module, fn):
                self.watch_update(fn)
        if name == "ppo":
            token_rewards = self.module.token_rewards
            mp.setattr(self.module, "token_rewards",
                       lambda *a, **k: self.kl_inputs.append(a[1:3]) or token_rewards(*a, **k))

    def within(self, owner, fn, label, record=None):
        """Mark the calls of owner.fn (and all they call) with `label`; record (args, output, context)."""
        real = getattr(owner, fn)

        def spy(*a, **k):
            outer = tuple(self.context)
            self.context.append(label)
            try:
                out = real(*a, **k)
            finally:
                self.context.pop()
            if label == "load_teacher":
                self.teacher, self.teacher_at_load = out[0], copy.deepcopy(out[0])
            if record is not None:
                record.append((a, out, outer))
            return out
        self.mp.setattr(owner, fn, spy)

    def watch_update(self, fn):
        """Record each call of the file's update function: its arguments, a copy of the model it was given as
        it was before the call, the training step, and how many times each optimizer stepped during it."""
        real = getattr(self.module, fn)

        def spy(*a, **k):
            before, counts = copy.deepcopy(a[0]), [o.steps for o in self.optimizers]
            out = real(*a, **k)
            step = next(x for x in a if type(x) is int)  # the one whole-number argument
            self.updates.append({"fn": fn, "args": a, "out": out, "before": before, "step": step,
                                 "stepped": [o.steps - c for o, c in zip(self.optimizers, counts)]})
            return out
        self.mp.setattr(self.module, fn, spy)

    def optimizer_class(self):
        """AdamW that, outside a supervised warm-up, registers itself, poisons its parameters' gradients with
        NaN at birth and after every step (a step that finds one has not started from zero), and records
        the norm of the gradient each step is given."""
        watch = self

        class WatchedAdamW(torch.optim.AdamW):
            def __init__(self, params, *a, **k):
                super().__init__(params, *a, **k)
                self.watched, self.steps, self.norms = "warmup" not in watch.context, 0, []
                if self.watched:
                    watch.optimizers.append(self)
                    self.poison()

            def held(self):
                return [p for group in self.param_groups for p in group["params"]]

            def poison(self):
                for p in self.held():
                    p.grad = torch.full_like(p, math.nan)

            def step(self, closure=None):
                if not self.watched:
                    return super().step(closure)
                grads = [p.grad for p in self.held() if p.grad is not None]
                if not all(torch.isfinite(g).all() for g in grads):
                    watch.stale.append((watch.optimizers.index(self), self.steps + 1))
                    for g in grads:
                        g.nan_to_num_(0.0)  # let the run go on: the test that reads `stale` fails
                self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()
                                  if grads else 0.0)
                self.steps += 1
                out = super().step(closure)
                self.poison()
                return out
        return WatchedAdamW


RUNS = {}


def watched(name, paths):
    """The file's watched run, once per session whichever tests ask for it."""
    if name not in RUNS:
        extra = EXTRA.get(name, []) + (["--teacher", paths["teacher"]] if name == "opd" else [])
        with pytest.MonkeyPatch.context() as mp:
            watch = Watch(mp, name)
            try:
                watch.p = run_main(f"minimal_{name}.py", *FAST, "--model", paths["policy"], *extra,
                                   *(["--epochs", 2] if EPOCHS[name] > 1 else []))
            except Exception as e:  # a crash fails every test of the file, without running it again
                watch.p = e
        RUNS[name] = watch
    watch = RUNS[name]
    if isinstance(watch.p, Exception):
        raise watch.p
    assert watch.p.returncode == 0, watch.p.stderr[-3000:]
    return watch


def rollout_of(name, update):
    return update["args"][ROLLOUT.get(name, 2)]


def is_empty(rollout):  # SFT and DPO step on nothing when no target or no pair was kept
    return rollout.completion_ids.size(0) == 0


def masked_mean(x, mask):
    return ((x * mask).sum() / mask.sum()).item()


def step_lines(stdout):
    return [dict(kv.split("=") for kv in line.split()) for line in stdout.splitlines() if line.startswith("step=")]


# ---------------------------------------------------------------------------------------------------------
# The reference: the frozen base, at every step (at step 2 the policy has moved away from it).


@pytest.mark.parametrize("name", list(REFERENCE))
def test_the_reference_is_the_frozen_base_while_the_policy_moves(saved_models, name):
    w = watched(name, saved_models)
    index, temperature = REFERENCE[name]
    updates = [u for u in w.updates if u["fn"] == "update" and not is_empty(rollout_of(name, u))]
    refs = [(u["step"], rollout_of(name, u), u["args"][index], u["before"]) for u in updates]
    if name == "ppo":  # the KL that enters the reward, one call per step, besides the logged one
        refs += [(step, rollout_of(name, next(u for u in updates if u["step"] == step)), ref, None)
                 for step, (_, ref) in enumerate(w.kl_inputs, 1)]
    moved = 0.0
    for step, rollout, ref, before in refs:
        mask = rollout.completion_mask
        base, _ = tt.score(w.base, rollout, temperature=temperature)
        assert ((ref - base) * mask).abs().max() < 1e-5, f"step {step}: the reference is not the frozen base"
        if before is not None and step >= 2:
            now, _ = tt.score(before, rollout, temperature=temperature)
            moved = max(moved, ((now - base) * mask).abs().max())
    assert {step for step, *_ in refs} == set(range(1, STEPS + 1))
    assert moved > 1e-3, "the policy never moved from the base: the check would prove nothing"


# ---------------------------------------------------------------------------------------------------------
# The optimizers: each holds its own model, starts every step from zero gradients, steps once per update.


def trained_models(name, w):
    """{model: the update function whose first argument it is}: the models the file trains."""
    first = lambda fn: next(u["args"][0] for u in w.updates if u["fn"] == fn)
    if name == "pedagogical":
        return {id(first("update")): "update", id(first("student_update")): "student_update"}
    return {id(w.policy): "update"}


def param_ids(params):
    return {id(p) for p in params}


@pytest.mark.parametrize("name", NAMES)
def test_each_optimizer_holds_its_own_model_and_steps_once_per_update(saved_models, name):
    w = watched(name, saved_models)
    models = trained_models(name, w)
    assert len(models) == (2 if name == "pedagogical" else 1)  # the pedagogical teacher is not its student
    pairs = []  # (model, optimizer) as each update call is given them
    for u in w.updates:
        a = u["args"]
        assert id(a[0]) in models and models[id(a[0])] == u["fn"], f"{u['fn']} trains another model"
        pairs.append((a[0], a[1]))
        if name == "ppo":
            assert isinstance(a[2], MODULES["ppo"].Critic)
            pairs.append((a[2], a[3]))  # the critic and its optimizer
    owners = {}
    for model, optimizer in pairs:
        assert param_ids(optimizer.held()) == param_ids(model.parameters()), \
            f"an optimizer given to {type(model).__name__}'s update holds other parameters"
        owners.setdefault(id(optimizer), id(model))
        assert owners[id(optimizer)] == id(model)
    assert sorted(map(id, w.optimizers)) == sorted(owners), "an optimizer steps that no update is given, or none"
    assert len(set(owners.values())) == len(owners) == (2 if name in ("ppo", "pedagogical") else 1)
    # each update call steps its own optimizers once each and no other; nothing steps outside an update
    for u in w.updates:
        mine = {id(u["args"][1])} | ({id(u["args"][3])} if name == "ppo" else set())
        empty = u["fn"] == "update" and is_empty(rollout_of(name, u))
        want = [0 if empty else int(id(o) in mine) for o in w.optimizers]
        assert u["stepped"] == want, f"step {u['step']}: optimizer steps {u['stepped']}, want {want}"
    inside = [sum(u["stepped"][i] for u in w.updates) for i in range(len(w.optimizers))]
    assert [o.steps for o in w.optimizers] == inside, "an optimizer stepped outside an update call"
    for step in range(1, STEPS + 1):
        assert sum(u["fn"] == "update" and u["step"] == step for u in w.updates) == EPOCHS[name]
    if name == "opd":  # the teacher: in no optimizer, never moved
        assert w.teacher is not None and not param_ids(w.teacher.parameters()) & set().union(
            *(param_ids(o.held()) for o in w.optimizers))
        assert all(torch.equal(a, b) for a, b in zip(w.teacher.parameters(), w.teacher_at_load.parameters()))


@pytest.mark.parametrize("name", NAMES)
def test_every_step_starts_from_zero_gradients_and_is_clipped(saved_models, name):
    w = watched(name, saved_models)
    assert not w.stale, f"(optimizer, step) that found a gradient from before the update: {w.stale}"
    for i, o in enumerate(w.optimizers):
        assert o.steps > 0 and max(o.norms) <= MAX_NORM * (1 + 1e-3), \
            f"optimizer {i} stepped on gradient norms {o.norms}: the clip at {MAX_NORM} was not applied"
        assert max(o.norms) > MAX_NORM / 2, f"optimizer {i} only ever saw gradients below the clip: {o.norms}"


# ---------------------------------------------------------------------------------------------------------
# Sampling, evaluation and the logged entropy.


@pytest.mark.parametrize("name", NAMES)
def test_held_out_evaluation_is_greedy_with_the_policy_being_trained(saved_models, name):
    w = watched(name, saved_models)
    evals = [(a, out) for a, out, outer in w.evals if "load_teacher" not in outer]  # not OPD's teacher check
    assert len(evals) == 2 and all(a[0] is w.policy for a, _ in evals), "evaluated another model"
    if name == "vpo":  # its own test-time search: chains at 0.7 by design, on the policy
        return
    assert all(greedy for *_, greedy, context in w.samples if context[-1:] == ("evaluate",))
    # the last evaluation is a greedy decode of the trained policy, as computed here
    a, (acc, exact, extra) = evals[-1]
    ids, mask = tt.encode(w.tok, [ex.prompt for ex in w.task.test], "cpu")
    rollout = tt.sample(w.policy, w.tok, ids, mask, a[4], greedy=True)
    _, entropy = tt.score(w.policy, rollout, temperature=1.0)
    want_acc, want_exact = w.task.test_metrics(rollout.texts, w.task.test)
    assert (acc, exact) == pytest.approx((want_acc, want_exact), abs=1e-9)
    got_entropy = extra["entropy"] if isinstance(extra, dict) else extra
    assert got_entropy == pytest.approx(masked_mean(entropy, rollout.completion_mask), rel=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_training_samples_at_the_temperature_and_logs_its_entropy(saved_models, name):
    w = watched(name, saved_models)
    training = [(t, greedy) for _, t, greedy, context in w.samples if not set(context) & set(EVALUATING)]
    assert training and all(t == TEMPERATURE and not greedy for t, greedy in training), set(training)
    lines = step_lines(w.p.stdout)
    assert [int(line["step"]) for line in lines] == list(range(1, STEPS + 1))
    gap = 0.0
    for line in lines:  # the logged entropy: the last update's, over its batch, at the sampling temperature
        u = [u for u in w.updates if u["fn"] == "update" and u["step"] == int(line["step"])][-1]
        rollout = rollout_of(name, u)
        if is_empty(rollout):
            continue
        mask = rollout.completion_mask
        want = masked_mean(tt.score(u["before"], rollout, temperature=TEMPERATURE)[1], mask)
        assert float(line["entropy"]) == pytest.approx(want, abs=1.5e-4), f"step {line['step']}"
        gap = max(gap, abs(want - masked_mean(tt.score(u["before"], rollout, temperature=1.0)[1], mask)))
    assert gap > 0.01  # the entropy at temperature 1 would read differently


# ---------------------------------------------------------------------------------------------------------
# Dropout: off in every model that runs a forward pass, whatever the checkpoint says.


@pytest.mark.parametrize("name", NAMES)
def test_dropout_is_off_in_every_model_the_file_runs(saved_models, name):
    w = watched(name, saved_models)
    assert not w.dropout, f"forward passes with dropout on: {w.dropout[:3]}"


def test_no_dropout_switches_off_every_kind(saved_models):
    """A Llama's attention dropout (a float its attention reads) and GPT-2's nn.Dropout modules: on in the
    checkpoints, so a training-mode forward pass is noisy, and off after tt.no_dropout: two passes agree,
    and agree with evaluation mode."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    llama = AutoModelForCausalLM.from_pretrained(saved_models["policy"])
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=12, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    ids = torch.randint(0, 10, (2, 8))
    for model in (llama, gpt2):
        model.train()
        assert live_dropout(model) and not torch.equal(model(ids).logits, model(ids).logits)
        assert tt.no_dropout(model) is model and not live_dropout(model)
        assert not [k for k, v in vars(model.config).items() if "dropout" in k and isinstance(v, float) and v > 0]
        train = model(ids).logits
        assert torch.equal(train, model(ids).logits) and torch.allclose(train, model.eval()(ids).logits, atol=1e-6)
    loaded, _ = tt.load_pretrained(str(saved_models["policy"]))
    assert not live_dropout(loaded)  # every --model and --teacher goes through this


# ---------------------------------------------------------------------------------------------------------
# Flat groups: equal rewards whose float32 group mean is one rounding step off get advantage exactly 0.


# Equal rewards whose float32 group mean is one rounding step off (r - mean = +-3e-8 or 6e-8): 9 of the
# 19 per-character reward values k/n with n <= 7 do this in a group of 8. The advantage must still be
# exactly 0, not 1e-8 (PG, Dr. GRPO) nor 6e-4 (GRPO: the residue divided by std + 1e-4).
RESIDUE_GROUPS = torch.tensor([[0.6] * 8, [1 / 3] * 8, [2 / 5] * 8, [5 / 6] * 8, [0.3] * 8])


@pytest.mark.parametrize("module", [pg, grpo, drgrpo, dapo], ids=["pg", "grpo", "drgrpo", "dapo"])
def test_flat_group_advantage_is_exactly_zero(module):
    # the residue is real (else the test would prove nothing): r - mean is 3e-8 or 6e-8, not 0. The
    # population std of these groups comes out exactly 0 here, but a lone group's (one row) is 6e-8.
    assert (RESIDUE_GROUPS - RESIDUE_GROUPS.mean(1, keepdim=True)).abs().amax(1).min() > 0
    assert torch.equal(module.group_advantages(RESIDUE_GROUPS), torch.zeros(5, 8))
    for row in RESIDUE_GROUPS:  # one group at a time, as a batch of one prompt has it
        assert torch.equal(module.group_advantages(row[None]), torch.zeros(1, 8))


# ---------------------------------------------------------------------------------------------------------
# One reference clipped surrogate, written from the formula (and verl's pg_clipfrac: conftest.reference_clip),
# against every file's policy_loss: loss, gradient, clip fraction, ratio and kl, on a batch built so that each
# wrong reading gives a different number.


EPS, EPS_HIGH, BETA, L_MAX = 0.2, 0.28, 0.04, 9


N, T = 10, 7


LENGTHS = [1, 7, 3, 5, 2, 7, 4, 6, 1, 3]  # ragged: one-token completions, full ones, everything between


def clip_batch(adv_kind, per_token):
    """Random log-probs with ratios from about 0.3 to 4, drifting upwards, and advantages that lean
    positive: the four clip regions (above or below the band, times the sign of A) hold four different
    token counts, so a clip counted on the wrong side, on both sides, or at the wrong edge reads
    differently. `n` and `tokens` are a larger whole batch's counts (this is one micro-batch of it)."""
    g = torch.Generator().manual_seed(11)
    mask = (torch.arange(T)[None] < torch.tensor(LENGTHS)[:, None]).float()
    old = -3 * torch.rand(N, T, generator=g)  # log-probs in (-3, 0), padding included: finite, as in a rollout
    logp = (old + 0.08 + 0.35 * torch.randn(N, T, generator=g)).requires_grad_()
    ref = old + 0.4 * torch.randn(N, T, generator=g)
    adv = torch.randn(N, T, generator=g) + 0.3 if per_token else torch.randn(N, generator=g) + 0.3
    if adv_kind == "zero":
        adv = torch.zeros_like(adv)
    elif per_token:
        adv[2] = 0.0  # a flat row, and single zero tokens
        adv[5, ::2] = 0.0
    else:
        adv[2] = 0.0  # a completion of a flat group
    return logp, old, ref, adv, mask, N + 3, mask.sum() + 11


# name: (call, eps_low, eps_high, beta, token weight, the kl logged is to the reference or to pi_old)
CLIPPED = {
    "grpo": (lambda lp, old, ref, a, m, n, tok: grpo.policy_loss(lp, old, ref, a, m, EPS, BETA, n),
             EPS, EPS, BETA, lambda m, n, tok: seq_mean(m, n), "k3_ref"),
    "drgrpo": (lambda lp, old, ref, a, m, n, tok: drgrpo.policy_loss(lp, old, ref, a, m, EPS, BETA, L_MAX, n),
               EPS, EPS, BETA, lambda m, n, tok: m / L_MAX / n, "k3_ref"),
    "dapo": (lambda lp, old, ref, a, m, n, tok: dapo.policy_loss(lp, old, a, m, EPS, EPS_HIGH, tok),
             EPS, EPS_HIGH, 0.0, lambda m, n, tok: m / tok, "k3_old"),
    "vpo": (lambda lp, old, ref, a, m, n, tok: vpo.policy_loss(lp, old, ref, a, m, EPS, BETA, n),
            EPS, EPS, BETA, lambda m, n, tok: seq_mean(m, n), "k3_ref"),
    "tree_grpo": (lambda lp, old, ref, a, m, n, tok: tree.policy_loss(lp, old, ref, a, m, EPS, BETA, n),
                  EPS, EPS, BETA, lambda m, n, tok: seq_mean(m, n), "k3_ref"),
    "pedagogical": (lambda lp, old, ref, a, m, n, tok: ped.policy_loss(lp, old, a, m, EPS, n),
                    EPS, EPS, 0.0, lambda m, n, tok: seq_mean(m, n), "k3_old"),
    # PPO: per-token advantages, its KL in the reward (not the loss), the logged kl to the reference
    "ppo": (lambda lp, old, ref, a, m, n, tok: ppo.policy_loss(lp, old, ref, a, m, EPS, n),
            EPS, EPS, 0.0, lambda m, n, tok: seq_mean(m, n), "k3_ref"),
}


PER_TOKEN = ("tree_grpo", "ppo")  # one advantage per token, not per completion


def test_the_clip_batch_tells_every_wrong_clip_count_apart():
    logp, old, _, adv, mask, _, _ = clip_batch("mixed", per_token=False)
    ratio, a = (logp.detach() - old).exp(), adv[:, None]
    count = lambda region: int((region * mask).sum())
    up_pos, low_neg = count((ratio > 1 + EPS) & (a > 0)), count((ratio < 1 - EPS) & (a < 0))  # clipped
    up_neg, low_pos = count((ratio > 1 + EPS) & (a < 0)), count((ratio < 1 - EPS) & (a > 0))  # not clipped
    between = count((ratio > 1 + EPS) & (ratio <= 1 + EPS_HIGH) & (a > 0))  # clipped by GRPO, not by DAPO
    low_high = count((ratio < 1 - EPS_HIGH) & (a < 0))  # DAPO's eps_high used at the lower edge
    right = up_pos + low_neg
    wrong = [up_neg + low_pos, right + up_neg + low_pos, up_pos + up_neg, low_neg + low_pos, up_pos, low_neg,
             up_pos + low_pos, up_neg + low_neg]  # the other side, both sides, one edge, ...
    assert right not in wrong, (right, wrong)
    dapo_right = up_pos - between + low_neg
    assert dapo_right not in [right, up_pos - between + low_high, up_neg + low_pos], (dapo_right, right)


@pytest.mark.parametrize("adv_kind", ["mixed", "zero"])
@pytest.mark.parametrize("name", list(CLIPPED))
def test_every_clipped_loss_matches_the_reference(name, adv_kind):
    call, eps_low, eps_high, beta, weight, kl_to = CLIPPED[name]
    logp, old, ref, adv, mask, n, tokens = clip_batch(adv_kind, per_token=name in PER_TOKEN)
    loss, stats = call(logp, old, ref, adv, mask, n, tokens)
    want_loss, want_grad, want = reference_clip(logp, old, ref, adv, mask, eps_low, eps_high, beta,
                                                weight(mask, n, tokens))
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-5, abs=1e-7)
    loss.backward()
    assert torch.allclose(logp.grad, want_grad, atol=1e-6), (logp.grad - want_grad).abs().max()
    assert stats["clip_frac"].item() == pytest.approx(want["clip_frac"].item(), abs=1e-7)
    assert stats["ratio"].item() == pytest.approx(want["ratio"].item(), rel=1e-6)
    assert stats["kl"].item() == pytest.approx(want[kl_to].item(), rel=1e-5)
    if adv_kind == "zero":
        assert stats["clip_frac"].item() == 0  # nothing to clip where nothing pushes
    else:
        assert 0.1 < want["clip_frac"] < 0.5


def test_tree_per_token_advantages_are_not_averaged_over_the_row():
    # the reference above with each row's tokens given their own advantage: a file that took one advantage
    # per row (the first token's, or the row mean) would match on a row-constant batch, not on this one
    logp, old, ref, adv, mask, n, _ = clip_batch("mixed", per_token=True)
    assert (adv * mask).std(1).max() > 0.5
    loss, _ = tree.policy_loss(logp, old, ref, adv, mask, EPS, BETA, n)
    row_mean = (adv * mask).sum(1) / mask.sum(1)
    other, _ = tree.policy_loss(logp, old, ref, row_mean[:, None].expand_as(adv), mask, EPS, BETA, n)
    assert abs(loss.item() - other.item()) > 1e-3


# ---------------------------------------------------------------------------------------------------------
# The KL penalty: k3's value, and its gradient beta (1 - pi_ref / pi) per token times the aggregation's
# weight, through every file's loss that carries it.


ALL = {"pg": pg, "grpo": grpo, "drgrpo": drgrpo, "dapo": dapo, "tpo": tpo, "dg": dg, "opd": opd, "vpo": vpo,
       "tree_grpo": tree, "pedagogical": ped, "ppo": ppo, "dpo": dpo}


# pedagogical computes its k3 inline (the shared clip check reads its logged kl); SFT logs the drift to
# the policy before the step and has no k3
WITH_K3 = [name for name in ALL if name != "pedagogical"]


@pytest.mark.parametrize("name", WITH_K3)
def test_k3_value_and_gradient_in_every_file(name):
    # pi = 0.5 against ref 0.25 and the other way round (k3 is not symmetric):
    # d = ln(0.25/0.5) = -ln 2: e^d - d - 1 = 0.5 + 0.693147 - 1 = 0.193147;  d/dlogp = 1 - e^d = 0.5
    # d = ln(0.5/0.25) = +ln 2: 2 - 0.693147 - 1 = 0.306853;                 d/dlogp = 1 - 2 = -1
    # pi = ref = 0.3: d = 0, k3 = 0 and its gradient 0
    logp = torch.log(torch.tensor([0.5, 0.25, 0.3])).requires_grad_()
    ref = torch.log(torch.tensor([0.25, 0.5, 0.3]))
    k3 = ALL[name].kl_k3(logp, ref)
    assert torch.allclose(k3, torch.tensor([0.193147, 0.306853, 0.0]), atol=1e-6)
    k3.sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([0.5, -1.0, 0.0]), atol=1e-6)


@pytest.mark.parametrize("name", ["grpo", "drgrpo", "vpo", "tree_grpo"])
def test_kl_penalty_gradient_is_beta_one_minus_ref_over_pi(name):
    # A = 0: the surrogate contributes nothing, and the gradient is the KL term's alone,
    # beta (1 - pi_ref / pi) at each real token, times the aggregation's 1/|y_i| (1/L_max) and 1/n
    call, *_ = CLIPPED[name]
    logp, old, ref, adv, mask, n, tokens = clip_batch("zero", per_token=name == "tree_grpo")
    loss, _ = call(logp, old, ref, adv, mask, n, tokens)
    loss.backward()
    per_token = BETA * (1 - torch.exp(ref - logp.detach()))
    length = torch.full((N, 1), float(L_MAX)) if name == "drgrpo" else mask.sum(1, keepdim=True)
    assert torch.allclose(logp.grad, per_token * mask / length / n, atol=1e-7)
    assert (logp.grad * mask).abs().min() < (logp.grad * mask).abs().max() / 5  # the weights differ by token


# ---------------------------------------------------------------------------------------------------------
# The files with no clip: ratio, clip_frac and kl are diagnostics to pi_old, logged with the same
# definitions (masked means of exp(logp - old), |ratio - 1| > 0.2 and k3(pi || pi_old)).


def unclipped_stats(name, logp, old, mask):
    adv = torch.randn(N)
    if name == "pg":
        return pg.policy_loss(logp, old, adv, mask, N)[1]
    if name == "dg":
        return dg.policy_loss(logp, old, adv, mask, 1.0, N)[1]
    if name == "opd":
        return opd.policy_loss(logp, old, adv[:, None].expand(N, T), mask, N)[1]
    return tpo.policy_loss(logp, old, torch.full((2, 5), 0.2), mask, 2)[1]


@pytest.mark.parametrize("name", ["pg", "tpo", "dg", "opd"])
def test_diagnostics_of_the_unclipped_files(name):
    logp, old, _, _, mask, _, _ = clip_batch("mixed", per_token=False)
    stats = unclipped_stats(name, logp.detach(), old, mask)
    ratio = (logp.detach() - old).exp()
    d = old - logp.detach()
    mean = lambda x: ((x * mask).sum() / mask.sum()).item()
    assert stats["ratio"].item() == pytest.approx(mean(ratio), rel=1e-6)
    assert stats["clip_frac"].item() == pytest.approx(mean(((ratio - 1).abs() > 0.2).float()), abs=1e-7)
    assert stats["kl"].item() == pytest.approx(mean(d.exp() - d - 1), rel=1e-5)
    assert 0.2 < stats["clip_frac"] < 0.95


# ---------------------------------------------------------------------------------------------------------
# Each clipped file's update() on a ragged batch (micro-batches of 4 and 40 tokens), against the
# reference: what the update passes to its loss (clip range, beta, L_max, the batch's counts) shows in
# the loss, the gradient and the logged values, whatever the run's completions happen to look like.


def reference_update_loss(logp, old, ref, adv, mask, eps_low, eps_high, beta, weight):
    """The reference clipped surrogate with its graph, for the gradient through the model."""
    a = adv if adv.dim() == 2 else adv[:, None].expand_as(old)
    ratio = (logp - old).exp()
    d = ref - logp
    per_token = torch.maximum(-a * ratio, -a * ratio.clamp(1 - eps_low, 1 + eps_high)) + beta * (d.exp() - d - 1)
    return (per_token * weight).sum()


@pytest.mark.parametrize("name", list(IN_SITU))
def test_each_clipped_update_on_a_ragged_batch(name):
    task, tok, model = tiny_policy()
    per_prompt = tree.leaves_per_prompt(tree.Args()) if name == "tree_grpo" else 4
    rollout, _ = ragged_rollout(tok, task, 3, per_prompt)
    n, t = rollout.completion_ids.shape
    torch.manual_seed(1)
    with torch.no_grad():
        now = tt.token_logprobs(model, rollout)[0]
    old, ref = now + 0.3 * torch.randn(n, t), now + 0.3 * torch.randn(n, t)
    adv = torch.randn(n, t) * rollout.completion_mask if name == "tree_grpo" else torch.randn(n) + 0.2
    common = dict(prompts_per_step=3, micro_batch=1, max_grad_norm=1e9)
    if name == "tree_grpo":
        args = tree.Args(**common)
        run = lambda opt: tree.update(model, opt, rollout, adv, old, ref, 1, args)
    elif name == "dapo":
        args, ref = dapo.Args(group_size=4, **common), old
        run = lambda opt: dapo.update(model, opt, rollout, adv, old, 1, args)
    elif name == "pedagogical":
        args, ref = ped.Args(group_size=4, **common), old
        run = lambda opt: ped.update(model, opt, rollout, adv, old, 1, args)
    else:  # L_max 16 for Dr. GRPO: wider than any completion of this batch (10), so the two cannot agree
        args = ALL[name].Args(group_size=4, max_new_tokens=16, **common)
        run = lambda opt: ALL[name].update(model, opt, rollout, adv, old, ref, 1, args)
    grad, log = gradient_and_log(model, run)
    eps_low, eps_high, beta, weight, kl_to = IN_SITU[name]
    mask = rollout.completion_mask
    w = mask / 16 / n if name == "drgrpo" else weight(mask, n, mask.sum())
    model.zero_grad()
    logp, entropy = tt.token_logprobs(model, rollout)
    loss = reference_update_loss(logp, old, ref, adv, mask, eps_low, eps_high, beta, w)
    loss.backward()
    want = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.allclose(grad, want, atol=1e-6), ((grad - want).norm() / want.norm()).item()
    _, _, stats = reference_clip(logp, old, ref, adv, mask, eps_low, eps_high, beta, w)
    assert log["value0"] == pytest.approx(loss.item(), rel=1e-5)
    for key, ref_key in (("clip_frac", "clip_frac"), ("ratio", "ratio"), ("kl", kl_to)):
        assert log[key] == pytest.approx(stats[ref_key].item(), rel=1e-5, abs=1e-7), key
    assert log["value2"] == pytest.approx(((entropy * mask).sum() / mask.sum()).item(), rel=1e-5)
    assert 0 < stats["clip_frac"] < 1


# ---------------------------------------------------------------------------------------------------------
# The main loops of the GRPO family, PG and DG, spied on in a two-step run (conftest.Spy): what the update
# is given. (Each other file's own wiring is checked in its own test module.)


@pytest.mark.parametrize("name", ["grpo", "drgrpo", "vpo"])
def test_grpo_family_trains_against_frozen_pi_old_and_the_frozen_base(monkeypatch, run_fast, name):
    module = ALL[name]
    spy = Spy(monkeypatch)
    spy.sampler(tt, "rollout_groups")
    spy.record(module, "update")
    if name == "vpo":
        spy.record(vpo, "completion_scores")  # the set scores use fresh Dirichlet draws: read the ones the run drew
    p = run_fast(f"minimal_{name}.py", *SHORT[name], "--epochs", 2, "--temperature", 0.7)
    assert p.returncode == 0, p.stderr
    assert len(spy.samples) == 2
    clipped = []
    for step, sampled in zip((1, 2), spy.samples):
        calls = [c[0] for c in spy.calls["update"] if c[0][6] == step]
        check_epochs(calls, 2, frozen=(2, 3, 4, 5))
        model, _, rollout, adv, old_logp, ref_logp, _, _ = calls[0]
        assert model is spy.live and rollout is sampled["out"][0]
        assert torch.allclose(old_logp, score(sampled["before"], rollout), atol=1e-6)  # the policy that sampled
        assert torch.allclose(ref_logp, score(spy.base, rollout), atol=1e-6)  # the base, never moved
        rewards = spy.calls["completion_scores"][step - 1][1] if name == "vpo" else sampled["out"][1]
        assert torch.equal(adv, module.group_advantages(rewards).view(-1))
        for a, out, before in [c for c in spy.calls["update"] if c[0][6] == step]:
            clipped.append(check_update_in_situ(name, before, rollout, adv, old_logp, ref_logp, out))
    assert not torch.allclose(old_logp, ref_logp, atol=1e-3)  # step 2: the policy has moved from the base
    assert clipped[0] == 0 and max(clipped) > 0  # the first epoch cannot clip (rho = 1), a later one did


@pytest.mark.parametrize("name", ["pg", "dg"])
def test_one_update_per_batch_on_the_leave_one_out_advantage(monkeypatch, run_fast, name):
    module = ALL[name]
    spy = Spy(monkeypatch)
    spy.sampler(tt, "rollout_groups")
    spy.record(module, "update")
    p = run_fast(f"minimal_{name}.py", *SHORT[name])
    assert p.returncode == 0, p.stderr
    assert len(spy.calls["update"]) == 2
    for (args, out, before), sampled in zip(spy.calls["update"], spy.samples):
        model, _, rollout, adv = args[:4]
        assert model is spy.live and rollout is sampled["out"][0]
        rewards = sampled["out"][1]
        g = rewards.size(1)
        assert torch.allclose(adv, (g / (g - 1) * (rewards - rewards.mean(1, keepdim=True))).view(-1), atol=1e-6)
        # the loss: the sum of each completion's token log-probs (DG: each weighted by its gate) times A,
        # averaged over the batch's completions
        logp, entropy = tt.score(before, rollout)
        mask, weight = rollout.completion_mask, adv[:, None].expand_as(logp)
        if name == "dg":
            weight = torch.sigmoid(adv[:, None] * -logp) * adv[:, None]
        loss, stats, got_entropy = out
        assert float(loss) == pytest.approx((-(weight * logp * mask).sum() / len(adv)).item(), rel=1e-5)
        assert float(got_entropy) == pytest.approx(((entropy * mask).sum() / mask.sum()).item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Micro-batches: --micro_batch counts prompts, and one update with --micro_batch 1 and 2 gives the whole
# batch's gradient and log in every file, on a batch whose micro-batches hold 4 and 40 tokens (the ratios
# spread across the clip band). SFT's, DPO's and PPO's, each with a planted per-micro-batch normaliser, are
# in their own test modules.


@pytest.mark.parametrize("name", ["pg", "grpo", "drgrpo", "dapo", "tpo", "dg", "vpo", "tree_grpo", "pedagogical"])
def test_micro_batches_hold_whole_groups(monkeypatch, name):
    # --micro_batch counts prompts: each forward pass with a graph holds whole groups (a tree's leaves),
    # here 1 prompt of 3, whatever that changes or not in the numbers
    task, tok, model = tiny_policy()
    per_prompt = tree.leaves_per_prompt(tree.Args()) if name == "tree_grpo" else 4
    rollout, _ = ragged_rollout(tok, task, 3, per_prompt)
    n, t = rollout.completion_ids.shape
    old = torch.zeros(n, t)
    adv = torch.randn(n, t) if name == "tree_grpo" else torch.randn(n)
    rows, token_logprobs = [], tt.token_logprobs
    monkeypatch.setattr(tt, "token_logprobs", lambda m, r, *a, **k: rows.append(len(r.completion_ids)) or token_logprobs(m, r, *a, **k))
    common = dict(prompts_per_step=3, micro_batch=1)
    if name == "tree_grpo":
        tree.update(model, KeepGradient(model), rollout, adv, old, old, 1, tree.Args(**common))
    elif name in ("pg", "dg"):
        ALL[name].update(model, KeepGradient(model), rollout, adv, 1, ALL[name].Args(group_size=4, **common))
    elif name in ("dapo", "pedagogical"):
        ALL[name].update(model, KeepGradient(model), rollout, adv, old, 1, ALL[name].Args(group_size=4, **common))
    elif name == "tpo":
        tpo.update(model, KeepGradient(model), rollout, torch.full((3, 4), 0.25), old, 1, tpo.Args(group_size=4, **common))
    else:
        ALL[name].update(model, KeepGradient(model), rollout, adv, old, old, 1, ALL[name].Args(group_size=4, **common))
    assert rows == [per_prompt] * 3


P, G = 3, 4  # three prompts of four completions: micro-batches of 1 and 2 prompts, the last one smaller


def batch_and_logprobs(temperature=1.0, group=G):
    task, tok, model = tiny_policy()
    rollout, examples = ragged_rollout(tok, task, P, group, temperature=temperature)
    torch.manual_seed(1)
    n, t = rollout.completion_ids.shape
    with torch.no_grad():
        now = tt.token_logprobs(model, rollout)[0]
    old, ref = now + 0.3 * torch.randn(n, t), now + 0.3 * torch.randn(n, t)
    return task, tok, model, rollout, examples, old, ref


def test_pg_micro_batches_are_exact():
    _, _, model, rollout, _, _, _ = batch_and_logprobs()
    adv = torch.randn(P * G)
    args = lambda mb: pg.Args(group_size=G, prompts_per_step=P, micro_batch=mb, max_grad_norm=1e9)
    compare(model, lambda opt, a: pg.update(model, opt, rollout, adv, 1, a), args)


@pytest.mark.parametrize("module", [grpo, drgrpo, vpo])
def test_grpo_family_micro_batches_are_exact(module):
    _, _, model, rollout, _, old, ref = batch_and_logprobs()
    adv = torch.randn(P * G)
    args = lambda mb: module.Args(group_size=G, prompts_per_step=P, micro_batch=mb, max_grad_norm=1e9)
    compare(model, lambda opt, a: module.update(model, opt, rollout, adv, old, ref, 1, a), args)


def test_dapo_micro_batches_are_exact_and_a_per_micro_batch_token_mean_is_not(monkeypatch):
    _, _, model, rollout, _, old, _ = batch_and_logprobs()
    adv = torch.randn(P * G)
    args = lambda mb: dapo.Args(group_size=G, prompts_per_step=P, micro_batch=mb, max_grad_norm=1e9)
    run = lambda opt, a: dapo.update(model, opt, rollout, adv, old, 1, a)
    compare(model, run, args)
    # the TRL bnpo / verl legacy-actor normaliser: each micro-batch divided by its own token count
    monkeypatch.setattr(dapo, "aggregate", lambda per_token, mask, tokens: (per_token * mask).sum() / mask.sum())
    with pytest.raises(AssertionError, match="gradient differs"):
        compare(model, run, args)


def test_tpo_micro_batches_are_exact():
    _, _, model, rollout, _, old, _ = batch_and_logprobs()
    q = torch.randn(P, G).softmax(1)
    args = lambda mb: tpo.Args(group_size=G, prompts_per_step=P, micro_batch=mb, max_grad_norm=1e9)
    compare(model, lambda opt, a: tpo.update(model, opt, rollout, q, old, 1, a), args)


@pytest.mark.parametrize("kondo", ["off", "stochastic", "hard"])
def test_dg_micro_batches_are_exact(kondo):
    _, _, model, rollout, _, _, _ = batch_and_logprobs()
    adv = torch.randn(P * G)
    args = lambda mb: dg.Args(group_size=G, prompts_per_step=P, micro_batch=mb, max_grad_norm=1e9,
                              kondo=kondo != "off", kondo_hard=kondo == "hard")
    compare(model, lambda opt, a: dg.update(model, opt, rollout, adv, 1, a), args)


@pytest.mark.parametrize("estimator", ["sampled", "full"])
def test_opd_micro_batches_are_exact(estimator):
    _, _, model, rollout, _, _, _ = batch_and_logprobs()
    teacher = tiny_policy(seed=1)[2].eval().requires_grad_(False)
    args = lambda mb: opd.Args(group_size=G, prompts_per_step=P, micro_batch=mb, max_grad_norm=1e9,
                               estimator=estimator)
    compare(model, lambda opt, a: opd.update(model, opt, rollout, teacher, 1, a), args)


def test_tree_micro_batches_are_exact():
    leaves = tree.leaves_per_prompt(tree.Args())  # 4 trees of 3 leaves
    _, _, model, rollout, _, old, ref = batch_and_logprobs(group=leaves)
    adv = torch.randn(rollout.completion_ids.shape) * rollout.completion_mask  # one advantage per token
    args = lambda mb: tree.Args(prompts_per_step=P, micro_batch=mb, max_grad_norm=1e9)
    compare(model, lambda opt, a: tree.update(model, opt, rollout, adv, old, ref, 1, a), args)


def test_pedagogical_teacher_student_and_learnability_micro_batches_are_exact():
    task, tok, model = tiny_policy("keyed")
    rollout, _ = ragged_rollout(tok, task, P, G)
    with torch.no_grad():
        old = tt.token_logprobs(model, rollout)[0] + 0.3 * torch.randn(rollout.completion_ids.shape)
    adv = torch.randn(P * G)
    args = lambda mb: ped.Args(group_size=G, prompts_per_step=P, student_batch=P, micro_batch=mb,
                               max_grad_norm=1e9)
    compare(model, lambda opt, a: ped.update(model, opt, rollout, adv, old, 1, a), args)
    student = tiny_policy("keyed", seed=1)[2]
    examples = task.test[:P]
    compare(student, lambda opt, a: ped.student_update(student, opt, model, tok, task, examples, 1, a, "cpu")[:2], args)
    whole, per_prompt = ped.learnability_pass(student, rollout, args(0)), ped.learnability_pass(student, rollout, args(1))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(whole, per_prompt))


# ---------------------------------------------------------------------------------------------------------
# End to end, as the issue checks it: a short run with --micro_batch 1 prints the whole batch's step line,
# in every file (the whole batch's run is the file's short run, which other tests read too).


LINE_KEYS = ("loss", "grad_norm", "ratio", "clip_frac", "entropy")
PPO_KEYS = LINE_KEYS + ("value_loss", "vf_clip_frac", "explained_var", "value")
ONE_STEP = [(name, []) for name in NAMES if name not in ("ppo", "sft", "dpo")] + [
    ("ppo", []), ("ppo", ["--group_size", 2, "--critic_init", "scratch"]),
    ("sft", ["--source", "demo"]), ("sft", ["--source", "best"]), ("dpo", []), ("dpo", ["--offline"])]


@pytest.mark.parametrize("name,flags", ONE_STEP, ids=[" ".join([name, *map(str, flags)]) for name, flags in ONE_STEP])
def test_one_step_with_micro_batches_prints_the_same_line(short_run, run_fast, name, flags):
    script, args = f"minimal_{name}.py", SHORT[name] + flags
    steps = 2 if name == "ppo" else 1  # PPO's step 2 uses the critic trained at step 1, its values non-zero
    whole, split = short_run(script, *args), run_fast(script, *args, "--micro_batch", 1, "--steps", steps)
    for step in range(1, steps + 1):
        a, b = step_line(whole, step), step_line(split, step)
        assert a.keys() == b.keys()
        # SFT and DPO: every key, 0 where a step kept nothing (--source best on a 2-step warm-up)
        for key in a if name in ("sft", "dpo") else PPO_KEYS if name == "ppo" else LINE_KEYS:
            assert float(b[key]) == pytest.approx(float(a[key]), rel=5e-4, abs=1e-4), (step, key)


# ---------------------------------------------------------------------------------------------------------
# Same seed, same lines: each file's short run (the cached one) and a fresh run of the same command print the
# same lines, and another seed prints others; across processes (slow), a fresh process (its own hash seed
# and memory layout) runs every file's short run and prints its lines, and they agree with the runs here.


SAME_SEED = [(name, []) for name in NAMES if name not in ("sft", "dpo")] + [
    ("sft", ["--source", "best"]), ("dpo", ["--offline"]), ("dpo", [])]  # SFT and DPO offline sample their data too


@pytest.mark.parametrize("name,flags", SAME_SEED, ids=[" ".join([name, *flags]) for name, flags in SAME_SEED])
def test_same_seed_same_lines(short_run, run_fast, name, flags):
    script, args = f"minimal_{name}.py", SHORT[name] + flags
    a, b = short_run(script, *args), run_fast(script, *args)
    assert a.returncode == 0 and strip_time(a.stdout) == strip_time(b.stdout)
    c = run_fast(script, *args, "--seed", 1, "--steps", 1)  # its base and first step: the seed reaches them
    assert c.returncode == 0 and strip_time(c.stdout)[:2] != strip_time(a.stdout)[:2]


def print_runs(cases):
    """The driver of the test below: run each (script, args) in this one process and print its lines."""
    for script, args in cases:
        p = run_main(script, *args)
        print(f"### {script} {' '.join(args)} returncode={p.returncode}")
        print("\n".join(strip_time(p.stdout)))


DRIVER = ("import json, sys; sys.path[:0] = ['tests']; import conftest; conftest.import_torch_and_toy_tasks(); "
          "conftest.torch.set_num_threads(int(sys.argv[1])); "
          "import test_every_file; test_every_file.print_runs(json.loads(sys.argv[2]))")


@pytest.mark.slow
def test_same_seed_same_lines_across_processes(short_run):
    cases = [(f"minimal_{name}.py", [*map(str, SHORT[name] + flags)]) for name, flags in SAME_SEED]
    threads = str(torch.get_num_threads())  # the runs in this process took as many: the same sums, in the same order
    driver = subprocess.run([sys.executable, "-c", DRIVER, threads, json.dumps(cases)], cwd=ROOT, text=True,
                            capture_output=True, timeout=1800, env={**os.environ, "OMP_NUM_THREADS": threads})
    assert driver.returncode == 0, driver.stderr[-3000:]
    here = "".join(f"### {script} {' '.join(args)} returncode={short_run(script, *args).returncode}\n"
                   + "\n".join(strip_time(short_run(script, *args).stdout)) + "\n" for script, args in cases)
    assert driver.stdout == here


# ---------------------------------------------------------------------------------------------------------
# Bad flags: a setting that makes no sense stops the file with one sentence naming the flag, before any
# work (not even the base evaluation) and without a traceback. The checks every file shares
# (toy_tasks.check_common_args: the task, the group, the steps, the learning rate, --model, the budget, the
# temperature, the warm-up, --log_jsonl, the memory flags) are tried on minimal_pg.py or minimal_grpo.py;
# each file's own flags on that file.


BAD_FLAGS = [
    # the shared checks
    ("pg", ["--task", "sort"], "--task"),
    ("pg", ["--group_size", "1"], "--group_size"),
    ("pg", ["--steps", "0"], "--steps"),
    ("pg", ["--lr", "0"], "--lr"),
    ("pg", ["--lr=-1e-3"], "--lr"),
    ("pg", ["--model", "./no/such/model"], "--model"),
    ("pg", ["--max_new_tokens", "3"], "--max_new_tokens"),
    ("pg", ["--temperature", "0"], "--temperature"),
    ("pg", ["--warmup_steps", "-2"], "--warmup_steps"),
    ("pg", ["--log_jsonl", "/proc/no/such/dir/a.jsonl"], "--log_jsonl"),  # a folder that cannot be created
    ("pg", ["--eval_size", "-1"], "--eval_size"),
    ("pg", ["--eval_size", "257"], "--eval_size"),  # reverse holds out 256 prompts
    ("vpo", ["--eval_size", "257"], "--eval_size"),  # a task the file builds itself, cut by tt.setup
    ("pedagogical", ["--eval_size", "257"], "--eval_size"),  # keyed holds out reverse's 256
    ("grpo", [*SHORT["grpo"], "--micro_batch", -1], "--micro_batch"),
    ("grpo", [*SHORT["grpo"], "--micro_batch", 5], "--micro_batch"),  # more prompts than the 4 a step trains on
    ("grpo", [*SHORT["grpo"], "--dtype", "float16"], "--dtype"),
    ("grpo", [*SHORT["grpo"], "--dtype", "bfloat16", "--device", "cpu"], "--dtype bfloat16"),
    # each file's own
    ("grpo", ["--epochs", "0"], "--epochs"),
    ("grpo", ["--clip_eps", "1.5"], "--clip_eps"),
    ("grpo", ["--beta", "-0.1"], "--beta"),
    ("drgrpo", ["--beta", "-0.1"], "--beta"),  # the flag whose default Dr. GRPO changes
    ("dapo", ["--clip_eps_high", "0.1"], "--clip_eps_high"),  # below eps_low: not clip-higher
    ("dapo", ["--max_rounds", "0"], "--max_rounds"),
    ("dapo", ["--overlong_cache", "10"], "--overlong_cache"),  # the whole budget would be penalised
    ("tpo", ["--eta", "0"], "--eta"),
    ("dg", ["--kondo", "--kondo_keep_rate", "1.5"], "--kondo_keep_rate"),
    ("dg", ["--kondo", "--kondo_keep_rate", "0"], "--kondo_keep_rate"),
    ("dg", ["--kondo_hard"], "--kondo_hard"),
    ("vpo", ["--m", "0"], "--m"),
    ("vpo", ["--max_new_tokens", "20"], "--max_new_tokens"),  # 3 answers need 21 tokens
    ("vpo", ["--m", "5", "--max_new_tokens", "34"], "--max_new_tokens"),
    ("vpo", ["--set_score", "mean"], "--set_score"),
    ("vpo", ["--n_weights", "0"], "--n_weights"),
    ("vpo", ["--w_gold", "1.5"], "--w_gold"),
    ("vpo", ["--eval_chains", "2"], "--eval_chains"),  # 6 answers: too few for best@9
    ("vpo", ["--beta", "-1"], "--beta"),
    ("pedagogical", ["--lam=-0.5"], "--lam"),
    ("pedagogical", ["--spike_beta", "0"], "--spike_beta"),
    ("pedagogical", ["--kappa", "0"], "--kappa"),
    ("pedagogical", ["--student_lr", "0"], "--student_lr"),
    ("pedagogical", ["--student_batch", "0"], "--student_batch"),
    ("pedagogical", ["--teacher_warmup_steps", "-1"], "--teacher_warmup_steps"),
    ("pedagogical", ["--teacher_mix_steps", "-1"], "--teacher_mix_steps"),
    ("pedagogical", ["--epochs", "0"], "--epochs"),
    ("pedagogical", ["--clip_eps", "1.5"], "--clip_eps"),
    ("pedagogical", ["--task", "reverse"], "--binary"),
    ("pedagogical", ["--binary"], "--binary"),
    ("pedagogical", ["--task", "tokrev"], "--task"),
    ("opd", ["--estimator", "forward"], "--estimator"),
    ("opd", ["--model", "./some/model"], "--teacher"),  # a pretrained student needs a teacher that shares its vocabulary
    ("opd", ["--teacher_steps", "0"], "--teacher_steps"),
    ("opd", ["--teacher_min_acc", "1.5"], "--teacher_min_acc"),
    ("opd", ["--grad_var_batches", "1"], "--grad_var_batches"),
    ("opd", ["--group_size", "0"], "--group_size"),
    ("tree_grpo", ["--trees", "0"], "--trees"),
    ("tree_grpo", ["--forks", "0"], "--forks"),
    ("tree_grpo", ["--branches", "0"], "--branches"),
    ("tree_grpo", ["--rounds", "-1"], "--rounds"),
    ("tree_grpo", ["--trees", "1", "--rounds", "0"], "--trees"),
    ("tree_grpo", ["--advantage", "spo"], "--advantage"),
    ("tree_grpo", ["--epochs", "0"], "--epochs"),
    ("ppo", ["--vf_coef=-0.1"], "--vf_coef"),
    ("ppo", ["--lam", "1.5"], "--lam"),
    ("ppo", ["--gamma=-0.1"], "--gamma"),
    ("ppo", ["--vf_clip", "0"], "--vf_clip"),
    ("ppo", ["--critic_init", "reward_model"], "--critic_init"),
    ("ppo", ["--group_size", "0"], "--group_size"),
    ("ppo", ["--beta=-0.1"], "--beta"),
    ("sft", [*SHORT["sft"], "--source", "teacher"], "--source"),
    ("sft", [*SHORT["sft"], "--group_size", 0], "--group_size"),
    ("dpo", [*SHORT["dpo"], "--beta", 0], "--beta"),
    ("dpo", [*SHORT["dpo"], "--beta", -0.1], "--beta"),
    ("dpo", [*SHORT["dpo"], "--group_size", 1], "--group_size"),
    ("dpo", [*SHORT["dpo"], "--offline_batches", 3], "--offline_batches"),
    ("dpo", [*SHORT["dpo"], "--epochs", 0], "--epochs"),
]


def bad_flags_id(name, args):
    return " ".join([name, *map(str, args[len(SHORT[name]):] if args[:len(SHORT[name])] == SHORT[name] else args)])


@pytest.mark.parametrize("name,args,flag", BAD_FLAGS, ids=[bad_flags_id(name, args) for name, args, _ in BAD_FLAGS])
def test_bad_flags_stop_with_one_sentence(run_fast, name, args, flag):
    p = run_fast(f"minimal_{name}.py", *args)
    assert p.returncode == 2 and p.stdout == ""  # before any work: not even the base evaluation
    assert p.stderr.startswith("error: ") and p.stderr.count("\n") == 1 and flag in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


# ---------------------------------------------------------------------------------------------------------
# Two steps of each method of the rl-experiments table on the tokrev task (--task tokrev).


@pytest.mark.parametrize("script", ["minimal_tpo.py", "minimal_dg.py", "minimal_grpo.py"])
def test_two_steps_on_tokrev(run_fast, script):
    p = run_fast(script, "--task", "tokrev", "--steps", 2, "--prompts_per_step", 4, "--eval_every", 1,
                 "--lr", "1e-3", "--max_grad_norm", 1)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    evals = [ln for ln in lines if ln.startswith("eval ")]
    assert len(evals) == 3 and all(" entropy=" in ln for ln in evals)  # held-out entropy, as the source logs
    step = dict(kv.split("=") for kv in next(ln for ln in lines if ln.startswith("step=")).split())
    assert 1 <= float(step["len"]) <= 10  # at most the 10 symbols; an EOS sampled early ends one sooner
    final = dict(kv.split("=") for kv in lines[-1].split()[1:])
    assert 0.0 <= float(final["test_acc"]) <= 1.0


# ---------------------------------------------------------------------------------------------------------
# The default command of every minimal_*.py learns (slow): base at or below 0.6, final test_acc >= 0.90, or
# the file's own floor. Run in this process, once each, with --eval_every 0: the evaluations in between
# draw nothing from the training stream (greedy decoding; VPO's and sampled_exact's fork their own), so
# the step lines and the final line are the default command's, without the evaluations between.


@pytest.mark.slow  # it backs the slow default runs below
@pytest.mark.parametrize("name", NAMES)
def test_evaluating_between_steps_changes_no_training_line(short_run, run_fast, name):
    """What lets the default runs below skip the evaluations in between."""
    steps = lambda p: [ln for ln in strip_time(p.stdout) if not ln.startswith(("eval ", "teacher "))]
    script = f"minimal_{name}.py"
    every = run_fast(script, *SHORT[name], "--eval_every", 1)
    assert every.returncode == 0 and sum(ln.startswith("eval step=1 ") for ln in every.stdout.splitlines()) == 1
    assert steps(every) == steps(short_run(script, *SHORT[name]))


def final_metrics(stdout):
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("final "), last
    return {k: float(v) for k, v in (kv.split("=") for kv in last.split()[1:])}


ALL_SCRIPTS = sorted(p.name for p in Path(__file__).resolve().parents[1].glob("minimal_*.py"))


# The final test_acc each default run must reach, from a base at or below 0.6. PG, one plain REINFORCE
# step per batch and no KL anchor, is the slowest and noisiest learner: its 200-step default ended
# between 0.87 and 0.97 over seeds 0-2 with 1 or 2 CPU threads, so its floor is lower. OPD's default
# (a near-perfect teacher scoring every token) ended at 0.976-0.986 over seeds 0-2 with 1 thread, so
# its floor is the 0.95 its issue asks of it. minimal_vpo.py's test_acc is E_w best@3 of sampled
# answers (its TEST_METRIC), not a per-character accuracy: with brevity paid only to correct prefixes and
# the repository's 10-completion evaluation its base scores 0.30, an ideal GRPO policy (always the
# w_gold-best answer) 0.621, and its default reached 0.630 (seed 0, one thread; 0.632 +- 0.011 over 0-2).
# minimal_dpo.py learns from two of each group's eight samples with one step per batch: at 100 steps it
# was at 0.828-0.904 over seeds and thread counts, at 200 (its default, PG's) 0.883, 0.995 and 0.896 over
# seeds 0-2 (one thread) and 0.914 on seed 0 (two threads), so its floor is PG's.
FLOOR = {"minimal_pg.py": 0.85, "minimal_opd.py": 0.95, "minimal_vpo.py": 0.60, "minimal_dpo.py": 0.85}


@pytest.mark.slow
@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_default_run_learns(run_fast, script):
    p = run_fast(script, "--eval_every", 0, held_out=None)  # the whole held-out set, at the start and the end
    assert p.returncode == 0, p.stderr
    m = final_metrics(p.stdout)
    assert m["base_acc"] <= 0.6 and m["test_acc"] >= FLOOR.get(script, 0.90), m


# ---------------------------------------------------------------------------------------------------------
# One home for each thing: every method file has its page and its test file, toy_tasks.py's map names every
# public name it defines, and the README stays a guide.


def test_every_file_has_its_page_and_its_test_file():
    found = sorted(p.stem.removeprefix("minimal_") for p in ROOT.glob("minimal_*.py"))
    assert found == sorted(NAMES)
    readme = (ROOT / "README.md").read_text()
    for name in found:
        assert (ROOT / "docs" / f"{name}.md").exists() and (ROOT / "tests" / f"test_{name}.py").exists(), name
        assert f"docs/{name}.md" in readme, f"the README's methods table does not link docs/{name}.md"


def test_every_method_file_is_150_to_300_lines():
    for name in NAMES:
        lines = len((ROOT / f"minimal_{name}.py").read_text().splitlines())
        assert 150 <= lines <= 300, f"minimal_{name}.py has {lines} lines"


def test_toy_tasks_opens_with_a_map_of_every_public_name():
    import ast

    source = (ROOT / "toy_tasks.py").read_text()
    tree = ast.parse(source)
    names = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    names |= {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
              if isinstance(t, ast.Name) and t.id.isupper()}
    public = {n for n in names if not n.startswith("_")}
    the_map = ast.get_docstring(tree)
    missing = sorted(n for n in public if not re.search(rf"\b{n}\b", the_map))
    assert not missing, f"toy_tasks.py's map does not name {missing}"
    assert "GSM8KTask" not in names and "final_answer" not in names  # GSM8K lives in gsm8k.py


def test_the_readme_is_a_guide():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300 and len(readme.encode()) <= 25_000
    for word in ("this round", "previous table", "last round"):
        assert word not in readme.lower(), word
