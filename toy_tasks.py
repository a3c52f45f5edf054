"""Everything that is *not* the algorithm, shared by every minimal_*.py file: `import toy_tasks as tt`.

Advantages, targets, gates, losses and the update itself live in the method files, in plain sight.
The default policy is a real `transformers.LlamaForCausalLM` built from a config, with a real
`PreTrainedTokenizerFast` over the task's characters, so `--model NAME_OR_PATH` swaps in any Hugging
Face causal LM. Nothing is downloaded unless a flag asks (`--model` with a hub id, `--task gsm8k`).

The map: every public name, in the order a step meets it, one line each (a name set further in is
one that the name above it calls; the files call it directly only where they need it).

  Settings and setup
    parse_args(Args)               the file's dataclass of settings -> flags; each field's docstring is its help
    field_docs(cls)                  reads those docstrings from the class source
    check_common_args(args)        the checks every file shares: one sentence naming the flag, exit status 2
    check_log_path(path)             --log_jsonl: creates missing folders, refuses an unwritable path
    pick_device(name, pretrained)    --device auto: the tiny model on the CPU, a --model on CUDA, MPS, CPU
    setup(args)                    seeds, then make_task, load_policy, Logger -> (task, model, tok, device, logger, rng)
  Tasks
    make_task(name, ...)           a toy task by name (TASKS, TASK_NAMES), or gsm8k from gsm8k.py
    first_held_out(task, n)          --eval_size: evaluate the first n held-out prompts of a toy task
    Example                          prompt, answer, and the privileged context only a teacher sees
    Task                             base: held-out set, sample(rng, n), reward, rewards, attach(tok), extra_metrics
    char_accuracy(pred, target)      per-character credit, the reward of reverse
    ReverseTask, AddTask, TokenReversalTask   reverse, add, tokrev
  The policy
    load_policy(args, task, device)  the tiny Llama, warmed up, or load_pretrained(--model); task.attach(tok)
    build_char_tokenizer(alphabet)   a real PreTrainedTokenizerFast over the task's characters
    build_tiny_model(tok)            a 2-layer LlamaForCausalLM built from a config
    supervised_warmup(model, ...)    teacher-forced steps on right answers: a partly competent base model
    load_pretrained(name)            any Hugging Face causal LM and its tokenizer, float32 weights
    no_dropout(model)                dropout off in every model a file trains or scores (TRL does the same)
    autocast_dtype(args, device)     bfloat16 autocast for a --model on CUDA, else float32
  One step
    Rollout                        a batch of completions: ids, masks up to the first EOS, texts, temperature
    rollout_groups(...)            sample group_size completions per prompt, then task.rewards -> (P, G)
    encode(tok, texts, device)       left-padded prompt ids and mask
    sample(model, tok, ...)          KV-cached sampling (greedy for evaluation)
    rollout_from(ids, mask, tokens)  a Rollout from sampled tokens (also tree GRPO's joined rows)
    completion_mask_from(ids, eos)   1 up to and including the first EOS
    score(model, rollout, rows)    log-probs and entropies without gradient, micro-batch by micro-batch
    micro_batches(n, rows)         row slices of whole groups; each file's update() loops over them
    token_logprobs(model, rollout) per-token log-probs (with gradient) and entropies of one micro-batch
    completion_logits(model, r, T)   the logits at completion positions only, divided by T
    forward(model, ids, ...)         one forward pass under the model's autocast, completion positions kept
    keeps_logits(model)              whether trimming the logits to those positions saves memory
    entropy_from_logprobs(logp)      the full next-token entropy, chunked
    masked_mean(x, mask)           a token mean over real tokens
    BatchMetrics                   the whole batch's logged means, added up micro-batch by micro-batch
    check_finite(value, step)      a NaN or Inf stops the run and names the step
    mean_length_wrong(r, rewards)  the mean length of completions that are not fully right
  Evaluation and logging
    evaluate(model, tok, task, ...) greedy held-out decoding -> (test_acc, exact, {entropy, task columns})
    Logger                         step / eval / final lines, and JSON lines with time_s
    fmt(value)                       how a number is printed on a line
    fail(message)                  stop with one sentence, exit status 2

  Named for their one user (kept here because that file is at its 300-line cap)
    minimal_pedagogical.py           KeyedReverseTask, with_prompts, copy_view, is_other_answer,
                                     evaluate_teacher, sampled_exact
    minimal_opd.py                   load_teacher, train_teacher, TEACHER_SEED
    minimal_tree_grpo.py             repad
    minimal_ppo.py                   completion_hidden
    minimal_vpo.py                   AnswerSetTask, parse_answers, quality_brevity, SET_MARKER
"""
import ast
import argparse
import contextlib
import dataclasses
import functools
import inspect
import json
import os
import random
import re
import sys
import time
from dataclasses import dataclass

import torch

# --------------------------------------------------------------------------------------------------
# Loud failures: one sentence, no traceback, non-zero exit.


