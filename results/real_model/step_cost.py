"""Seconds per GRPO step on SmolLM2-135M-Instruct, split into sampling and scoring + update, and the
peak memory, with and without --micro_batch: each setting in a fresh process (peak RSS is per process).

    uv run results/real_model/step_cost.py                 # the study's command, 3 steps, micro_batch 0 and 1
    uv run results/real_model/step_cost.py --steps 2 --micro_batch 0 2

Sampling is the time inside `tt.sample` (the KV-cached decoding of the step's completions); the rest of
a step is scoring (pi_old, the reference) and the update's forward and backward passes. Held-out
evaluation is not timed (--eval_every 0 and a 2-problem held-out set).
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STUDY = ["--model", os.path.join(ROOT, "models", "SmolLM2-135M-Instruct"), "--task", "gsm8k",
         "--data", os.path.join(ROOT, "results", "real_model", "data"), "--max_new_tokens", "64",
         "--prompts_per_step", "4", "--group_size", "8", "--epochs", "1", "--lr", "2e-5", "--temperature", "0.7"]


def child(steps, micro_batch):
    """One run in this process: time every call of tt.sample, report the split and the peak RSS."""
    sys.path.insert(0, ROOT)
    import minimal_grpo
    import toy_tasks as tt

    calls, sample, cpu_at = [], tt.sample, []

    def timed(*a, **k):  # call 0 decodes the held-out set (step 0), call k the completions of step k
        start, cpu = time.perf_counter(), time.process_time()
        cpu_at.append(cpu)  # CPU seconds of every thread at the start of each call
        try:
            return sample(*a, **k)
        finally:
            calls.append((time.perf_counter() - start, time.process_time() - cpu))

    tt.sample = timed
    log = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"step_cost_{os.getpid()}.jsonl")
    sys.argv = ["minimal_grpo.py", *STUDY, "--steps", str(steps + 1), "--eval_every", "0", "--eval_size", "2",
                "--micro_batch", str(micro_batch), "--log_jsonl", log]
    minimal_grpo.main()
    ends = [r["time_s"] for r in map(json.loads, open(log)) if r["kind"] == "step"]  # Logger's time_s
    os.remove(log)
    # the first step pays for warming caches up: report the steps after it
    n = len(ends) - 1
    step_s, sample_s = (ends[-1] - ends[0]) / n, sum(c[0] for c in calls[2:2 + n]) / n
    step_cpu = (cpu_at[2 + n - 1] - cpu_at[2]) / (n - 1) if n > 1 else float("nan")  # sample call to sample call
    sample_cpu = sum(c[1] for c in calls[2:2 + n]) / n
    # VmHWM: this process's own peak (ru_maxrss would carry over a parent's across exec), kB
    peak_gb = int(next(x.split()[1] for x in open("/proc/self/status") if x.startswith("VmHWM"))) / 2**20
    print("RESULT " + json.dumps({"micro_batch": micro_batch, "steps": n, "step_s": step_s,
                                  "sample_s": sample_s, "score_update_s": step_s - sample_s,
                                  "step_cpu_s": step_cpu, "sample_cpu_s": sample_cpu,
                                  "peak_rss_gb": peak_gb, "threads": __import__("torch").get_num_threads()}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3, help="steps timed after the first")
    p.add_argument("--micro_batch", type=int, nargs="+", default=[0, 1])
    p.add_argument("--child", type=int, default=-1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child >= 0:
        return child(args.steps, args.child)
    rows = []
    for mb in args.micro_batch:
        done = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--child", str(mb)],
                              capture_output=True, text=True, cwd=ROOT)
        line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode or not line:
            sys.exit(f"error: --micro_batch {mb} failed: {done.stderr[-1500:]}")
        rows.append(json.loads(line[0][7:]))
    print("| --micro_batch | wall s / step | sampling | scoring + update | CPU s / step | sampling | scoring + update "
          "| peak RSS GB | threads |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['micro_batch']} | {r['step_s']:.1f} | {r['sample_s']:.1f} | {r['score_update_s']:.1f} | "
              f"{r['step_cpu_s']:.1f} | {r['sample_cpu_s']:.1f} | {r['step_cpu_s'] - r['sample_cpu_s']:.1f} | "
              f"{r['peak_rss_gb']:.2f} | {r['threads']} |")


if __name__ == "__main__":
    main()
