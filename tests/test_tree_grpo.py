"""Tests of minimal_tree_grpo.py and its sampler probe (results/tree_grpo/sampler_probe.py, claim C1): tree values
and both advantages on a hand-built tree, the limit where a tree is a group of chains, the sampler's forks,
prefixes, re-assembled rows, old log-probs and token count on real trees, the probe's chain matching, the
advantage the main loop trains on, and both as a user runs them. (The reference clipped surrogate with
per-token advantages, micro-batches, repeatability and bad flags: test_every_file.py.)"""
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "results" / "tree_grpo"))
import sampler_probe as probe  # noqa: E402
import minimal_grpo as grpo  # noqa: E402
import minimal_tree_grpo as tree  # noqa: E402
import toy_tasks as tt  # noqa: E402
from conftest import SHARED_KEYS, SHORT, Spy, check_epochs, check_update_in_situ, score  # noqa: E402

# ---------------------------------------------------------------------------------------------
# A hand-built tree: one prompt, M = 2 trees of K = 3 leaves, 4 token positions. owner[m, k, t] is
# the leaf of tree m that sampled token t of leaf k (-1: padding after EOS).
#
#   tree 0: leaf 0 is the root chain (4 tokens); leaves 1 and 2 fork from it at t = 2, so tokens 0-1
#           are one segment shared by all three leaves. Rewards 1, 0, 0.5.
#   tree 1: leaves 1 and 2 fork from the root chain at t = 0: nothing is shared, and an empty segment
#           holding the tree's three leaves sits between them and the root. Rewards 0, 0, 1.
OWNER = torch.tensor([[[[0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 2, -1]],
                       [[0, 0, 0, -1], [1, 1, -1, -1], [2, 2, 2, 2]]]])  # (P=1, M=2, K=3, T=4)
REWARDS = torch.tensor([[[1.0, 0.0, 0.5], [0.0, 0.0, 1.0]]])  # (1, 2, 3)


def test_tree_values_on_a_hand_built_tree():
    value, parent, below, root = tree.tree_values(OWNER, REWARDS)
    # V(root) = (1 + 0 + 0.5 + 0 + 0 + 1) / 6 = 5/12
    assert root.item() == pytest.approx(5 / 12)
    # tree 0: the shared segment (t = 0, 1) has L = 3 and V = 0.5, its parent the root (5/12); after
    # the fork each leaf is its own segment (L = 1, V = its reward) whose parent is that shared segment
    assert below[0, 0].tolist() == [[3, 3, 1, 1], [3, 3, 1, 1], [3, 3, 1, 0]]
    assert torch.allclose(value[0, 0, :, :2], torch.full((3, 2), 0.5))
    assert torch.allclose(parent[0, 0, :, :2], torch.full((3, 2), 5 / 12))
    assert torch.allclose(value[0, 0, :, 2], torch.tensor([1.0, 0.0, 0.5]))
    assert torch.allclose(parent[0, 0, :, 2:3], torch.full((3, 1), 0.5))
    # tree 1: every leaf is one segment from t = 0, parent the empty segment: V = (0 + 0 + 1)/3 = 1/3
    assert below[0, 1].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert torch.allclose(parent[0, 1, :, 0], torch.full((3,), 1 / 3))


def test_treerl_advantage_on_a_hand_built_tree():
    adv = tree.treerl_advantages(OWNER, REWARDS)[0]  # (M, K, T)
    # tree 0, shared segment: [(0.5 - 5/12) + (0.5 - 5/12)] / sqrt(3) = (1/6) / 1.7320508 = 0.0962250
    shared = (1 / 6) / math.sqrt(3)
    # after the fork: leaf 0 (R = 1): (1 - 5/12) + (1 - 0.5) = 13/12; leaf 1 (R = 0): -5/12 - 1/2 =
    # -11/12; leaf 2 (R = 0.5): (0.5 - 5/12) + 0 = 1/12, and 0 on its padding
    expected0 = [[shared, shared, 13 / 12, 13 / 12], [shared, shared, -11 / 12, -11 / 12],
                 [shared, shared, 1 / 12, 0.0]]
    # tree 1: leaves 0 and 1 (R = 0): (0 - 5/12) + (0 - 1/3) = -3/4; leaf 2 (R = 1): 7/12 + 2/3 = 5/4
    expected1 = [[-0.75, -0.75, -0.75, 0.0], [-0.75, -0.75, 0.0, 0.0], [1.25, 1.25, 1.25, 1.25]]
    assert torch.allclose(adv, torch.tensor([expected0, expected1]), atol=1e-6)
    # without the 1/sqrt(L) the shared segment would get 1/6: each of its 3 rows trains it, so its
    # total weight is 3 * (1/6) / sqrt(3) = sqrt(3) * (1/6), not 3 * (1/6)
    assert adv[0, 0, 0].item() * math.sqrt(3) == pytest.approx(1 / 6, abs=1e-6)


