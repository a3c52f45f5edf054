"""What the test modules share: how a file is run (in this process, or in its own as a user runs it), the
short run of each file that several tests read, the flags of those runs, a tiny policy and a ragged batch to
update on, the stand-in optimizer that keeps a gradient, the one reference clipped surrogate, and the spies
that watch a file's main loop. A test module takes what it needs with `from conftest import ...`.

Speed: the suite runs on two pytest-xdist workers (`addopts` in pyproject.toml), each with one torch thread,
and the files started in their own process get OMP_NUM_THREADS=1: two threads per worker on two cores
spin against each other and cost many times the CPU. A teacher trained in memory (tt.train_teacher) is
trained once per worker for each setting and handed out as a copy; a short run that several tests read is
run once per session (shared between the workers through a file) by `short_run`."""
import contextlib
import copy
import hashlib
import importlib
import importlib.util
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the minimal_*.py files and toy_tasks.py live at the top level

torch = tt = None  # imported by pytest_configure, in the processes that run tests


def import_torch_and_toy_tasks():
    global torch, tt
    import torch
    import toy_tasks as tt


def pytest_configure(config):
    """Import torch and toy_tasks here rather than at the top: pytest-xdist's controller process loads this
    file too but runs no test, and the imports would cost it 5 s before it starts the workers."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if getattr(config.option, "numprocesses", None) and not worker:
        return  # the controller
    import_torch_and_toy_tasks()
    if worker:  # two workers on two cores: one thread each, and the same for the processes they start
        os.environ["OMP_NUM_THREADS"] = "1"  # (oversubscribed threads spin against each other and crawl)
        torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------------
# Running a file.


def run_script(script, *args):
    """Run a file as a user would (same interpreter, repo root as cwd, one thread); return the
    CompletedProcess. Each call pays for importing torch and transformers (10-20 s on a 2-core CPU): the
    tests that use it are the slow ones (`-m slow`)."""
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})


HELD_OUT = 32  # held-out prompts a test's run evaluates: what the tests check never reads their number


def run_main(script, *args, held_out=HELD_OUT):
    """Run a file's main() in this process, with sys.argv as the command line would set it: the same
    code path as `uv run SCRIPT ARGS` minus the interpreter start, so a two-step run takes a second or
    two instead of twenty. A toy run evaluates the first `held_out` held-out prompts (`--eval_size`, put
    first so that a test's own --eval_size wins; None: all of them, as the default runs do): evaluating all
    256 would be half of a short run's time. Returns what run_script returns: returncode, stdout, stderr."""
    module = importlib.import_module(Path(script).stem)
    out, err, code = io.StringIO(), io.StringIO(), 0
    toy = Path(script).name.startswith("minimal_") and "gsm8k" not in map(str, args)  # GSM8K's: its own --eval_size
    first = ["--eval_size", str(held_out)] if held_out and toy else []
    argv, sys.argv = sys.argv, [script, *first, *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            module.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def load_script(path):
    """Import a script that is not on the path (results/gpu/benchmark.py) as a module, by its file."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """test_every_file.py's watched runs (one per file, read by several tests) go to one xdist worker each,
    so each file's is run once: the tests that read it share an xdist_group (with --dist loadgroup).
    The slow tests (minutes each) are handed out first and the quick ones (seconds) fill in after them,
    so that neither worker is left with a long test at the end while the other waits."""
    for item in items:
        if "saved_models" in getattr(item, "fixturenames", ()) and "name" in getattr(item, "callspec", SimpleNamespace(params={})).params:
            item.add_marker(pytest.mark.xdist_group(f"watched_{item.callspec.params['name']}"))
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: each keeps its order


@pytest.fixture
def run():
    return run_script


@pytest.fixture
def run_fast():
    return run_main


@pytest.fixture(scope="session")
def short_run(tmp_path_factory):
    """`short_run(script, *args)`: run_main(script, *args, "--log_jsonl", LOG) once per session, whichever
    tests ask and on whichever worker (the first computes it under a file lock, the others read it back).
    Returns returncode, stdout, stderr and `records`, the log's JSON lines. For the tests that read a run's
    output only: a test that spies on a run, or patches anything first, runs its own with run_fast."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "short_runs"
    folder.mkdir(exist_ok=True)
    seen = {}

    def get(script, *args):
        key = (script, *map(str, args))
        if key not in seen:
            name = hashlib.sha1("\0".join(key).encode()).hexdigest()[:16]
            with FileLock(str(folder / f"{name}.lock")):
                done = folder / f"{name}.json"
                if not done.exists():
                    log = folder / f"{name}.jsonl"
                    p = run_main(script, *args, "--log_jsonl", log)
                    records = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
                    done.write_text(json.dumps({"returncode": p.returncode, "stdout": p.stdout,
                                                "stderr": p.stderr, "records": records}))
                seen[key] = SimpleNamespace(**json.loads(done.read_text()))
        return seen[key]
    return get


@pytest.fixture(scope="session", autouse=True)
def train_each_teacher_once():
    """tt.train_teacher is deterministic (its weights and data come from their own seeds) and leaves the
    global RNG as it found it, so a teacher trained once per setting and handed out as a copy changes
    nothing a run prints: the OPD runs that train theirs in memory then pay for it once."""
    real, trained = tt.train_teacher, {}

    def train_teacher(tok, task, steps, seed, device):
        setting = tuple(sorted((k, v) for k, v in vars(task).items() if isinstance(v, (bool, int, float, str))))
        key = (type(task), setting, steps, seed, str(device), tuple(sorted(tok.get_vocab().items())))
        if key not in trained:
            trained[key] = real(tok, task, steps, seed, device)
        return copy.deepcopy(trained[key])

    tt.train_teacher = train_teacher
    yield
    tt.train_teacher = real


# ---------------------------------------------------------------------------------------------------------
# The short runs: their flags and their lines.

FAST = ["--steps", 2, "--warmup_steps", 2, "--eval_every", 0, "--prompts_per_step", 4]
SHARED_KEYS = ["step", "reward", "loss", "entropy", "ratio", "clip_frac", "kl", "grad_norm", "len",
               "gen_tokens"]
# each file's short run: FAST and what the file needs besides (OPD a teacher that trains for 2 steps and is
# not held to an accuracy; the pedagogical teacher's two warm-ups cut to 2 steps; VPO's evaluation at the
# fewest chains best@9 takes, 3 of 3 answers: its evaluation is most of the run's time)
SHORT = {name: list(FAST) for name in ("pg", "grpo", "drgrpo", "dapo", "tpo", "dg", "tree_grpo", "ppo", "sft", "dpo")}
SHORT["opd"] = ["--steps", 2, "--warmup_steps", 2, "--eval_every", 0, "--prompts_per_step", 8,
                "--teacher_steps", 2, "--teacher_min_acc", 0]
SHORT["pedagogical"] = ["--steps", 2, "--warmup_steps", 2, "--teacher_warmup_steps", 2, "--teacher_mix_steps", 2,
                        "--eval_every", 0, "--prompts_per_step", 8, "--student_batch", 32]
SHORT["vpo"] = FAST + ["--eval_chains", 3]


def strip_time(out):
    """A run's lines without the wall time, which differs between two runs of the same seed."""
    return [ln.split(" time_s=")[0] for ln in out.splitlines()]


def step_record(line):
    return dict(kv.split("=") for kv in line.split())


def step_line(p, step=1):
    """The `step=N` line of a run that succeeded, as {key: value}."""
    assert p.returncode == 0, p.stderr
    return step_record(next(line for line in p.stdout.splitlines() if line.startswith(f"step={step} ")))


# ---------------------------------------------------------------------------------------------------------
# A tiny policy, a ragged batch, and one update with a stand-in optimizer that keeps the gradient: what every
# test of an update() shares. The batch's micro-batches hold very different token counts (the case where a
# per-micro-batch token mean is not the batch's).


def tiny_policy(task_name="reverse", seed=0, warmup=5):
    """A tiny Llama (its weights drawn from `seed`), partly warmed up, with its tokenizer and task."""
    torch.manual_seed(seed)
    task = tt.make_task(task_name)
    tok = tt.build_char_tokenizer(task.alphabet)
    model = tt.build_tiny_model(tok)
    tt.supervised_warmup(model, tok, task, warmup, seed)
    return task, tok, model


def ragged_rollout(tok, task, prompts=3, group=4, budget=10, seed=0, temperature=1.0):
    """prompts x group completions of letters: every completion of the first group is 1 token long (its
    EOS), every one of the last group runs the whole budget without an EOS (truncated), the groups in
    between are of random lengths. Micro-batches of one prompt then hold 4 tokens and 40."""
    rng = random.Random(seed)
    examples = task.sample(rng, prompts)
    ids, mask = tt.encode(tok, [ex.prompt for ex in examples for _ in range(group)], "cpu")
    letters = [tok.convert_tokens_to_ids(c) for c in task.letters]
    n = prompts * group
    comp = torch.tensor([[rng.choice(letters) for _ in range(budget)] for _ in range(n)])
    lengths = [1] * group + [rng.randint(2, budget - 1) for _ in range(n - 2 * group)] + [budget] * group
    for row, length in enumerate(lengths[:n - group]):
        comp[row, length - 1] = tok.eos_token_id
    cmask = tt.completion_mask_from(comp, tok.eos_token_id)
    truncated = ~(comp == tok.eos_token_id).any(1)
    texts = [tok.decode(row[m.bool() & (row != tok.eos_token_id)]) for row, m in zip(comp, cmask)]
    return tt.Rollout(ids, mask, comp, cmask, truncated, texts, temperature), examples


class KeepGradient:
    """An optimizer stand-in: zero_grad() clears the gradient, step() leaves it for the test to read."""

    def __init__(self, model):
        self.model = model

    def zero_grad(self):
        self.model.zero_grad(set_to_none=True)

    def step(self):
        pass


def gradient_and_log(model, run_update):
    """Run `run_update(optimizer)` once with the stand-in optimizer; return the flat gradient (run it
    with a max_grad_norm large enough that clipping does not act) and what the update returned,
    flattened into {name: float}."""
    out = run_update(KeepGradient(model))
    grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in model.parameters()])
    log = {}
    for i, item in enumerate(out if isinstance(out, tuple) else (out,)):
        if isinstance(item, dict):
            log.update({k: float(v) for k, v in item.items()})
        elif item is not None:
            log[f"value{i}"] = float(item)
    return grad, log


