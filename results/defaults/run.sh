#!/usr/bin/env bash
# Every file's default run, one at a time on an otherwise idle machine, torch's default thread count (2 on
# the 2-core machine), timed; the logs go to $OUT (default results/defaults/): F.out (the printed lines,
# then the wall time) and F.jsonl.
# Usage: results/defaults/run.sh [FILE ...]   (default: all thirteen)
#        OUT=results/defaults/intel_xeon results/defaults/run.sh     (another machine's logs)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-results/defaults}
mkdir -p "$out"
files=${*:-"pg grpo drgrpo dapo tpo dg opd pedagogical vpo tree_grpo ppo sft dpo"}
for f in $files; do
  start=$EPOCHREALTIME
  uv run minimal_$f.py --log_jsonl "$out/$f.jsonl" > "$out/$f.out" 2>&1
  awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "real %.1f s\n", b - a }' >> "$out/$f.out"
  echo "$f: $(tail -2 "$out/$f.out" | tr '\n' ' ')"
done
