#!/usr/bin/env bash
# On-policy distillation's claims C1 and C2 (results/opd/README.md), seeds 0-2, one thread per run. The
# compare.py runs go to results/opd/<variant>/ (logs, compare.md, compare.png); the gradient-variance
# probes print their numbers.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
compare_into() { out=$1; shift; uv run compare.py --own_defaults --seeds 3 --out "results/opd/$out" "$@"; }
# C1: steps to 0.90 and 0.95, evaluation every 5 steps, 100 steps
compare_into sampled --methods opd --reach 0.9,0.95 --extra "--steps 100 --eval_every 5"
compare_into full --methods opd --reach 0.9,0.95 --extra "--steps 100 --eval_every 5 --estimator full"
compare_into grpo_pg --methods grpo,pg --reach 0.9,0.95 --extra "--steps 100 --eval_every 5"
compare_into grpo_binary --methods grpo --reach 0.9,0.95 --extra "--steps 100 --eval_every 5 --binary"
# C2: both estimators' gradients on the same 20 batches at the base, and from random weights (seed 0)
for s in 0 1 2; do uv run minimal_opd.py --grad_var_batches 20 --seed $s; done
uv run minimal_opd.py --grad_var_batches 20 --seed 0 --warmup_steps 0
# C2 from a cold student: random weights, the file's default 150 steps
compare_into cold_sampled --methods opd --extra "--warmup_steps 0 --eval_every 20"
compare_into cold_full --methods opd --extra "--warmup_steps 0 --eval_every 20 --estimator full"
