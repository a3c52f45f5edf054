"""Median CPU seconds per step of the default PPO and GRPO, interleaved so that both see the same load."""
import statistics, subprocess, sys, time, os
CODE = """
import sys, time, statistics
sys.path.insert(0, '.')
import toy_tasks as tt
mod = __import__(sys.argv[1])
ts = []
step = tt.Logger.step
tt.Logger.step = lambda self, *a, **k: (ts.append(time.process_time()), step(self, *a, **k))[1]
sys.argv = [sys.argv[1], '--steps', '16', '--eval_every', '0']
import io, contextlib
with contextlib.redirect_stdout(io.StringIO()):
    mod.main()
print(statistics.median(b - a for a, b in zip(ts, ts[1:])))
"""
res = {"minimal_ppo": [], "minimal_grpo": []}
for r in range(3):
    for m in res:
        p = subprocess.run([sys.executable, "-c", CODE, m], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        res[m].append(float(p.stdout.strip().splitlines()[-1]))
        print(m, res[m][-1], flush=True)
print({m: round(statistics.mean(v), 3) for m, v in res.items()}, "ratio", [round(a / b, 2) for a, b in zip(res["minimal_ppo"], res["minimal_grpo"])])