def fail(message):
    """Stop the program with a one-sentence error (exit status 2), before or during a run."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_finite(value, step, name="loss"):
    """A NaN or Inf anywhere in training stops the run and says at which step."""
    if not torch.isfinite(torch.as_tensor(value)).all():
        fail(f"{name} is not finite at step {step}; lower --lr or check the reward")


# --------------------------------------------------------------------------------------------------
# Tasks. A task makes prompts, scores completions (as text, so any tokenizer can play) and owns a
# fixed held-out test set that never overlaps the training strings.


@dataclass
class Example:
    prompt: str  # what the policy sees, e.g. "abcd="
    answer: str  # the reference answer, e.g. "dcba"
    context: str  # privileged information that only a teacher may see (here: the answer itself)


def char_accuracy(pred, target):
    """Per-character credit: matches at aligned positions over the longer of the two lengths.

    A completion of the wrong length loses credit for every missing or extra character, so the
    reward cannot be gamed by stopping early or rambling: "dcba" vs "dcba" -> 1, "dcb" -> 0.75,
    "dcbaa" -> 0.8, "" -> 0.
    """
    n = max(len(pred), len(target))
    return sum(p == t for p, t in zip(pred, target)) / n if n else 1.0


class Task:
    name = ""
    alphabet = ""  # every character a prompt, answer or privileged context can contain
    separator = "|"  # joins privileged context to a prompt for a teacher's view
    warmup_steps = 40  # supervised warm-up steps that give this task's base model (--warmup_steps -1)
    ends_with_eos = True  # a completion ends with the end-of-sequence token; False: at the token budget
    max_new_tokens = 10  # the task's own token budget per completion (--max_new_tokens -1)

    def __init__(self, binary=False, test_size=256, test_seed=1234):
        self.binary = binary
        test_rng = random.Random(test_seed)  # fixed: the same test set for every run seed
        self.test = []
        seen = set()
        while len(self.test) < test_size:
            ex = self.make_example(test_rng)
            if ex.prompt not in seen:
                seen.add(ex.prompt)
                self.test.append(ex)
        self.test_prompts = seen

    def make_example(self, rng):
        raise NotImplementedError

    def sample(self, rng, n):
        """n fresh training examples from a seeded `random.Random`; never a held-out prompt."""
        out = []
        while len(out) < n:
            ex = self.make_example(rng)
            if ex.prompt not in self.test_prompts:
                out.append(ex)
        return out

    def dataset(self, examples):
        """The same examples as a `datasets.Dataset` (columns prompt, answer, context)."""
        import datasets  # imported here: it is slow to import and only needed on request

        return datasets.Dataset.from_list([dataclasses.asdict(ex) for ex in examples])

    def teacher_prompt(self, ex):
        """The prompt with the privileged context in front, for methods with a privileged teacher."""
        return ex.context + self.separator + ex.prompt

    def reward(self, text, ex):
        """Scalar reward of one completion (text up to, not including, the end-of-sequence token)."""
        if self.binary:
            return float(text == ex.answer)
        return char_accuracy(text, ex.answer)

    def rewards(self, texts, examples, truncated=None):
        """Rewards of a batch as a float tensor of shape (N,). `truncated` (N,) bool marks completions
        that never emitted EOS; a scalar task scores them as written."""
        return torch.tensor([self.reward(t, ex) for t, ex in zip(texts, examples)])

    def warmup_batch(self, rng, n):
        """The examples one supervised warm-up step trains on: n fresh training examples."""
        return self.sample(rng, n)

    def test_metrics(self, texts, examples):
        """Held-out (test_acc, exact) of greedy completions: per-character accuracy and exact match."""
        acc = sum(char_accuracy(t, ex.answer) for t, ex in zip(texts, examples)) / len(examples)
        return acc, sum(t == ex.answer for t, ex in zip(texts, examples)) / len(examples)

    def attach(self, tok, max_new_tokens):
        """Meet the policy's tokenizer before any prompt is drawn: a toy task checks that its longest
        held-out answer fits the token budget (GSM8K writes its prompts in the tokenizer's chat template)."""
        need = max(len(tok(ex.answer, add_special_tokens=False).input_ids) for ex in self.test) + self.ends_with_eos
        if max_new_tokens < need:
            fail(f"--max_new_tokens {max_new_tokens} is too small for task {self.name!r}: its answers need "
                 f"up to {need} tokens" + (" including the end-of-sequence token" if self.ends_with_eos else ""))

    def extra_metrics(self, texts):
        """Columns a task adds at the end of the step and eval lines, from completions' texts (none for
        the toys; GSM8K's `format`). The files pass them to the Logger: `**task.extra_metrics(texts)`."""
        return {}


class ReverseTask(Task):
    """Reverse a random string: "abcd=" -> "dcba". Dense partial credit by default, `--binary` for
    exact match. Strings are drawn from a small alphabet with a length range, so the policy must get
    both the characters and the length right."""
    name = "reverse"
    letters = "abcd"
    alphabet = letters + "=|"

    def __init__(self, min_len=3, max_len=6, **kw):
        self.min_len, self.max_len = min_len, max_len
        super().__init__(**kw)

    def make_example(self, rng):
        s = "".join(rng.choice(self.letters) for _ in range(rng.randint(self.min_len, self.max_len)))
        return Example(prompt=s + "=", answer=s[::-1], context=s[::-1])


class AddTask(Task):
    """Add a number below 100 and a digit: "37+5=" -> "42". Exact-match reward only: the sparse-reward
    counterpart. Calibrated so that RL has something to sharpen: the tiny model learns addition slowly
    and with a sudden jump, so two two-digit numbers after 40 warm-up steps gave an exact-match base of
    0.01 (nearly every group flat, nothing to learn; still 0.09-0.11 after 400 steps), while this task
    after its own 150 warm-up steps starts at exact 0.39, 0.39 and 0.13 on seeds 0, 1 and 2."""
    name = "add"
    alphabet = "0123456789+=|"
    warmup_steps = 150

    def __init__(self, max_value=99, max_digit=9, **kw):
        self.max_value, self.max_digit = max_value, max_digit
        super().__init__(**kw)

    def make_example(self, rng):
        a, b = rng.randint(0, self.max_value), rng.randint(0, self.max_digit)
        return Example(prompt=f"{a}+{b}=", answer=str(a + b), context=str(a + b))

    def reward(self, text, ex):
        return float(text == ex.answer)


class TokenReversalTask(Task):
    """The rl-experiments token-reversal setting (METHODS.md section 11): strings of exactly 10 symbols
    over a 2-letter alphabet, reward the fraction of positions right, from random weights (no warm-up).
    As in the source, a completion is exactly 10 tokens with no end-of-sequence token (one sampled
    early ends it, and the missing positions count as wrong), and the held-out set is 1000 strings drawn
    at random with replacement: with 2^10 = 1024 strings it cannot be disjoint from training, so
    training draws from every string. Fixed here (seed 1234), where the source redraws it at each
    evaluation."""
    name = "tokrev"
    letters = "ab"
    alphabet = letters + "="
    warmup_steps = 0
    ends_with_eos = False

    def __init__(self, length=10, binary=False, test_size=1000, test_seed=1234):
        self.length, self.binary = length, binary
        test_rng = random.Random(test_seed)
        self.test = [self.make_example(test_rng) for _ in range(test_size)]
        self.test_prompts = set()  # nothing is held out of training

    def make_example(self, rng):
        s = "".join(rng.choice(self.letters) for _ in range(self.length))
        return Example(prompt=s + "=", answer=s[::-1], context=s[::-1])


# --------------------------------------------------------------------------------------------------
# Two correct answers, only one of them learnable: the task for a teacher with privileged context
# (minimal_pedagogical.py).


class KeyedReverseTask(ReverseTask):
    """Reverse a string, scored by exact match, where the verifier also accepts a per-prompt *key*: the
    reversal with its first character replaced by another letter, both seeded by the string, so the
    key never equals the reversal. The key stands for a correct solution that relies on information the
    student does not have: from the prompt alone its first character is a blind guess (1 in 3 even
    for a policy that knows the reversal and knows that it must not write it).
    The privileged context lists both accepted answers in an order also seeded by the string
    ("bbac|dbac" or "dbac|bbac" for "cabd="), and `teacher_prompt` puts it in front of the prompt
    ("bbac|dbac|cabd="). `answer` is the reversal alone, so held-out evaluation of a student scores it
    against the reversal only. Prompts are drawn exactly as `reverse` draws them: same held-out set,
    same training strings for the same seed."""
    name = "keyed"

    def __init__(self, binary=True, **kw):
        super().__init__(binary=True, **kw)  # always exact match: the verifier accepts two strings

    def key(self, s):
        """The key of string s (the prompt without "="), and whether the context lists it first."""
        rng = random.Random("key:" + s)  # a str seed is hashed with SHA-512: the same in every process
        rev = s[::-1]
        key = rng.choice([c for c in self.letters if c != rev[0]]) + rev[1:]
        return key, rng.random() < 0.5

    def make_example(self, rng):
        ex = super().make_example(rng)
        key, key_first = self.key(ex.prompt[:-1])
        listed = (key, ex.answer) if key_first else (ex.answer, key)
        return Example(prompt=ex.prompt, answer=ex.answer, context=self.separator.join(listed))

    def reward(self, text, ex):
        return float(text == ex.answer or text == self.key(ex.prompt[:-1])[0])


TASKS = {"reverse": ReverseTask, "add": AddTask, "tokrev": TokenReversalTask, "keyed": KeyedReverseTask}
TASK_NAMES = [*TASKS, "gsm8k"]  # gsm8k is built from data (a download or --data), not generated


def make_task(name, binary=False, data="", eval_size=0):
    if name == "gsm8k":
        import gsm8k  # a real task from data: imported (with `datasets`) only when asked for

        return gsm8k.GSM8KTask(data, eval_size)
    if name not in TASKS:
        fail(f"--task {name!r} is unknown; choose one of {', '.join(TASK_NAMES)}")
    return first_held_out(TASKS[name](binary=binary), eval_size)


def first_held_out(task, eval_size):
    """--eval_size N on a toy task (0: every held-out prompt): a quicker, noisier evaluation of the first N;
    training still avoids every held-out prompt."""
    if eval_size > len(task.test):
        fail(f"--eval_size {eval_size} is larger than the {task.name} task's held-out set ({len(task.test)} prompts)")
    if eval_size:
        task.test = task.test[:eval_size]
    return task


# --------------------------------------------------------------------------------------------------
# Answer sets with a vector reward (minimal_vpo.py). One completion holds m answers, "a1|a2|a3", and
# every answer is scored on two objectives that conflict: quality against brevity.

SET_MARKER = "|"  # a prompt that starts with it asks for a set of answers: "|cabd=" -> "dbac|db|d"


def quality_brevity(answer, target):
    """The reward vector of one answer: (quality, brevity) = (char_accuracy, 1 - (|answer|/n)^2 if the answer
    is a prefix of the target, else 0), n = |target|. Brevity is paid only for what is right so far, as the
    VPO paper's maze pays nothing to a route that misses the exit: a wrong "x" for "dbac" scores (0, 0), not
    (0, 0.94). A correct prefix of j characters scores (x, 1 - x^2), x = j/n: a concave front, so every
    weighting has its own best length (w = (a, 1 - a) wants x = a / (2 - 2a)): under (0.5, 0.5) the
    half-length prefix (0.5, 0.75) scores 0.625, one character 0.594 and the full answer 0.5 at n = 4."""
    brevity = 1 - (len(answer) / len(target)) ** 2 if target.startswith(answer) else 0.0
    return [char_accuracy(answer, target), brevity]


def parse_answers(text, m, truncated=False, dedup=True):
    """The first m parts of "a1|a2|...", padded to m; a part that scores a zero row comes back as "":
    an empty part, the unfinished last part of a truncated completion (scored, it would earn brevity
    for being cut off) and, with dedup, a copy of an earlier part."""
    parts = text.split(SET_MARKER)
    if truncated:
        parts[-1] = ""  # no EOS within the budget: the last part was cut off
    out = []
    for part in (parts + [""] * m)[:m]:
        out.append("" if dedup and part in out else part)
    return out


class AnswerSetTask(ReverseTask):
    """`reverse` asking for m answers in one completion, each scored by `quality_brevity`: the reward of a
    completion is an (m, 2) matrix, zero rows for what `parse_answers` blanks. m = 1 is the plain format
    ("cabd=" -> "dbac"); m > 1 puts SET_MARKER before the prompt. The warm-up trains on both formats, half
    of every batch each, the set format with the reversal written three times, so the same base serves
    every m: competent in both formats and collapsed in sets (three equal answers), as an LLM asked for
    several answers often repeats itself. 70 steps keep its plain-format greedy per-character accuracy
    near ReverseTask's 40-step base."""
    warmup_steps = 70
    warmup_set_size = 3  # answers per set in the warm-up, whatever m the run trains with

    def __init__(self, m=3, **kw):
        self.m = m
        super().__init__(**kw)

    def make_example(self, rng):
        ex = super().make_example(rng)
        return ex if self.m == 1 else Example(SET_MARKER + ex.prompt, ex.answer, ex.context)

    def tokens_needed(self):
        """The token budget m answers need: up to max_len characters each, each closed by '|' or EOS."""
        return self.m * (self.max_len + 1)

    def warmup_batch(self, rng, n):
        out = []
        for i, ex in enumerate(self.sample(rng, n)):  # the same draws for every m: the same base
            plain = ex.prompt.removeprefix(SET_MARKER)
            if i % 2 == 0:
                out.append(Example(plain, ex.answer, ex.context))
            else:
                answers = SET_MARKER.join([ex.answer] * self.warmup_set_size)
                out.append(Example(SET_MARKER + plain, answers, ex.context))
        return out

    def reward_matrix(self, text, ex, truncated=False, dedup=True):
        """(m, 2) rows (quality, brevity) of one completion's first m answers."""
        return [quality_brevity(a, ex.answer) if a else [0.0, 0.0]
                for a in parse_answers(text, self.m, truncated, dedup)]

    def rewards(self, texts, examples, truncated=None):
        """Reward matrices of a batch, (N, m, 2), duplicates scored as zero rows."""
        truncated = [False] * len(texts) if truncated is None else truncated.tolist()
        return torch.tensor([self.reward_matrix(t, ex, tr) for t, ex, tr in zip(texts, examples, truncated)])


# --------------------------------------------------------------------------------------------------
# The policy: a tiny Llama and a character tokenizer built locally, or any Hugging Face causal LM.


def build_char_tokenizer(alphabet):
    """A character-level `PreTrainedTokenizerFast`: one token per character plus pad/bos/eos/unk.
    The four special tokens are single characters too ("_" pad, "^" bos, "." eos, "?" unk), so a
    special token sampled inside a completion decodes to one wrong character and the characters after
    it keep their positions (a five-letter "<pad>", or a pad decoded to nothing, would shift them)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["_", "^", ".", "?"]  # <pad>, <bos>, <eos>, <unk>
    if set(specials) & set(alphabet):
        raise ValueError(f"the alphabet {alphabet!r} uses one of the special characters {''.join(specials)}")
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(alphabet)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.post_processor = processors.TemplateProcessing(single="^ $A", special_tokens=[("^", 1)])
    backend.decoder = decoders.Fuse()  # "d","c","b" -> "dcb", no spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="_", bos_token="^",
                                   eos_token=".", unk_token="?", padding_side="left")


def build_tiny_model(tok, hidden=64, layers=2, heads=8):
    """A 2-layer, 64-wide, 8-head Llama (about 0.1M parameters), weights drawn from `torch.manual_seed`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config._attn_implementation = "eager"  # faster than SDPA at this size on a CPU
    return LlamaForCausalLM(config)


def load_pretrained(name, flag="--model"):
    """Any Hugging Face causal LM and its tokenizer, from a local folder or the hub (never remote code).
    `flag` is the command-line flag that named it, for the error messages."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    looks_like_path = name.startswith((".", "/", "~"))  # a hub id is "org/name": never starts so
    if looks_like_path and not os.path.isdir(os.path.expanduser(name)):
        fail(f"{flag} {name!r} is not an existing folder")
    try:
        tok = AutoTokenizer.from_pretrained(os.path.expanduser(name), padding_side="left")
        # float32 weights whatever the checkpoint holds (transformers 5 keeps a bfloat16 checkpoint in
        # bfloat16): the optimizer's moments and updates need them; bfloat16 is for the forward passes only
        model = no_dropout(AutoModelForCausalLM.from_pretrained(os.path.expanduser(name)).float())
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fail(f"{flag} {name!r} could not be loaded as a local folder or hub id ({first})")
    if tok.eos_token_id is None:
        fail(f"{flag} {name!r} has a tokenizer without an end-of-sequence token")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # the completion mask is built from the first EOS, so this is safe
    return model, tok


def no_dropout(model):
    """Switch dropout off for good, in training mode too, as TRL does in the policy, reference, value and
    reward models: every nn.Dropout gets p = 0, and so does every float setting named *dropout or *pdrop of
    a module (Llama's and Qwen's attention read `attention_dropout` at each call) or of the config.
    `load_pretrained` applies it to every --model and --teacher; the reference, the critic and a copied
    teacher are copies of the policy, and the tiny default has no dropout. Inert on Llama and Qwen (0
    already); a --model with dropout would otherwise get noisy ratios and a noisy KL. Returns the model."""
    config = getattr(model, "config", None)
    for obj in [*model.modules(), *([config] if config is not None else [])]:
        if isinstance(obj, torch.nn.Dropout):
            obj.p = 0.0
        for name, value in list(vars(obj).items()):
            if isinstance(value, float) and ("dropout" in name or name.endswith("pdrop")):
                setattr(obj, name, 0.0)
    return model


def supervised_warmup(model, tok, task, steps, seed, batch=64, lr=3e-3, view=None, decay=False):
    """Teacher-forced training on a few batches of correct answers: a "base model" that is partly
    competent, so RL sharpens a model as in real post-training instead of starting from noise.
    `view(ex) -> (prompt, target)` trains on another view of each example (default: prompt, answer).
    decay=True lowers the learning rate linearly to 0 over the steps, for a model trained to the end
    (a teacher): at a constant 3e-3 the last steps still jolt it (see `train_teacher`)."""
    rng = random.Random(seed + 10_000)  # its own stream: the warm-up never shifts the RL prompts
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps if decay else 1.0)
    device = next(model.parameters()).device
    view = view or (lambda ex: (ex.prompt, ex.answer))
    for _ in range(steps):
        prompts, targets = zip(*map(view, task.warmup_batch(rng, batch)))
        prompt_ids, prompt_mask = encode(tok, list(prompts), device)
        answers = tok([t + (tok.eos_token if task.ends_with_eos else "") for t in targets],
                      add_special_tokens=False,
                      padding=True, padding_side="right", return_tensors="pt").to(device)
        r = Rollout(prompt_ids, prompt_mask, answers.input_ids, answers.attention_mask.float(),
                    truncated=None, texts=None)
        logp, _ = token_logprobs(model, r)
        loss = -(logp * r.completion_mask).sum() / r.completion_mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()


def load_policy(args, task, device):
    """The policy and tokenizer: the tiny default (built, then warmed up) or a pretrained `--model`."""
    if args.model:
        model, tok = load_pretrained(args.model)
    else:
        tok = build_char_tokenizer(task.alphabet)
        model = build_tiny_model(tok)
    model.to(device)
    model.autocast_dtype = autocast_dtype(args, device)  # read by `forward`; a deepcopy keeps it
    if args.grad_checkpointing:  # recompute each layer's activations in the backward pass instead of storing them
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x's name
        if enable:
            enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    task.attach(tok, args.max_new_tokens)  # every task meets the policy's tokenizer here, before any prompt
    warmup_steps = task.warmup_steps if args.warmup_steps == -1 else args.warmup_steps
    if not args.model and warmup_steps > 0:
        supervised_warmup(model, tok, task, warmup_steps, args.seed)
    return model, tok


# --------------------------------------------------------------------------------------------------
# Teachers: a frozen, stronger model that scores the student's own tokens (on-policy distillation).
# By default the tiny Llama with the student's tokenizer, trained in memory; or any causal LM that
# shares the student's vocabulary. Scored at temperature 1: `completion_logits(teacher, rollout, 1.0)`.

TEACHER_SEED = 1_000_000  # the teacher's seeds are the run's seed plus this: never a student's stream


def train_teacher(tok, task, steps, seed, device):
    """The tiny Llama, supervised on correct answers for `steps` steps with the learning rate decayed
    to 0 (at a constant 3e-3 the last steps still jolt it: 200 steps ended between 0.91 and 0.997
    held-out accuracy over seeds 0-5 on reverse, 0.987-1.0 with the decay). Its initial weights and
    its data come from their own seeds, and the global RNG is restored afterwards, so training a
    teacher shifts neither the student's weights nor its prompts nor its samples."""
    with torch.random.fork_rng(devices=[]):  # the weights are drawn on the CPU, then moved
        torch.manual_seed(seed + TEACHER_SEED)
        teacher = build_tiny_model(tok).to(device)
    supervised_warmup(teacher, tok, task, steps, seed + TEACHER_SEED, decay=True)
    return teacher


def load_teacher(args, task, tok, student, device):
    """The frozen teacher (eval mode, no gradients, never given to an optimizer), evaluated on the
    held-out set before any RL: `--teacher NAME_OR_PATH`, which must share the student's vocabulary,
    or the tiny Llama trained in memory for `--teacher_steps`. A teacher below `--teacher_min_acc`
    stops the run with one sentence. Returns (teacher, {test_acc, exact, entropy, time_s}) for the log."""
    start = time.time()
    if args.teacher:
        teacher, teacher_tok = load_pretrained(args.teacher, flag="--teacher")
        width = lambda m: m.get_output_embeddings().weight.size(0)  # the logits' vocabulary dimension
        if teacher_tok.get_vocab() != tok.get_vocab() or width(teacher) != width(student):
            fail(f"--teacher {args.teacher!r} does not share the student's vocabulary ({len(teacher_tok)} "
                 f"tokens, {width(teacher)} logits against {len(tok)} and {width(student)}), so it cannot "
                 "score the student's tokens")
        teacher.to(device)
        teacher.autocast_dtype = student.autocast_dtype  # the student's precision
    else:
        teacher = train_teacher(tok, task, args.teacher_steps, args.seed, device)
    test_acc, exact, extra = evaluate(teacher, tok, task, device, args.max_new_tokens, args.micro_batch * args.group_size)
    if test_acc < args.teacher_min_acc:
        fix = "use a stronger --teacher" if args.teacher else "raise --teacher_steps"
        fail(f"the teacher's held-out accuracy is {test_acc:.3f}, below --teacher_min_acc "
             f"{args.teacher_min_acc}: {fix}")
    teacher.eval().requires_grad_(False)
    teacher.zero_grad()  # drop the training gradients: nothing flows into the teacher again
    return teacher, {"test_acc": test_acc, "exact": exact, **extra, "time_s": time.time() - start}


# --------------------------------------------------------------------------------------------------
# Sampling and log-probs. Prompts are left-padded so every completion starts in the same column.


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # (N, P) left-padded prompt (or any prefix to continue from)
    prompt_mask: torch.Tensor  # (N, P) 1 on real tokens
    completion_ids: torch.Tensor  # (N, T) sampled tokens, padding after the first EOS
    completion_mask: torch.Tensor  # (N, T) float, 1 up to and including the first EOS
    truncated: torch.Tensor  # (N,) bool, True where no EOS came within the token budget
    texts: list  # N decoded completions, without the EOS
    temperature: float = 1.0  # the policy's log-probs are taken at the temperature that sampled the tokens

    @property
    def lengths(self):
        return self.completion_mask.sum(1)  # (N,) tokens per completion, EOS included

    def rows(self, part):
        """A micro-batch: the completions in the row slice `part`, as a smaller Rollout (views, no copy)."""
        texts = self.texts[part] if self.texts is not None else None
        return Rollout(self.prompt_ids[part], self.prompt_mask[part], self.completion_ids[part],
                       self.completion_mask[part], self.truncated[part], texts, self.temperature)

    def select(self, rows):
        """The completions where rows (N,) bool is True, as a smaller Rollout."""
        texts = [t for t, keep in zip(self.texts, rows.tolist()) if keep] if self.texts is not None else None
        return Rollout(self.prompt_ids[rows], self.prompt_mask[rows], self.completion_ids[rows],
                       self.completion_mask[rows], self.truncated[rows], texts, self.temperature)


def encode(tok, texts, device):
    """Left-padded token ids and attention mask for a list of prompt strings."""
    enc = tok(texts, padding=True, padding_side="left", return_tensors="pt")
    return enc.input_ids.to(device), enc.attention_mask.to(device)


def completion_mask_from(tokens, eos_id):
    """1 for every token up to and including the first EOS, 0 after it: (N, T) float."""
    is_eos = (tokens == eos_id).long()
    eos_before = is_eos.cumsum(1) - is_eos  # how many EOS strictly before each position
    return (eos_before == 0).float()


def repad(ids, keep, pad_id, left):
    """Move each row's kept tokens to its right end (left=True: left padding, a prefix to continue from)
    or to its left end (a completion), in their order, with pad_id elsewhere. ids, keep (R, W) -> ids and
    the new mask (long). Tree rollouts use it to turn prompt + part of a completion into a prompt, and
    prefix + continuation back into a completion."""
    order = torch.sort(keep.long() if left else 1 - keep.long(), dim=1, stable=True).indices
    keep = keep.gather(1, order)
    return torch.where(keep, ids.gather(1, order), pad_id), keep.long()


@torch.no_grad()
def sample(model, tok, prompt_ids, prompt_mask, max_new_tokens, temperature=1.0, greedy=False):
    """Autoregressive sampling with a KV cache; each row stops at its first EOS. The prefill asks for the
    last position's logits only, and the model samples in eval mode (gradient checkpointing, which acts
    only in training mode, would switch the KV cache off)."""
    n, device, training = prompt_ids.size(0), prompt_ids.device, model.training
    model.eval()
    mask = prompt_mask
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    out = forward(model, prompt_ids, mask, positions, keep=1, use_cache=True)
    next_pos = positions[:, -1:] + 1
    done = torch.zeros(n, dtype=torch.bool, device=device)
    tokens = []
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1].float()
        if greedy:
            nxt = logits.argmax(-1)
        else:
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1).squeeze(1)
        nxt = torch.where(done, torch.full_like(nxt, tok.pad_token_id), nxt)
        tokens.append(nxt)
        done |= nxt == tok.eos_token_id
        if done.all():
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out = forward(model, nxt[:, None], mask, next_pos, past_key_values=out.past_key_values, use_cache=True)
        next_pos = next_pos + 1
    model.train(training)
    return rollout_from(prompt_ids, prompt_mask, torch.stack(tokens, 1), tok, temperature)


