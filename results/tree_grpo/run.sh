#!/usr/bin/env bash
# Tree GRPO's claims (results/tree_grpo/README.md), seeds 0-2. C1 prints its numbers (sampler_probe.py writes
# no files); the C2 comparisons go to results/tree_grpo/<variant>/ (logs, compare.md, compare.png).
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
uv run results/tree_grpo/sampler_probe.py --seeds 3                                   # C1
compare_into() { out=$1; shift; uv run compare.py --seeds 3 --x gen_tokens --out "results/tree_grpo/$out" "$@"; }
compare_into tree_vs_g8 --methods grpo,tree_grpo --extra "--eval_every 10"                     # C2, per-character reward
compare_into tree_vs_g8_binary --methods grpo,tree_grpo --extra "--eval_every 10 --binary"     # C2, exact match
compare_into g12 --methods grpo --group_size 12 --extra "--eval_every 10"
compare_into g12_binary --methods grpo --group_size 12 --extra "--eval_every 10 --binary"
