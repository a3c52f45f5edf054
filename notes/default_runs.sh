#!/usr/bin/env bash
# The default run of each of the other three newer files, one at a time, one thread, timed; the logs go to
# results/defaults/. (VPO's default run is notes/vpo_claims.sh's results/vpo/vpo/vpo_seed0.jsonl.)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p results/defaults
for f in tree_grpo pedagogical opd; do
  start=$(date +%s)
  OMP_NUM_THREADS=1 uv run minimal_$f.py --log_jsonl results/defaults/$f.jsonl > results/defaults/$f.out 2>&1
  echo "real $(( $(date +%s) - start )) s" >> results/defaults/$f.out
  tail -2 results/defaults/$f.out
done