def rollout_from(prompt_ids, prompt_mask, completion, tok, temperature):
    """A Rollout from sampled completion tokens (N, T): the mask up to the first EOS, columns of padding
    only dropped, the texts decoded. Tree rollouts use it for completions joined from several samples."""
    cmask = completion_mask_from(completion, tok.eos_token_id)
    width = int(cmask.sum(1).max())
    completion, cmask = completion[:, :width], cmask[:, :width]
    truncated = ~(completion == tok.eos_token_id).any(1)
    # the text is every sampled token but the EOS: a stray special token (pad, bos, unk) stays in it as
    # a wrong character, rather than vanishing and letting "dc<pad>ba" pass for "dcba"
    texts = [tok.decode(row[m.bool() & (row != tok.eos_token_id)]) for row, m in zip(completion, cmask)]
    return Rollout(prompt_ids, prompt_mask, completion, cmask, truncated, texts, temperature)


def completion_logits(model, rollout, temperature):
    """Logits that predicted each completion token, divided by `temperature`: (N, T, V), one forward
    pass over prompt+completion that asks the model for the last T + 1 positions only (a prompt
    position's logits would be V floats spent on nothing). The temperature is the caller's choice, never
    implied: the rollout's own sampling temperature for the policy that sampled it (its pi_old, and a
    reference model scored the same way for a KL), 1 for any other model that only scores the tokens (a
    teacher, a frozen student): a teacher divided by the student's sampling temperature would be
    silently tempered. Its output is the largest tensor of a step: call it on one micro-batch at a time."""
    ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], 1)
    mask = torch.cat([rollout.prompt_mask, rollout.completion_mask.long()], 1)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    T = rollout.completion_ids.size(1)
    logits = forward(model, ids, mask, positions, keep=T + 1).logits
    return logits[:, -T - 1:-1].float() / temperature  # (N, T, V): position t predicts completion token t


