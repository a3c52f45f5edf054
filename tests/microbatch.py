"""What every file's micro-batch test shares: a batch whose micro-batches hold very different token
counts (the case where a per-micro-batch token mean is not the batch's), an optimizer that keeps the
gradient instead of stepping, and the comparison of one update with and without --micro_batch."""
import random

import torch

import toy_tasks as tt


def tiny_policy(task_name="reverse", seed=0, warmup=5):
    """A partly warmed-up tiny Llama, its tokenizer and task."""
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
