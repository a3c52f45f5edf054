"""GSM8K: a real task for a real model (`--task gsm8k` with a pretrained `--model`).

Grade-school word problems (Cobbe et al. 2021, arXiv 2110.14168) whose reference solution ends in
"#### N"; a completion is right when its final number is N. `toy_tasks.make_task("gsm8k")` imports
this module only when asked for, so the toy runs never import `datasets`.

    read_gsm8k(data)        the train and test records: the hub's openai/gsm8k, or a local folder or file
    GSM8KTask               the task: chat-template prompts, the 0/1 reward, test_acc, exact and format
    final_answer(text)      the one answer check, for the reward and the evaluation alike
    make_gsm8k_like(n)      generated records in GSM8K's schema: the tests' and the GPU benchmark's data
    make_one_step(n)        one-step word problems in the same schema: the CPU study's data
    check_args(args)        --task gsm8k's own flag checks, before any model or data loads
"""
import os
import random
import re

from toy_tasks import Example, Task, fail

GSM8K_INSTRUCTION = 'Solve the problem step by step, then write the final answer as a number after "####".'
NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")  # 42, -7, 1,234, $18.00, 3.5: no trailing period


def parse_number(text):
    """A number as written ("1,234", "$18.00", "-7") -> float; commas and "$" dropped."""
    return float(text.replace(",", "").replace("$", ""))


def final_answer(text):
    """One lenient answer check, for the reward and the evaluation alike: (the completion's final number
    or None, whether it came after "####"). The number right after the last "####" if there is one (a
    number in reasoning written after it does not count), else the last number in the text."""
    if "####" in text:
        found = NUMBER.search(text.rsplit("####", 1)[1])
        if found:
            return parse_number(found.group()), True
    numbers = NUMBER.findall(text)
    return (parse_number(numbers[-1]), False) if numbers else (None, False)


def same_number(a, b):
    return a is not None and b is not None and abs(a - b) <= 1e-6 * max(1.0, abs(b))