def token_logprobs(model, rollout, temperature=None):
    """Per-token log-probs of the sampled tokens (with grad) and entropies of the full next-token
    distribution (no grad, a metric): both (N, T). Mask them with `rollout.completion_mask`.
    temperature=None scores at the rollout's sampling temperature, which is right for the policy that
    sampled it; pass temperature=1.0 for any model that only scores (see `completion_logits`)."""
    temperature = rollout.temperature if temperature is None else temperature
    logp_all = completion_logits(model, rollout, temperature).log_softmax(-1)  # (N, T, V)
    logp = logp_all.gather(-1, rollout.completion_ids[..., None]).squeeze(-1)
    return logp, entropy_from_logprobs(logp_all)


def masked_mean(x, mask):
    """Mean of x over the positions where mask is 1 (a token mean: padding never counts)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def mean_length_wrong(rollout, rewards):
    """Mean length of the completions that are not fully right (reward below 1); 0 if there are none.
    Dr. GRPO's diagnostic: under per-sequence length normalisation wrong answers tend to grow."""
    wrong = rewards.reshape(-1) < 1
    return rollout.lengths[wrong].mean() if wrong.any() else torch.tensor(0.0)


def rollout_groups(model, tok, task, examples, group_size, args, device, teacher=False):
    """Sample `group_size` completions per example and score them: the Rollout and rewards (P, G).
    teacher=True samples from the privileged view, `task.teacher_prompt(ex)`."""
    repeated = [ex for ex in examples for _ in range(group_size)]
    prompts = [task.teacher_prompt(ex) if teacher else ex.prompt for ex in repeated]
    prompt_ids, prompt_mask = encode(tok, prompts, device)
    rollout = sample(model, tok, prompt_ids, prompt_mask, args.max_new_tokens, args.temperature)
    rewards = task.rewards(rollout.texts, repeated, rollout.truncated).to(device)
    return rollout, rewards.view(len(examples), group_size, *rewards.shape[1:])  # (P, G) for a scalar reward


