"""Median CPU seconds per step of the default PPO and GRPO, interleaved so that both see the same load: 16 steps
of each default, PPO and GRPO alternating three times, one thread each.

    uv run python results/ppo/cpu_pair.py

CPU time, not wall time: each run stamps the process CPU time at the first update of every step (a wrapper
around the file's own `update`, whose second-to-last argument is the step)."""
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the minimal_*.py files
CODE = """
import sys, time, statistics
sys.path.insert(0, '.')
mod = __import__(sys.argv[1])
ts, update = {}, mod.update
mod.update = lambda *a, **k: (ts.setdefault(a[-2], time.process_time()), update(*a, **k))[1]
sys.argv = [sys.argv[1], '--steps', '16', '--eval_every', '0']
import io, contextlib
with contextlib.redirect_stdout(io.StringIO()):
    mod.main()
stamps = list(ts.values())
print(statistics.median(b - a for a, b in zip(stamps, stamps[1:])))
"""
if {"-h", "--help"} & set(sys.argv[1:]):
    print(__doc__)
    sys.exit()
res = {"minimal_ppo": [], "minimal_grpo": []}
for r in range(3):
    for m in res:
        p = subprocess.run([sys.executable, "-c", CODE, m], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        res[m].append(float(p.stdout.strip().splitlines()[-1]))
        print(m, res[m][-1], flush=True)
print({m: round(statistics.mean(v), 3) for m, v in res.items()}, "ratio", [round(a / b, 2) for a, b in zip(res["minimal_ppo"], res["minimal_grpo"])])
