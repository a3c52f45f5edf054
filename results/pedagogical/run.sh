#!/usr/bin/env bash
# Pedagogical RL's claims (results/pedagogical/README.md), seeds 0-2, one run at a time, one thread each;
# logs into results/pedagogical/NAME_seedS.jsonl (step lines carry the teacher's key_rate).
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
out=results/pedagogical
for s in 0 1 2; do
  uv run minimal_pedagogical.py --seed $s --eval_every 10 --log_jsonl $out/pedagogical_seed$s.jsonl > /dev/null   # C1, lambda = 0.5
  uv run minimal_pedagogical.py --seed $s --eval_every 10 --lam 0 --log_jsonl $out/lam0_seed$s.jsonl > /dev/null   # C1, lambda = 0
  uv run minimal_grpo.py --binary --seed $s --eval_every 5 --log_jsonl $out/grpo_binary_seed$s.jsonl > /dev/null   # C2, blind search
  uv run minimal_pedagogical.py --seed $s --eval_every 10 --spike_beta 0.01 --log_jsonl $out/spike_mean_seed$s.jsonl > /dev/null
  uv run minimal_pedagogical.py --seed $s --eval_every 10 --teacher_mix_steps 0 --log_jsonl $out/no_mix_seed$s.jsonl > /dev/null
  echo "seed $s done"
done