@torch.no_grad()
def evaluate(model, tok, task, device, max_new_tokens, rows=0):
    """Greedy decoding on the held-out set: (per-character accuracy, exact-match rate, entropy), the
    entropy being the mean full next-token entropy along the greedy completions (what rl-experiments
    logs as its test entropy; the step lines' entropy is over the sampled training completions).
    rows > 0 bounds the logits held at once as training's micro-batches do: the entropy pass scores
    `rows` completions at a time, and the sampler, which holds one position's logits per row, decodes
    rows * max_new_tokens prompts at a time. 0: everything at once."""
    model.eval()
    texts, entropy, tokens = [], 0.0, 0
    for part in micro_batches(len(task.test), rows * max_new_tokens):
        prompt_ids, prompt_mask = encode(tok, [ex.prompt for ex in task.test[part]], device)
        rollout = sample(model, tok, prompt_ids, prompt_mask, max_new_tokens, greedy=True)
        mask = rollout.completion_mask
        entropy = entropy + (score(model, rollout, rows)[1] * mask).sum()  # summed, then one division
        texts, tokens = texts + rollout.texts, tokens + mask.sum()
    model.train()
    entropy = entropy / tokens.clamp(min=1)  # a token mean over the whole held-out set
    acc, exact = task.test_metrics(texts, task.test)
    return acc, exact, {"entropy": float(entropy), **task.extra_metrics(texts)}


