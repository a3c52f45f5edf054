#!/usr/bin/env bash
# VPO's claims C1, C2 and the mechanism, 3 seeds each, one run at a time, one thread per run (compare.py
# pins OMP_NUM_THREADS=1). Writes results/vpo/<variant>/vpo_seedS.jsonl; results/vpo/summary.py reads them.
set -euo pipefail
cd "$(dirname "$0")/../.."
run() { uv run compare.py --methods vpo --own_defaults --seeds 3 --jobs 1 --out "results/vpo/$1" --extra "$2"; }
run vpo ""                                  # VPO (m = 3), the file's defaults
run sum "--set_score sum"                   # Multi-RLVR: the distinct answers' w_gold scores added (m = 3)
run grpo "--m 1 --set_score max"            # GRPO on w_gold . r (m = 1)
run random_w "--m 1 --n_weights 1"          # random-weight GRPO: one w ~ Dirichlet(1) per prompt (m = 1)
