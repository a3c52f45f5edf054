"""Every file's main loop, watched while it runs. The unit tests check each function on given inputs; these
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
import math
import random

import pytest
import torch

import toy_tasks as tt
from conftest import run_main

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
HELD_OUT = 32  # held-out examples kept: the evaluations' wiring is what is checked, not their accuracy
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
            self.task.test = self.task.test[:HELD_OUT]
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