# --------------------------------------------------------------------------------------------------
# Micro-batches, lean log-probs and precision: what lets the same files train a real model. A step's
# batch is cut into micro-batches of whole groups; every forward pass holds one micro-batch's logits,
# and those only at completion positions; gradients add up over the micro-batches into one optimizer
# step, exactly the whole batch's because every loss is divided by a count of the *whole* batch.


def micro_batches(n, rows):
    """Row slices that cut a batch of n rows into micro-batches of `rows` rows, the last one possibly
    smaller; rows 0 (or >= n) gives one slice, the whole batch. The files pass --micro_batch prompts times
    their rows per prompt, so a micro-batch always holds whole groups."""
    rows = rows if 0 < rows < n else max(n, 1)
    return [slice(i, min(i + rows, n)) for i in range(0, n, rows)]


@functools.lru_cache
def keeps_logits(model):
    """Whether asking for fewer positions' logits saves memory: the model takes `logits_to_keep`
    (transformers >= 4.50 causal LMs do) and its vocabulary is wider than its hidden states. The tiny
    default's logits (7 tokens) are smaller than the 64-wide hidden states the pass holds anyway, so it
    keeps them all, and its runs print what they printed before this existed (dropping rows from the
    output layer reorders the float sums of its weight gradient, and sampled runs drift apart)."""
    wide = model.config.vocab_size > model.config.hidden_size
    return wide and "logits_to_keep" in inspect.signature(type(model).forward).parameters


def forward(model, ids, mask, positions, keep=0, **kw):
    """One call of the model. keep > 0 asks for the last `keep` positions' logits only where that saves
    memory (`keeps_logits`; otherwise the model returns them all and the caller slices). The call runs
    under bfloat16 autocast when the policy was loaded for it (`model.autocast_dtype`, see
    `autocast_dtype`): weights, gradients and optimizer state stay float32."""
    if keep and keeps_logits(model):
        kw["logits_to_keep"] = keep
    dtype = getattr(model, "autocast_dtype", None)
    with torch.autocast(ids.device.type, dtype=dtype) if dtype else contextlib.nullcontext():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, **kw)


