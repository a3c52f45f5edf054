"""Which tokens DPO moves (claim C1 of minimal_dpo.py): run minimal_dpo.py unchanged, and at every step,
before its update, split each pair's log-ratio change log pi - log pi_ref by token position: the tokens
before the first position where chosen and rejected differ (the shared prefix), that first differing
token, and the tokens after it. Writes one JSON line per step; the run prints exactly the lines of
`uv run minimal_dpo.py ARGS` (scoring draws no random numbers).

    OMP_NUM_THREADS=1 uv run results/sft_dpo/dpo_tokens.py OUT.jsonl [minimal_dpo.py flags]

Each record: step, and for who in (chosen, rejected) and part in (prefix, first, after): the summed change
of that part per pair (nats; the three add up to chosen_logp / rejected_logp), and its mean per token.
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import minimal_dpo as dpo  # noqa: E402
import toy_tasks as tt  # noqa: E402

out = open(sys.argv[1], "w")
original = dpo.update


def token_split(pairs, logp, ref_logp):
    mask = pairs.completion_mask.view(-1, 2, pairs.completion_mask.size(1))  # (K, 2, T)
    ids = pairs.completion_ids.view(mask.shape)
    change = ((logp - ref_logp) * pairs.completion_mask).view(mask.shape)
    differ = (ids[:, 0] != ids[:, 1]) | (mask[:, 0] != mask[:, 1])  # (K, T)
    first = differ.float().argmax(1, keepdim=True)  # (K, 1) the first differing position
    pos = torch.arange(mask.size(2))[None, :]
    parts = {"prefix": pos < first, "first": pos == first, "after": pos > first}
    rec = {}
    for w, who in enumerate(("chosen", "rejected")):
        for name, where in parts.items():
            m = mask[:, w] * where
            rec[f"{who}_{name}"] = float((change[:, w] * m).sum() / mask.size(0))
            rec[f"{who}_{name}_per_token"] = float((change[:, w] * m).sum() / m.sum().clamp(min=1))
    return rec


def update(model, optimizer, pairs, old_logp, ref_logp, step, args):
    if pairs.completion_ids.size(0):
        logp = tt.score(model, pairs, args.micro_batch * 2)[0]
        out.write(json.dumps({"step": step, **token_split(pairs, logp, ref_logp)}) + "\n")
        out.flush()
    return original(model, optimizer, pairs, old_logp, ref_logp, step, args)


dpo.update = update
sys.argv = ["minimal_dpo.py", *sys.argv[2:]]
dpo.main()
