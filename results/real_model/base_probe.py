"""Why the CPU study trains on one-step problems: the base model's greedy held-out numbers on two data
sets in GSM8K's schema, through the same path the files take (GSM8KTask, its chat-template prompt, the
one answer check, tt.evaluate), at the study's 64-token budget.

    uv run results/real_model/base_probe.py              # 200 problems of each, about 6 minutes on 2 cores

two_step: gsm8k.make_gsm8k_like (the tests' fixture: give away, then find more);
one_step: gsm8k.make_one_step (the study's data: one addition or one subtraction).
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import gsm8k  # noqa: E402
import toy_tasks as tt  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--problems", type=int, default=200)
    p.add_argument("--max_new_tokens", type=int, default=64)
    args = p.parse_args()
    model, tok = tt.load_pretrained(str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    print("| data | problems | test_acc | exact | format | mean tokens | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, make in (("two_step", gsm8k.make_gsm8k_like), ("one_step", gsm8k.make_one_step)):
        with tempfile.TemporaryDirectory() as folder:
            gsm8k.write_splits(folder, make(args.problems + 400, seed=0), args.problems)
            task = tt.make_task("gsm8k", data=folder, eval_size=args.problems)
            task.attach(tok)
            start = time.time()
            acc, exact, extra = tt.evaluate(model, tok, task, "cpu", args.max_new_tokens, rows=32)
            ids, mask = tt.encode(tok, [ex.prompt for ex in task.test[:32]], "cpu")
            length = float(tt.sample(model, tok, ids, mask, args.max_new_tokens, greedy=True).lengths.mean())
            print(f"| {name} | {args.problems} | {acc:.3f} | {exact:.3f} | {extra['format']:.3f} | "
                  f"{length:.1f} (first 32) | {time.time() - start:.0f} |")


if __name__ == "__main__":
    main()