@torch.no_grad()
def entropy_from_logprobs(logp_all, positions=1024):
    """Entropy of each next-token distribution, (N, T, V) -> (N, T), a metric: no graph, and computed
    `positions` positions at a time, because exp() of the log-probs is one more tensor the size of the
    logits (TRL's entropy_from_logits and verl's chunked entropy do the same)."""
    flat = logp_all.flatten(0, -2)  # (N * T, V)
    return torch.cat([-(c.exp() * c).sum(-1) for c in flat.split(positions)]).view(logp_all.shape[:-1])


@torch.no_grad()
def score(model, rollout, rows=0, temperature=None):
    """`token_logprobs` for a pass that only reads them (pi_old, the reference, a pricing pass): no graph,
    `rows` completions at a time (0: all at once). Returns (N, T) log-probs and entropies."""
    parts = [token_logprobs(model, rollout.rows(part), temperature)
             for part in micro_batches(rollout.completion_ids.size(0), rows)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def completion_hidden(backbone, rollout):
    """The last hidden state at each position that predicts a completion token, (N, T, H), with grad: one
    pass of a causal LM's backbone (`model.base_model`, the model without its LM head, so no vocabulary
    logits at any position), under the autocast `forward` applies (`backbone.autocast_dtype`). Position t
    holds the state before completion token t: a value head reads V(s_t) there (minimal_ppo.py)."""
    ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], 1)
    mask = torch.cat([rollout.prompt_mask, rollout.completion_mask.long()], 1)
    hidden = forward(backbone, ids, mask, (mask.cumsum(1) - 1).clamp(min=0)).last_hidden_state
    return hidden[:, -rollout.completion_ids.size(1) - 1:-1].float()  # (N, T, H), as completion_logits slices


class BatchMetrics:
    """The whole batch's loss and token means, added up from its micro-batches. A micro-batch's loss is
    already divided by a count of the whole batch, so losses add; a token mean (ratio, clip_frac, kl,
    entropy, a gate) is weighted by the micro-batch's share of the batch's `tokens`. With one micro-batch
    the share is exactly 1, so the values are bit for bit those of the unsplit batch."""

    def __init__(self, tokens):
        self.tokens, self.sums = tokens, {}

    def add(self, mask, loss, **token_means):
        share = mask.sum() / self.tokens  # this micro-batch's share of the batch's tokens
        for key, value in {"loss": loss.detach(), **{k: v * share for k, v in token_means.items()}}.items():
            self.sums[key] = value if key not in self.sums else self.sums[key] + value

    def totals(self):
        return dict(self.sums)


def autocast_dtype(args, device):
    """--dtype: auto is bfloat16 autocast for a --model on CUDA and float32 everywhere else (the tiny
    default, the CPU, MPS); None means plain float32. Weights and optimizer state are float32 either way."""
    if args.dtype == "bfloat16" or (args.dtype == "auto" and args.model and device.type == "cuda"):
        return torch.bfloat16
    return None


# --------------------------------------------------------------------------------------------------
# A teacher with privileged context and its student (minimal_pedagogical.py): the student's view of a
# teacher's completions, the teacher's copy warm-up target, and the evaluations both need.


def with_prompts(rollout, tok, prompts, device):
    """The same completions after other prompts: a teacher's samples as its student sees them (the
    student's prompt in front, no privileged context). Completion tokens, masks and texts are shared."""
    prompt_ids, prompt_mask = encode(tok, prompts, device)
    return Rollout(prompt_ids, prompt_mask, rollout.completion_ids, rollout.completion_mask,
                   rollout.truncated, rollout.texts, rollout.temperature)


def copy_view(task, ex, rng=None):
    """(teacher prompt, an accepted answer its context lists: the first, or one drawn by rng): the
    warm-up view that teaches a teacher to copy a listed answer."""
    listed = ex.context.split(task.separator)
    return task.teacher_prompt(ex), rng.choice(listed) if rng else listed[0]


def is_other_answer(texts, rewards, examples):
    """(N,) float: 1 where a completion is accepted by the verifier but is not the reference answer
    (on the keyed task: the key)."""
    return torch.tensor([float(r == 1 and t != ex.answer) for t, r, ex in zip(texts, rewards, examples)])


@torch.no_grad()
def evaluate_teacher(model, tok, task, device, max_new_tokens):
    """Greedy decoding of a teacher on its own view of the held-out set: (share accepted by the
    verifier, which for a context of accepted answers is the share that copies one of them; share
    accepted but not the reference answer, i.e. the key)."""
    model.eval()
    prompt_ids, prompt_mask = encode(tok, [task.teacher_prompt(ex) for ex in task.test], device)
    texts = sample(model, tok, prompt_ids, prompt_mask, max_new_tokens, greedy=True).texts
    model.train()
    rewards = [task.reward(t, ex) for t, ex in zip(texts, task.test)]
    return sum(rewards) / len(rewards), is_other_answer(texts, rewards, task.test).mean().item()


