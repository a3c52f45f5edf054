#!/usr/bin/env bash
# The published token-reversal table (compare.py's tokrev preset: TPO, DG, GRPO x seeds 0-2, 2 runs at a
# time with one thread each): the logs, compare.md and compare.png of results/tokrev/.
set -euo pipefail
cd "$(dirname "$0")/../.."
uv run compare.py --preset tokrev --out results/tokrev