def assert_same_update(results, rtol=1e-5):
    """results: {micro_batch: (gradient, log)}. Every micro-batch setting gives the whole batch's
    gradient (relative difference of the vectors below rtol) and the same logged values. Returns the
    largest relative gradient difference seen, for the report."""
    (_, (g0, log0)), *rest = sorted(results.items())
    assert g0.norm() > 0, "the whole-batch gradient is zero: the comparison would prove nothing"
    worst = 0.0
    for mb, (g, log) in rest:
        rel = ((g - g0).norm() / g0.norm()).item()
        worst = max(worst, rel)
        print(f"--micro_batch {mb}: relative gradient difference {rel:.1e}")  # shown with pytest -s
        assert rel < rtol, f"--micro_batch {mb}: gradient differs by {rel:.2e} (relative)"
        assert log.keys() == log0.keys()
        for k in log0:
            assert abs(log[k] - log0[k]) <= rtol * max(1.0, abs(log0[k])), \
                f"--micro_batch {mb}: logged {k} {log[k]} against {log0[k]} for the whole batch"
    return worst


# ---------------------------------------------------------------------------------------------------------
# The one reference clipped surrogate, written from the formula (and verl's pg_clipfrac): test_every_file.py
# runs it against every file's policy_loss and update(), and the wiring tests against what each update call
# returned in a run.