@torch.no_grad()
def sampled_exact(model, tok, task, device, max_new_tokens, samples=4, seed=0):
    """Exact-match rate against the reference answer of `samples` completions per held-out prompt at
    temperature 1, drawn from a private random stream so that evaluating never moves the training's."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model.eval()
        prompts = [ex.prompt for ex in task.test for _ in range(samples)]
        prompt_ids, prompt_mask = encode(tok, prompts, device)
        texts = sample(model, tok, prompt_ids, prompt_mask, max_new_tokens, temperature=1.0).texts
        model.train()
    answers = [ex.answer for ex in task.test for _ in range(samples)]
    return sum(t == a for t, a in zip(texts, answers)) / len(answers)


# --------------------------------------------------------------------------------------------------
# Command line: one dataclass of settings per file, every field a flag, its docstring the help text.


def field_docs(cls):
    """The string literal under each field of a dataclass, as {field: doc}."""
    tree = ast.parse(inspect.getsource(cls))
    body, docs = tree.body[0].body, {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def parse_args(cls, argv=None):
    """Build an argparse parser from the dataclass `cls` and return a filled-in instance."""
    module = sys.modules[cls.__module__]
    parser = argparse.ArgumentParser(description=(module.__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.type is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default,
                                help=docs.get(f.name, ""))
        else:
            parser.add_argument(f"--{f.name}", type=f.type, default=f.default, help=docs.get(f.name, ""))
    known, unknown = parser.parse_known_args(argv)
    for flag in unknown:  # a setting the file fixes as a class attribute (VPO's task): say so, in one sentence
        name = flag.removeprefix("--").split("=")[0]
        if flag.startswith("--") and hasattr(cls, name) and name not in {f.name for f in dataclasses.fields(cls)}:
            fail(f"--{name} is not a flag of {os.path.basename(sys.argv[0])}, which fixes it at "
                 f"{getattr(cls, name)!r} (its Args says why)")
    return cls(**vars(parser.parse_args(argv)))


def check_common_args(args, min_group=2):
    """Checks that every file shares. Each sentence names the flag to change. min_group=0: the file has
    no --group_size (a tree counts its leaves from its own flags) and checks its group itself."""
    if args.task not in TASK_NAMES:
        fail(f"--task {args.task!r} is unknown; choose one of {', '.join(TASK_NAMES)}")
    if args.task == "gsm8k":
        import gsm8k

        gsm8k.check_args(args)  # its own budget (256 tokens), its --data, a --model
    elif getattr(args, "data", ""):
        fail(f"--data applies to --task gsm8k; the {args.task} task is generated")
    if args.eval_size < 0:  # every file has --eval_size
        fail(f"--eval_size must not be negative, got {args.eval_size}")
    if args.max_new_tokens == -1:  # the task's own budget: 10 tokens for the toys
        args.max_new_tokens = Task.max_new_tokens
    for name in ("steps", "prompts_per_step", "max_new_tokens"):
        if getattr(args, name) < 1:
            fail(f"--{name} must be a positive whole number, got {getattr(args, name)}")
    if min_group and args.group_size < min_group:
        why = " for a group baseline" if min_group > 1 else ""
        fail(f"--group_size must be at least {min_group}{why}, got {args.group_size}")
    for name in ("lr", "temperature", "max_grad_norm"):
        if not getattr(args, name) > 0:
            fail(f"--{name} must be positive, got {getattr(args, name)}")
    if args.warmup_steps < -1:
        fail(f"--warmup_steps must be -1 (the task's own), 0 (random weights) or more, got {args.warmup_steps}")
    if args.eval_every < 0:
        fail(f"--eval_every must not be negative, got {args.eval_every}")
    if args.binary and args.task in ("add", "keyed", "gsm8k"):
        fail(f"--binary does not apply to --task {args.task}, which is always scored by exact match")
    if args.device not in ("auto", "cpu", "cuda", "mps"):
        fail(f"--device {args.device!r} is unknown; choose auto, cpu, cuda or mps")
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for but no CUDA device is available")
    if args.device == "mps" and not torch.backends.mps.is_available():
        fail("--device mps was asked for but MPS is not available")
    if not 0 <= args.micro_batch <= args.prompts_per_step:
        fail(f"--micro_batch must lie between 0 (the whole batch at once) and --prompts_per_step "
             f"({args.prompts_per_step}) prompts, got {args.micro_batch}")
    if args.dtype not in ("auto", "float32", "bfloat16"):
        fail(f"--dtype {args.dtype!r} is unknown; choose auto, float32 or bfloat16")
    device = pick_device(args.device, bool(args.model))
    if args.dtype == "bfloat16" and not (device.type == "cuda" and torch.cuda.is_bf16_supported()):
        fail(f"--dtype bfloat16 needs a CUDA device that supports it; this run is on {device.type}")
    if args.log_jsonl:
        check_log_path(args.log_jsonl)


def check_log_path(path):
    """--log_jsonl: create missing parent folders (runs/a.jsonl just works), and stop before any work
    with one sentence if the file cannot be written there."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        open(path, "a").close()
    except OSError as e:
        fail(f"--log_jsonl {path!r} cannot be written ({e.strerror or type(e).__name__})")


def pick_device(name, pretrained=False):
    """--device auto: the built-in tiny model on the CPU, a pretrained --model on CUDA, then MPS, then the
    CPU. The tiny model is 0.1M parameters on a few hundred rows of ten tokens: each operation is too small
    to fill a GPU, so a step costs its kernel launches and synchronisations, which the CPU does not pay."""
    if name != "auto":
        return torch.device(name)
    if pretrained and torch.cuda.is_available():
        return torch.device("cuda")
    if pretrained and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def setup(args, task=None):
    """Seed everything, build the task (unless one is given) and the policy (run `check_args` first).
    Returns (task, model, tokenizer, device, logger, rng), where rng draws the training prompts."""
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = pick_device(args.device, bool(args.model))
    data = getattr(args, "data", "")  # VPO and Pedagogical RL have no --data
    task = first_held_out(task, args.eval_size) if task else make_task(args.task, args.binary, data, args.eval_size)
    model, tok = load_policy(args, task, device)
    logger = Logger(args.log_jsonl)
    return task, model, tok, device, logger, random.Random(args.seed)


# --------------------------------------------------------------------------------------------------
# Logging: one `key=value` line per step, the same leading keys in every file.


def fmt(v):
    if isinstance(v, bool) or isinstance(v, int):
        return str(int(v))
    v = float(v)
    return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"


class Logger:
    """Prints `key=value` lines and, with --log_jsonl, writes the same records as JSON lines, each with
    `time_s`, the seconds since the run began (on the printed lines only the final one has it, so that
    the same seed prints the same lines). A task's own columns (`Task.extra_metrics`: GSM8K's `format`)
    reach it as keyword arguments like any other metric."""

    def __init__(self, jsonl_path=""):
        self.start = time.time()
        self.file = open(jsonl_path, "w") if jsonl_path else None

    def _emit(self, kind, record, prefix=""):
        record = {k: (float(v) if torch.is_tensor(v) else v) for k, v in record.items()}
        print(prefix + " ".join(f"{k}={fmt(v)}" for k, v in record.items()), flush=True)
        if self.file:
            self.file.write(json.dumps({"kind": kind, **record, "time_s": time.time() - self.start}) + "\n")
            self.file.flush()

    def step(self, step, **metrics):
        self._emit("step", {"step": step, **metrics})

    def eval(self, step, test_acc, exact, **extra):
        self._emit("eval", {"step": step, "test_acc": test_acc, "exact": exact, **extra}, prefix="eval ")

    def info(self, kind, **record):
        """A one-off line that is neither a step nor an evaluation, e.g. `teacher test_acc=0.99`."""
        self._emit(kind, record, prefix=f"{kind} ")

    def final(self, test_acc, exact, base_acc, **extra):
        self._emit("final", {"test_acc": test_acc, "exact": exact, "base_acc": base_acc, **extra,
                             "time_s": time.time() - self.start}, prefix="final ")
        if self.file:
            self.file.close()