def test_tree_grpo_advantage_on_the_same_tree():
    adv = tree.tree_grpo_advantages(OWNER, REWARDS)[0]  # (M, K, T)
    # the authors' z-score: Bessel's std (divide by G - 1), eps 1e-6
    # within tree 0, [1, 0, 0.5]: mean 0.5, std sqrt((0.25 + 0.25 + 0) / 2) = 0.5: z = [1, -1, 0] (x 0.999998)
    #   (the population std, sqrt(1/6) = 0.4082483, would give 1.224745: sqrt(3/2) times larger at K = 3)
    # within tree 1, [0, 0, 1]: mean 1/3, std sqrt((1/9 + 1/9 + 4/9) / 2) = sqrt(1/3) = 0.5773503:
    #   z = [-1/3, -1/3, 2/3] / 0.5773503 = [-0.577350, -0.577350, 1.154701]
    # across all six: mean 5/12, squared deviations 174/144, std sqrt(174/144/5) = 0.4915960:
    #   z(1) = (7/12) / 0.4915960 = 1.186616, z(0) = -(5/12) / 0.4915960 = -0.847583, z(0.5) = 0.169517
    leaf = torch.tensor([[0.999998 + 1.186616, -0.999998 - 0.847583, 0.0 + 0.169517],
                         [-0.577350 - 0.847583, -0.577350 - 0.847583, 1.154701 + 1.186616]])
    # the leaf's advantage on every token of its path, shared or not; 0 on padding
    assert torch.allclose(adv, torch.where(OWNER[0] >= 0, leaf[..., None], 0.0), atol=1e-5)


def test_tied_leaves_give_exactly_zero():
    # twelve leaves of 0.6 whose float32 means are one rounding step off: no residue may leak through
    owner = torch.tensor([[0, 0, 0], [0, 1, 1], [0, 2, -1]]).expand(1, 4, 3, 3)
    rewards = torch.full((1, 4, 3), 0.6)
    for advantages in (tree.treerl_advantages, tree.tree_grpo_advantages):
        assert torch.equal(advantages(owner, rewards), torch.zeros(1, 4, 3, 3))


def test_a_tree_without_forks_is_the_parents_group():
    """--rounds 0: M chains, each a tree with one leaf. TreeRL's advantage is then 2 (r - mean(r)) on
    every token (the global and local terms coincide, L = 1): GRPO's z-score times 2 (std + eps), the
    stated normalisation (TreeRL has no std). Tree-GRPO's authors' code scores a group of one by its
    reward R (mean 0, std 1), so there it is R plus the Bessel z-score over the prompt's chains. The
    per-token surrogate then equals the parent's per-completion one."""
    rewards = torch.tensor([[1.0, 0.2, 0.6, 0.0], [0.5, 0.5, 0.25, 1.0]])  # (P=2, G=4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]] * 2).float()  # (8, 4)
    owner = torch.where(mask > 0, 0, -1).view(2, 4, 1, 4)  # (P, M=4, K=1, T)
    chain = grpo.group_advantages(rewards)  # (P, G)
    scale = 2 * (rewards.std(1, unbiased=False, keepdim=True) + 1e-4)
    treerl = tree.treerl_advantages(owner, rewards.view(2, 4, 1)).view(8, 4)
    assert torch.allclose(treerl, ((chain * scale).view(8, 1) * mask), atol=1e-6)
    tree_grpo = tree.tree_grpo_advantages(owner, rewards.view(2, 4, 1)).view(8, 4)
    # prompt 0, [1, .2, .6, 0]: mean .45, std sqrt(.59 / 3) = .4434712, z = [1.240214, -.563734, .338240,
    #   -1.014721]; prompt 1, [.5, .5, .25, 1]: mean .5625, std sqrt(.296875 / 3) = .3145764,
    #   z = [-.198680, -.198680, -.993399, 1.390759]; each leaf adds its own reward (x 0.999999)
    z = torch.tensor([[1.240214, -0.563734, 0.338240, -1.014721], [-0.198680, -0.198680, -0.993399, 1.390759]])
    assert torch.allclose(tree_grpo, (rewards + z).view(8, 1) * mask, atol=2e-6)
    torch.manual_seed(0)
    old = torch.randn(8, 4)
    logp = old + 0.3 * torch.randn(8, 4)  # ratios on both sides of the clip band
    loss_tree, stats_tree = tree.policy_loss(logp, old, old, treerl, mask, 0.2, 0.04, 8)
    loss_chain, stats_chain = grpo.policy_loss(logp, old, old, (chain * scale).view(-1), mask, 0.2, 0.04, 8)
    assert loss_tree.item() == pytest.approx(loss_chain.item(), rel=1e-6)
    assert all(stats_tree[k].item() == pytest.approx(stats_chain[k].item()) for k in stats_chain)


