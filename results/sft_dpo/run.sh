#!/usr/bin/env bash
# The claims of minimal_sft.py and minimal_dpo.py: every run one at a time, one CPU thread, seeds 0-2,
# logs into results/sft_dpo/. Summarised by results/sft_dpo/summary.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
out=results/sft_dpo
mkdir -p $out
for s in 0 1 2; do
  # DPO C1 and C2: online against offline, 200 steps, with the per-token split of each pair's change
  uv run results/sft_dpo/dpo_tokens.py $out/dpo_online_tokens_seed$s.jsonl --seed $s --steps 200 --log_jsonl $out/dpo_online_seed$s.jsonl > /dev/null
  uv run results/sft_dpo/dpo_tokens.py $out/dpo_offline_tokens_seed$s.jsonl --seed $s --steps 200 --offline --log_jsonl $out/dpo_offline_seed$s.jsonl > /dev/null
  # SFT C1: SFT on demonstrations for 400 steps (= GRPO's 100 steps x 4 epochs of gradient steps) against GRPO's default
  uv run minimal_sft.py --seed $s --steps 400 --log_jsonl $out/sft_demo_seed$s.jsonl > /dev/null
  uv run minimal_grpo.py --seed $s --log_jsonl $out/grpo_seed$s.jsonl > /dev/null
  # SFT C1, second part: rejection-sampling fine-tuning against PG on the same binary reward, 200 steps each
  uv run minimal_sft.py --seed $s --source best --binary --log_jsonl $out/sft_best_seed$s.jsonl > /dev/null
  uv run minimal_pg.py --seed $s --binary --log_jsonl $out/pg_binary_seed$s.jsonl > /dev/null
  echo "seed $s done"
done