def reference_clip(logp, old, ref, adv, mask, eps_low, eps_high, beta, weight):
    """The PPO clipped surrogate per token, max(-A rho, -A clip(rho)), plus beta k3(pi || ref), summed with
    each token's weight in the aggregation. Returns the loss, its gradient in closed form (no autograd),
    and verl's pg_clipfrac: the share of real tokens where the clipped term is the larger loss."""
    a = adv if adv.dim() == 2 else adv[:, None].expand_as(old)
    ratio = (logp.detach() - old).exp()
    unclipped, clipped = -a * ratio, -a * ratio.clamp(1 - eps_low, 1 + eps_high)
    d = ref - logp.detach()
    k3 = d.exp() - d - 1
    loss = ((torch.maximum(unclipped, clipped) + beta * k3) * weight).sum()
    took_clip = clipped > unclipped  # (N, T) the clip removed this token's gradient
    # d/dlogp: -A rho where the unclipped term is active, 0 where clipped; beta (1 - pi_ref / pi) for k3
    grad = (-a * ratio * ~took_clip + beta * (1 - d.exp())) * weight
    mean = lambda x: (x * mask).sum() / mask.sum()
    return loss, grad, {"clip_frac": mean(took_clip.float()), "ratio": mean(ratio), "k3_ref": mean(k3),
                        "k3_old": mean(((old - logp.detach()).exp() - (old - logp.detach()) - 1))}


