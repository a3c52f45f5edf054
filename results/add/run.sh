#!/usr/bin/env bash
# The six RL files on the sparse task, each with its own defaults, seeds 0-2, 2 runs at a time with one
# thread each: the logs of results/add/ (compare.py also writes compare.md and compare.png there).
set -euo pipefail
cd "$(dirname "$0")/../.."
uv run compare.py --methods pg,grpo,drgrpo,dapo,tpo,dg --own_defaults --seeds 3 --extra "--task add" --out results/add