def read_gsm8k(data):
    """The train and test records ({question, answer} dicts) of GSM8K: `openai/gsm8k`, config main, from
    the hub (a download, only because --task gsm8k asked for it) when data is empty; else a local folder
    holding train and test files (.jsonl, .json or .parquet, named train* and test*, as the hub's main/
    folder is), or one such file, whose first records the caller holds out."""
    import datasets  # imported here: slow, and only this task needs it

    datasets.disable_progress_bars()
    if not data:
        found = datasets.load_dataset("openai/gsm8k", "main")
        return list(found["train"]), list(found["test"])
    kind = lambda path: {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(os.path.splitext(path)[1])
    if os.path.isfile(data):
        return None, list(datasets.load_dataset(kind(data), data_files=data, split="train"))
    splits = {}
    for split in ("train", "test"):
        for folder in (data, os.path.join(data, "main")):
            files = sorted(f for f in os.listdir(folder) if f.startswith(split) and kind(f)) if os.path.isdir(folder) else []
            if files:
                paths = [os.path.join(folder, f) for f in files]
                splits[split] = list(datasets.load_dataset(kind(files[0]), data_files=paths, split="train"))
                break
    if len(splits) < 2:
        fail(f"--data {data!r} holds no train and test files (train*.jsonl / test*.jsonl, .json or .parquet)")
    return splits["train"], splits["test"]


class GSM8KTask(Task):
    """GSM8K (Cobbe et al. 2021, arXiv 2110.14168): the prompt asks for step-by-step reasoning and the
    final answer after "####", in the tokenizer's chat template when it has one (one user turn), plain
    text otherwise. The reward is 1 when `final_answer` equals the reference's "#### N", else 0; held-out
    test_acc is the same check on greedy completions (exact-answer accuracy, not string match), `exact`
    the strict share that wrote the right number after "####", and `format` the share that used "####"
    at all. `answer` is the reference solution, calculator annotations removed (what SFT imitates);
    `context` the same solution, a privileged teacher's hint. The held-out set is the first --eval_size
    test problems (200: about +-7 points of noise at an accuracy near 0.4)."""
    name = "gsm8k"
    warmup_steps = 0  # a pretrained model is never warmed up
    max_new_tokens = 256  # shorter budgets cut answers off (nanoRL: 0.125 at 128 against 0.34 at 256)
    default_eval_size = 200

    def __init__(self, data="", eval_size=0):
        self.binary, self.tok = True, None
        train, test = read_gsm8k(data)
        records = test if train is None else train + test
        if records and not {"question", "answer"} <= set(records[0]):
            fail(f"--data {data!r} lacks the fields question and answer (it has {', '.join(records[0])})")
        self.eval_size = eval_size or min(self.default_eval_size, len(test) // 2 if train is None else len(test))
        if self.eval_size > len(test) - (train is None):
            fail(f"--eval_size {eval_size} is larger than the test split ({len(test)} problems"
                 + (", one file: some must stay for training)" if train is None else ")"))
        self.train = train if train is not None else test[self.eval_size:]
        self.test_records = test[:self.eval_size]
        self.test = []  # filled by `attach`, once the tokenizer that writes the prompts is known

    def attach(self, tok, max_new_tokens=None):
        """Write every prompt with the policy's tokenizer (its chat template, if it has one); the budget
        was checked with the flags (`check_args`)."""
        self.tok = tok
        self.test = [self.example(r) for r in self.test_records]
        self.test_prompts = {ex.prompt for ex in self.test}

    def prompt(self, question):
        text = f"{question}\n{GSM8K_INSTRUCTION}"
        if not getattr(self.tok, "chat_template", None):
            return text + "\n"
        prompt = self.tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                              add_generation_prompt=True)
        # `encode` tokenizes with the tokenizer's special tokens; a template that writes the BOS itself
        # would otherwise get a second one
        bos = self.tok.bos_token
        if bos and prompt.startswith(bos) and self.tok("x").input_ids[:1] == [self.tok.bos_token_id]:
            prompt = prompt[len(bos):]
        return prompt

    def example(self, record):
        solution = re.sub(r"<<[^>]*>>", "", record["answer"])  # "48/2 = <<48/2=24>>24" -> "48/2 = 24"
        return Example(prompt=self.prompt(record["question"]), answer=solution, context=solution)

    def sample(self, rng, n):
        if self.tok is None:
            raise RuntimeError("GSM8KTask.attach(tokenizer) must run before sampling prompts")
        return [self.example(self.train[rng.randrange(len(self.train))]) for _ in range(n)]

    def reward(self, text, ex):
        return float(same_number(final_answer(text)[0], final_answer(ex.answer)[0]))

    def test_metrics(self, texts, examples):
        right = [self.reward(t, ex) for t, ex in zip(texts, examples)]
        strict = [r * final_answer(t)[1] for r, t in zip(right, texts)]
        return sum(right) / len(right), sum(strict) / len(strict)

    def extra_metrics(self, texts):
        return {"format": sum(final_answer(t)[1] for t in texts) / max(len(texts), 1)}


def make_gsm8k_like(n, seed=0):
    """n generated records with GSM8K's schema and shape (a word problem; a solution with <<a=b>>
    calculator annotations and a final "#### N" line): the local stand-in the tests and the GPU benchmark
    load through --data, so that they run the loading code a user runs, with no download. The answers
    are small numbers, so that even a random model's last number is sometimes right."""
    rng, names, things = random.Random(seed), ["Ann", "Bo", "Cy", "Dee", "Eli"], ["apples", "books", "coins"]
    out = []
    for _ in range(n):
        who, what = rng.choice(names), rng.choice(things)
        a, c = rng.randint(2, 9), rng.randint(0, 3)
        b = rng.randint(1, a - 1)
        question = (f"{who} has {a} {what}. {who} gives {b} of them to a friend, then finds {c} more. "
                    f"How many {what} does {who} have now?")
        answer = (f"{who} gives away {b}, so {a} - {b} = <<{a}-{b}={a - b}>>{a - b} {what} are left.\n"
                  f"Then {a - b} + {c} = <<{a - b}+{c}={a - b + c}>>{a - b + c}.\n#### {a - b + c}")
        out.append({"question": question, "answer": answer})
    return out


def make_one_step(n, seed=0):
    """n one-step word problems (one addition or one subtraction, answers 1 to 29) in GSM8K's schema:
    the data of the CPU study on SmolLM2-135M-Instruct (results/real_model/), sized so that a 135M model
    starts clearly above 0 and far below its ceiling. GSM8K's own problems and `make_gsm8k_like`'s two
    steps leave it near 5 % (results/real_model/README.md)."""
    rng = random.Random(seed)
    names = ["Ann", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Hal"]
    things = ["apples", "books", "coins", "cards", "pens", "shells"]
    out = []
    for _ in range(n):
        who, what = rng.choice(names), rng.choice(things)
        a, b = rng.randint(2, 20), rng.randint(1, 9)
        if rng.random() < 0.5:
            question = f"{who} has {a} {what} and finds {b} more. How many {what} does {who} have now?"
            answer = f"{who} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} {what}.\n#### {a + b}"
        else:
            question = f"{who} has {a + b} {what} and gives {b} of them to a friend. How many {what} does {who} have now?"
            answer = f"{who} has {a + b} - {b} = <<{a + b}-{b}={a}>>{a} {what} left.\n#### {a}"
        out.append({"question": question, "answer": answer})
    return out


def write_splits(folder, records, test_size):
    """Write records as folder/test.jsonl (the first test_size) and folder/train.jsonl (the rest, less
    any question the test split holds): a --data folder for --task gsm8k."""
    import json

    test = records[:test_size]
    held_out = {r["question"] for r in test}
    train = [r for r in records[test_size:] if r["question"] not in held_out]
    os.makedirs(folder, exist_ok=True)
    for name, part in (("train", train), ("test", test)):
        with open(os.path.join(folder, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    return len(train), len(test)


def check_args(args):
    """--task gsm8k's own checks, before any model or data loads."""
    if not args.model:
        fail("--task gsm8k needs a pretrained --model: the tiny default's tokenizer knows only the toy characters")
    if args.max_new_tokens == -1:
        args.max_new_tokens = GSM8KTask.max_new_tokens
    if args.max_new_tokens < 64:
        fail(f"--max_new_tokens {args.max_new_tokens} is too small for --task gsm8k: reasoning is cut off "
             "below 64 tokens (256 is the task's own budget)")
    if args.data and not os.path.exists(os.path.expanduser(args.data)):
        fail(f"--data {args.data!r} does not exist")
    args.data = os.path.expanduser(args.data)