def seq_mean(mask, n):
    return mask / mask.sum(1, keepdim=True).clamp(min=1) / n  # per-sequence token mean, then / n


# each clipped file's update, as its Args set it: eps_low, eps_high, beta, token weights, kl logged against
IN_SITU = {"grpo": (0.2, 0.2, 0.04, lambda m, n, tok: seq_mean(m, n), "k3_ref"),
           "drgrpo": (0.2, 0.2, 0.04, lambda m, n, tok: m / 10 / n, "k3_ref"),  # L_max: the budget, 10
           "vpo": (0.2, 0.2, 0.04, lambda m, n, tok: seq_mean(m, n), "k3_ref"),
           "tree_grpo": (0.2, 0.2, 0.04, lambda m, n, tok: seq_mean(m, n), "k3_ref"),
           "dapo": (0.2, 0.28, 0.0, lambda m, n, tok: m / tok, "k3_old"),
           "pedagogical": (0.2, 0.2, 0.0, lambda m, n, tok: seq_mean(m, n), "k3_old")}


def check_update_in_situ(name, before, rollout, adv, old_logp, ref_logp, out):
    """What one update call returned (loss, stats, entropy) against the reference clipped surrogate on the
    policy as it was before the call: the file's own clip range, beta and aggregation, in the run."""
    eps_low, eps_high, beta, weight, kl_to = IN_SITU[name]
    mask = rollout.completion_mask
    logp, entropy = tt.score(before, rollout)
    n, tokens = mask.size(0), mask.sum()
    want_loss, _, want = reference_clip(logp, old_logp, ref_logp, adv, mask, eps_low, eps_high, beta,
                                        weight(mask, n, tokens))
    loss, stats, got_entropy = out[:3]
    assert float(loss) == pytest.approx(want_loss.item(), rel=1e-4, abs=1e-6)
    assert float(stats["clip_frac"]) == pytest.approx(want["clip_frac"].item(), abs=1e-6)
    assert float(stats["ratio"]) == pytest.approx(want["ratio"].item(), rel=1e-5)
    assert float(stats["kl"]) == pytest.approx(want[kl_to].item(), rel=1e-4, abs=1e-7)
    assert float(got_entropy) == pytest.approx(((entropy * mask).sum() / mask.sum()).item(), rel=1e-5)
    return want["clip_frac"].item()


