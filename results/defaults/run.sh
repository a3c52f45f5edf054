#!/usr/bin/env bash
# Every file's default run, one at a time on an otherwise idle machine, torch's default thread count (2 on
# the 2-core machine), timed; the logs go to results/defaults/: F.out (the printed lines, then the wall
# time) and F.jsonl. Usage: results/defaults/run.sh [FILE ...]   (default: all thirteen)
set -euo pipefail
cd "$(dirname "$0")/../.."
files=${*:-"pg grpo drgrpo dapo tpo dg opd pedagogical vpo tree_grpo ppo sft dpo"}
for f in $files; do
  start=$EPOCHREALTIME
  uv run minimal_$f.py --log_jsonl results/defaults/$f.jsonl > results/defaults/$f.out 2>&1
  awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "real %.1f s\n", b - a }' >> results/defaults/$f.out
  echo "$f: $(tail -2 results/defaults/$f.out | tr '\n' ' ')"
done
