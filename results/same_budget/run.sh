#!/usr/bin/env bash
# Every method at one budget (100 steps of 32 x 8, 4 inner epochs where a method has them), seeds 0-2, 2 runs
# at a time with one thread each: the logs, compare.md and compare.png of results/same_budget/.
set -euo pipefail
cd "$(dirname "$0")/../.."
uv run compare.py --methods pg,grpo,drgrpo,dapo,tpo,dg --seeds 3 --out results/same_budget