# ---------------------------------------------------------------------------------------------------------
# A file's main loop, spied on in a two-step run: what the update is given. pi_old must be the policy that
# sampled, the same in every epoch; the reference the base model, frozen (at step 1 the policy and the base
# are equal, so the checks read step 2); the advantage the file's own function of the rewards just scored.
# --temperature 0.7 makes a log-prob taken at the wrong temperature show.


class Spy:
    """Records a run's calls: the policy as setup() returned it (and a frozen copy, the base), each
    sampling call with a copy of the model that sampled, and each call of the patched functions."""

    def __init__(self, monkeypatch):
        self.monkeypatch, self.samples, self.calls = monkeypatch, [], {}
        setup = tt.setup

        def spy_setup(*a, **k):
            out = setup(*a, **k)
            self.live, self.base = out[1], copy.deepcopy(out[1])
            return out
        monkeypatch.setattr(tt, "setup", spy_setup)

    def sampler(self, owner, name):
        """Record every call of owner.name with a copy of the model (its first argument) beforehand."""
        real = getattr(owner, name)

        def spy(model, *a, **k):
            before = copy.deepcopy(model)
            out = real(model, *a, **k)
            self.samples.append({"model": model, "before": before, "args": a, "kwargs": k, "out": out})
            return out
        self.monkeypatch.setattr(owner, name, spy)

    def record(self, owner, name):
        """Record every call of owner.name: its positional arguments and what it returned. An update
        (name "update") also records a copy of the model it was given, as it was before the call."""
        real = getattr(owner, name)
        calls = self.calls.setdefault(name, [])

        def spy(*a, **k):
            before = copy.deepcopy(a[0]) if name == "update" else None
            out = real(*a, **k)
            calls.append((a, out) if before is None else (a, out, before))
            return out
        self.monkeypatch.setattr(owner, name, spy)


def score(model, rollout):
    return tt.score(model, rollout)[0]


def check_epochs(calls, epochs, frozen):
    """Every epoch of a step gets the same batch: the first call's arguments at the `frozen` positions."""
    assert len(calls) == epochs
    for later in calls[1:]:
        for i in frozen:
            assert later[i] is calls[0][i] or torch.equal(later[i], calls[0][i]), f"argument {i} moved between epochs"


def check_two_steps_end_to_end(p):
    """A short run's output contract (FAST: two steps, held-out evaluations before and after): the step lines
    lead with the shared keys, the final line has the accuracy, exact match and time, and the log holds the
    same records in order."""
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert lines[1].startswith("step=1 reward=") and " loss=" in lines[1]
    keys = [kv.split("=")[0] for kv in lines[1].split()][:10]
    assert keys == ["step", "reward", "loss", "entropy", "ratio", "clip_frac", "kl", "grad_norm", "len", "gen_tokens"]
    assert lines[-1].startswith("final test_acc=") and " exact=" in lines[-1] and " time_s=" in lines[-1]
    records = p.records
    assert [r["kind"] for r in records] == ["eval", "step", "step", "eval", "final"]
    assert records[1]["step"] == 1 and "entropy" in records[1]


def check_run(p, extra_keys):
    """A short run that ended, with the shared keys first on its step lines and the method's own last."""
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert lines[-1].startswith("final") and "test_acc=" in lines[-1]
    step_line = next(line for line in lines if line.startswith("step="))
    keys = [kv.split("=")[0] for kv in step_line.split()]
    assert keys[:len(SHARED_KEYS)] == SHARED_KEYS and keys[-len(extra_keys):] == extra_keys


def compare(model, run, args_for):
    """One update with --micro_batch 0 (the whole batch), 1 and 2, `run(optimizer, args_for(mb))`: the
    same gradient and log whatever the setting (assert_same_update)."""
    results = {}
    for mb in (0, 1, 2):
        torch.manual_seed(7)  # the same draws for a stochastic screen (DG's Kondo gate)
        results[mb] = gradient_and_log(model, lambda opt: run(opt, args_for(mb)))
    return assert_same_update(results)