def test_per_token_clip_frac_counts_what_trl_and_verl_count():
    # one row, four tokens, per-token advantages +1, -1, +1, -1 and ratios 1.5, 1.5, 0.5, 0.5: the clip
    # removes the gradient of (1.5, +1) and (0.5, -1) only, so clip_frac = 2/4
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]])).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, stats = tree.policy_loss(logp, old, old, adv, torch.ones(1, 4), clip_eps=0.2, beta=0.0, n=1)
    # min(rho A, clip(rho) A) = 1.2, -1.5, 0.5, -0.8; token mean -> loss = -(1.2 - 1.5 + 0.5 - 0.8) / 4
    assert loss.item() == pytest.approx(0.15) and stats["clip_frac"].item() == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------
# The sampler's pieces.


def test_pick_forks_ranks_own_tokens_by_surprisal():
    # one tree, leaves as in tree 0 above. Leaf 1's tokens 0-1 belong to leaf 0 (never candidates
    # twice); padding (leaf 2, t = 3) never, whatever its score; and, as EPTree, never a branch's first
    # token after a non-empty prefix (leaves 1 and 2 at t = 2: they re-sampled it from y[:2]).
    owner = OWNER[0, :1]  # (Tr=1, K=3, T=4)
    surprisal = torch.tensor([[[0.1, 0.9, 0.2, 0.3], [5.0, 5.0, 7.0, 0.8], [5.0, 5.0, 0.7, 9.0]]])
    leaf, t = tree.pick_forks(surprisal, owner, 3)
    assert list(zip(leaf[0].tolist(), t[0].tolist())) == [(0, 1), (1, 3), (0, 3)]  # 0.9, 0.8, 0.3
    # branches that forked at t = 0 (tree 1 above) have an empty prefix: their first token is a candidate
    surprisal = torch.tensor([[[0.1, 0.2, 0.3, 0.0], [0.9, 0.4, 0.0, 0.0], [0.5, 0.6, 0.7, 0.8]]])
    leaf, t = tree.pick_forks(surprisal, OWNER[0, 1:], 2)
    assert list(zip(leaf[0].tolist(), t[0].tolist())) == [(1, 0), (2, 3)]  # 0.9, 0.8
    # a one-token root (immediate EOS) has one candidate: asked for two forks, it forks there twice
    leaf, t = tree.pick_forks(torch.tensor([[[2.0, 0.0]]]), torch.tensor([[[0, -1]]]), 2)
    assert leaf.tolist() == [[0, 0]] and t.tolist() == [[0, 0]]


def test_repad_moves_tokens_and_keeps_their_order():
    ids = torch.tensor([[7, 0, 8, 9, 0], [1, 2, 3, 4, 5]])
    keep = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 0, 1, 0]]).bool()
    left, left_mask = tt.repad(ids, keep, pad_id=0, left=True)
    assert left.tolist() == [[0, 0, 7, 8, 9], [0, 0, 0, 2, 4]]
    assert left_mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]]
    right, right_mask = tt.repad(ids, keep, pad_id=0, left=False)
    assert right.tolist() == [[7, 8, 9, 0, 0], [2, 4, 0, 0, 0]]
    assert right_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]


