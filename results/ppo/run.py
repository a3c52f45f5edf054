"""The runs behind claims C1 and C2 of minimal_ppo.py: each configuration x seed in its own process, one at a
time, with OMP_NUM_THREADS=1. The tables come from results/ppo/summary.py.

    uv run python results/ppo/run.py [NAME ...]     # every run not already done, into results/ppo/

Each run is `minimal_ppo.py` or `minimal_grpo.py` called in-process (main() of the imported module, so the
hooks below see it) with --eval_every 5 --log_jsonl. It writes NAME_seedS.jsonl (the records),
NAME_seedS.out (the printed lines) and NAME_seedS_extra.json: the process CPU time and resident memory at
the first update of every step (a wrapper around the file's own `update`), the whole run's wall and CPU
time and peak memory, and for PPO the explained variance of every step's critic by token position (from
the first completion token, and from the last), wrapping minimal_ppo.explained_variance.
For results/ppo/README.md, ppo_32x8 ran for seeds 0 and 1 only (`run.py ppo grpo ppo_scratch ppo_nocritic`,
then ppo_32x8 with seed 2 skipped); the summary reads whatever runs exist.
"""
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "results" / "ppo"
SEEDS = [0, 1, 2]
CONFIGS = {  # name -> (file, flags)
    "ppo": ("minimal_ppo.py", []),
    "grpo": ("minimal_grpo.py", []),
    "ppo_scratch": ("minimal_ppo.py", ["--critic_init", "scratch"]),
    "ppo_32x8": ("minimal_ppo.py", ["--prompts_per_step", "32", "--group_size", "8"]),
    "ppo_nocritic": ("minimal_ppo.py", ["--vf_coef", "0"]),  # the head stays at zero: V = 0, no critic
}
COMMON = ["--eval_every", "5"]


def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def child(name, seed):
    sys.path.insert(0, str(ROOT))
    file, flags = CONFIGS[name]
    module = __import__(Path(file).stem)
    extra = {"cpu": [], "rss": [], "ev_first": [], "ev_last": []}
    update, seen = module.update, set()

    def update_hook(*a, **k):  # the step is update's second-to-last argument in both files
        if a[-2] not in seen:  # the first inner epoch of a step: one stamp per step
            seen.add(a[-2])
            extra["cpu"].append(time.process_time())
            extra["rss"].append(rss_mb())
        return update(*a, **k)

    module.update = update_hook
    if hasattr(module, "explained_variance"):
        ev = module.explained_variance

        def ev_hook(values, returns, mask):
            lengths = mask.sum(1).long()
            first, last = [], []
            for t in range(mask.size(1)):
                rows = lengths > t
                if rows.sum() >= 8:
                    first.append(float(ev(values[rows, t:t + 1], returns[rows, t:t + 1], mask[rows, t:t + 1])))
                    idx = lengths[rows] - 1 - t  # t tokens before each completion's last token
                    pick = lambda x: x[rows].gather(1, idx[:, None])
                    last.append(float(ev(pick(values), pick(returns), pick(mask))))
            extra["ev_first"].append(first)
            extra["ev_last"].append(last)
            return ev(values, returns, mask)

        module.explained_variance = ev_hook
    log = OUT / f"{name}_seed{seed}.jsonl"
    sys.argv = [file, "--seed", str(seed), *COMMON, *flags, "--log_jsonl", str(log)]
    start, cpu0 = time.time(), time.process_time()
    module.main()
    extra.update(wall=time.time() - start, cpu_total=time.process_time() - cpu0,
                 peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                 argv=sys.argv)
    (OUT / f"{name}_seed{seed}_extra.json").write_text(json.dumps(extra))


def run_all(names):
    OUT.mkdir(parents=True, exist_ok=True)
    for name in names:
        for seed in SEEDS:
            if (OUT / f"{name}_seed{seed}_extra.json").exists():
                continue
            print(f"{name} seed {seed} ...", flush=True)
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            p = subprocess.run([sys.executable, __file__, "child", name, str(seed)], cwd=ROOT, env=env,
                               capture_output=True, text=True)
            (OUT / f"{name}_seed{seed}.out").write_text(p.stdout + p.stderr)
            print(p.stdout.strip().splitlines()[-1] if p.returncode == 0 else p.stderr[-2000:], flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        child(sys.argv[2], int(sys.argv[3]))
    elif {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)
    else:
        run_all(sys.argv[1:] or list(CONFIGS))