def grown(monkeypatch=None, rounds=2, warmup=0, seed=0, prompts=6):
    """Real trees from a tiny policy (random weights by default: long, varied completions, EOS anywhere).
    With monkeypatch, every tt.sample call is recorded: (prompt_ids, prompt_mask, rollout)."""
    torch.manual_seed(seed)
    task = tt.make_task("reverse")
    tok = tt.build_char_tokenizer(task.alphabet)
    model = tt.build_tiny_model(tok)
    if warmup:
        tt.supervised_warmup(model, tok, task, warmup, seed)
    calls = []
    if monkeypatch is not None:
        real = tt.sample

        def spy(model, tok, ids, mask, *a, **kw):
            r = real(model, tok, ids, mask, *a, **kw)
            calls.append((ids, mask, r))
            return r
        monkeypatch.setattr(tt, "sample", spy)
    args = SimpleNamespace(trees=3, forks=2, rounds=rounds, branches=2, max_new_tokens=10, temperature=1.0,
                           micro_batch=0)
    examples = task.test[:prompts]
    ids, mask = tt.encode(tok, [ex.prompt for ex in examples], "cpu")
    picks = []
    if monkeypatch is not None:
        real_pick = tree.pick_forks

        def spy_pick(surprisal, owner, n):
            leaf, t = real_pick(surprisal, owner, n)
            picks.append((owner.clone(), leaf, t))
            return leaf, t
        monkeypatch.setattr(tree, "pick_forks", spy_pick)
    rollout, owner, gen_tokens = tree.grow_trees(model, tok, ids, mask, args)
    return SimpleNamespace(tok=tok, model=model, examples=examples, ids=ids, mask=mask, rollout=rollout,
                           owner=owner, gen_tokens=gen_tokens, calls=calls, picks=picks, args=args)


def fork_points(owner):
    """(tree, leaf, t) for every branch: t is the first position the leaf sampled itself."""
    tr, k, _ = owner.shape
    own = owner == torch.arange(k)[:, None]
    return [(i, j, int(own[i, j].nonzero()[0])) for i in range(tr) for j in range(1, k)]


def test_grown_trees_fork_only_before_eos_and_never_at_padding(monkeypatch):
    g = grown(monkeypatch)
    # round 2 forks the branches of round 1, never at the token a branch began with after a non-empty
    # prefix (EPTree's rule): the leaf that sampled y[t] also sampled y[t - 1]
    for owner, leaf, t in g.picks:
        own = owner.gather(1, leaf[..., None].expand(-1, -1, owner.size(2)))  # (Tr, N, W) the picked leaves
        before = own.gather(2, (t - 1).clamp(min=0)[..., None]).squeeze(-1)  # (Tr, N) owner of y[t - 1]
        assert ((t == 0) | (before == leaf)).all()
    eos = g.tok.eos_token_id
    rows = g.rollout.completion_ids.view(*g.owner.shape)
    assert g.owner.shape[1] == 1 + 2 * 2 * 2  # K = 1 + L * N * T leaves per tree
    for i, j, t in fork_points(g.owner):
        assert eos not in rows[i, j, :t].tolist()  # the prefix never holds an EOS
        # the forked position was a real token of a leaf with the same prefix: its sibling at the fork
        same_prefix = (g.owner[i, :, :t] == g.owner[i, j, :t]).all(1) & (g.owner[i, :, t] >= 0)
        assert (same_prefix & (g.owner[i, :, t] != j)).any()
    # EOS is a candidate like any sampled token: owners (hence candidates) cover it
    ends = g.rollout.completion_mask.sum(1).long() - 1  # (rows,) the last real token
    last = g.rollout.completion_ids.gather(1, ends[:, None]).squeeze(1)
    assert ((last == eos) <= (g.owner.flatten(0, 1).gather(1, ends[:, None]).squeeze(1) >= 0)).all()


def test_leaf_rows_are_reassembled_correctly():
    g = grown()
    r, k = g.rollout, 3 * g.owner.shape[1]  # leaves per prompt
    prompts = [ex.prompt for ex in g.examples for _ in range(k)]
    ids, mask = tt.encode(g.tok, prompts, "cpu")
    assert torch.equal(r.prompt_ids, ids) and torch.equal(r.prompt_mask, mask)  # left-padded as encoded
    assert torch.equal(r.completion_mask, tt.completion_mask_from(r.completion_ids, g.tok.eos_token_id))
    assert torch.equal((g.owner >= 0).flatten(0, 1).float(), r.completion_mask)  # owners cover the tokens
    for row, m, text, trunc in zip(r.completion_ids, r.completion_mask, r.texts, r.truncated):
        assert text == g.tok.decode(row[m.bool() & (row != g.tok.eos_token_id)])  # as tt.sample decodes
        assert bool(trunc) == (g.tok.eos_token_id not in row[m.bool()].tolist())
    # a branch is its prefix plus its continuation: its text starts with the shared prefix's text
    rows = r.completion_ids.view(*g.owner.shape)
    texts = [r.texts[i:i + g.owner.shape[1]] for i in range(0, len(r.texts), g.owner.shape[1])]
    for i, j, t in fork_points(g.owner):
        prefix = g.tok.decode(rows[i, j, :t])
        assert texts[i][j].startswith(prefix)
        if t > 0:  # the leaf that sampled the prefix's last token holds the same prefix
            assert torch.equal(rows[i, int(g.owner[i, j, t - 1]), :t], rows[i, j, :t])


def test_continuations_start_from_left_padded_prompt_plus_prefix(monkeypatch):
    g = grown(monkeypatch, rounds=1)
    (_, _, roots), (ids, mask, cont) = g.calls  # one call for the roots, one for the branches
    assert torch.equal(mask, mask.sort(1).values)  # all padding on the left
    rows = g.rollout.completion_ids.view(*g.owner.shape)
    for n, (i, j, t) in enumerate(fork_points(g.owner)):
        expected = tt.encode(g.tok, [g.examples[i // 3].prompt], "cpu")[0][0].tolist() + rows[i, j, :t].tolist()
        assert ids[n][mask[n].bool()].tolist() == expected
        # and the leaf goes on with exactly what was sampled after it (cut to the budget)
        kept = cont.completion_ids[n][cont.completion_mask[n].bool()].tolist()[:10 - t]
        assert rows[i, j, t:t + len(kept)].tolist() == kept


def test_duplicated_prefix_tokens_get_identical_old_logprobs():
    g = grown(warmup=5)
    with torch.no_grad():
        logp, _ = tt.token_logprobs(g.model, g.rollout)  # one forward pass over every leaf row
    logp, owner = logp.view(*g.owner.shape), g.owner
    checked = 0
    for i in range(owner.shape[0]):
        for a in range(owner.shape[1]):
            for b in range(a + 1, owner.shape[1]):
                shared = (owner[i, a] == owner[i, b]) & (owner[i, a] >= 0)
                assert torch.equal(logp[i, a][shared], logp[i, b][shared])
                checked += int(shared.sum())
    assert checked > 100


def test_gen_tokens_counts_only_sampled_tokens(monkeypatch):
    g = grown(monkeypatch)
    sampled = sum(int(r.lengths.sum()) for _, _, r in g.calls)  # every token any sample() call drew
    assert int(g.gen_tokens.sum()) == sampled
    assert g.gen_tokens.shape == (len(g.examples) * 3,)  # per tree
    assert sampled < int(g.rollout.lengths.sum())  # the rows repeat shared prefixes; those are free


def test_first_error():
    assert probe.first_error("dcxa", "dcba") == 2  # a wrong character
    assert probe.first_error("dc", "dcba") == 2  # stopped early: the EOS at position 2
    assert probe.first_error("dcbaa", "dcba") == 4  # ran on: the extra character
    assert probe.first_error("dcba", "dcba") == 4  # correct: the EOS after the answer (never asked)


def test_matched_chains_stop_when_the_budget_is_reached():
    # prompt 0: chains of 5, 5, 5 tokens and a budget of 8: the first two are drawn (5 < 8, 10 >= 8)
    # prompt 1: budget 5: only the first (0 < 5, then 5 >= 5)
    correct = torch.tensor([[False, True, True], [False, True, False]])
    lengths = torch.full((2, 3), 5.0)
    solved, drawn = probe.solved_with_matched_chains(correct, lengths, torch.tensor([8.0, 5.0]))
    assert solved.tolist() == [True, False] and drawn.tolist() == [2, 1]
    # chains of 3, 9, 2 tokens and a budget of 4: spent before each 0, 3, 12, so two are drawn and the
    # second counts whole (12 tokens for a budget of 4: the matching favours the chains)
    solved, drawn = probe.solved_with_matched_chains(torch.tensor([[False, False, True]]),
                                                       torch.tensor([[3.0, 9.0, 2.0]]), torch.tensor([4.0]))
    assert solved.tolist() == [False] and drawn.tolist() == [2]


# ---------------------------------------------------------------------------------------------
# The main loop, spied on in a two-step run (--epochs 2 --temperature 0.7, conftest.Spy): the update trains on
# the tree advantage of the trees just grown, each leaf scored against its own prompt, against pi_old frozen
# for both epochs and the frozen base.


def test_tree_grpo_trains_on_its_tree_advantage_against_frozen_pi_old_and_base(monkeypatch, run_fast):
    spy = Spy(monkeypatch)
    spy.sampler(tree, "grow_trees")
    spy.record(tree, "update")
    for key in list(tree.ADVANTAGES):  # main looks the function up in this dict, not in the module
        spy.record(tree, key + "_advantages")
        monkeypatch.setitem(tree.ADVANTAGES, key, getattr(tree, key + "_advantages"))
    p = run_fast("minimal_tree_grpo.py", *SHORT["tree_grpo"], "--epochs", 2, "--temperature", 0.7)
    assert p.returncode == 0, p.stderr
    task, tok = tt.make_task("reverse"), tt.build_char_tokenizer(tt.ReverseTask.alphabet)
    for step, sampled in zip((1, 2), spy.samples):
        calls = [c[0] for c in spy.calls["update"] if c[0][6] == step]
        check_epochs(calls, 2, frozen=(2, 3, 4, 5))
        model, _, rollout, adv, old_logp, ref_logp, _, _ = calls[0]
        assert model is spy.live and rollout is sampled["out"][0]
        assert torch.allclose(old_logp, score(sampled["before"], rollout), atol=1e-6)
        assert torch.allclose(ref_logp, score(spy.base, rollout), atol=1e-6)
        (owner, rewards), out = spy.calls["treerl_advantages"][step - 1]
        assert torch.equal(adv, out.flatten(0, 2))
        assert torch.equal(owner.flatten(0, 1), sampled["out"][1])  # (P, M, K, T) the trees as grown
        # each leaf row scored against its own prompt's answer, in row order
        prompts = [tok.decode(row, skip_special_tokens=True) for row in rollout.prompt_ids]
        want = [task.reward(t, tt.Example(q, q[:-1][::-1], "")) for t, q in zip(rollout.texts, prompts)]
        assert torch.allclose(rewards.flatten(), torch.tensor(want))
        for a, out, before in [c for c in spy.calls["update"] if c[0][6] == step]:
            check_update_in_situ("tree_grpo", before, rollout, adv, old_logp, ref_logp, out)
    assert not torch.allclose(old_logp, ref_logp, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# The file as a user runs it.


@pytest.mark.parametrize("extra", [[], ["--advantage", "tree_grpo"], ["--rounds", "2", "--forks", "2"]])
def test_two_steps_end_to_end(short_run, extra):
    p = short_run("minimal_tree_grpo.py", *SHORT["tree_grpo"], *extra)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    keys = [kv.split("=")[0] for kv in lines[1].split()]
    assert keys == SHARED_KEYS + ["len_wrong", "leaves", "dead_groups"]
    assert lines[-1].startswith("final test_acc=") and " time_s=" in lines[-1]
    records = p.records
    assert [r["kind"] for r in records] == ["eval", "step", "step", "eval", "final"]
    leaves = 4 * (1 + (2 * 2 * 2 if extra[:2] == ["--rounds", "2"] else 2))
    assert records[1]["leaves"] == leaves and isinstance(records[1]["gen_tokens"], int)


def test_tree_sampler_probe_runs(run_fast):
    p = run_fast("results/tree_grpo/sampler_probe.py", "--seeds", 1, "--repeats", 1, "--prompts", 16, "--warmup_steps", 2)
    assert p.returncode == 0, p.stderr
    first, last = p.stdout.strip().splitlines()
    assert first.startswith("seed=0 tree=") and "chains_same_tokens=" in first and last.startswith("mean±std tree=")
    row = dict(kv.split("=") for kv in first.split()[1:])
    assert float(row["tree_minus_chains"]) == pytest.approx(float(row["tree"]) - float(row["chains_same_tokens"]),
                                                            abs=2e-4)
    assert row["tree_leaves"] == "12" and 0 <= float(row["fork_at_first_error"]) <= 1  # the default tree: 4 x 3


@pytest.mark.parametrize("args,flag", [(["--pool", 8], "--pool"), (["--rounds", 0], "--rounds"),
                                       (["--prompts", 0], "--prompts"), (["--seeds", -1], "--seeds")])
def test_tree_sampler_probe_bad_flags_fail_cleanly(run_fast, args, flag):
    p = run_fast("results/tree_grpo/sampler_probe.py", *args)
    assert p.returncode != 0
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and flag in err[0], p.stderr
    assert p.stdout == ""
