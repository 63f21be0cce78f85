"""Batched leaf evaluation for token MCTS (`planner.batch_leaves` > 1, see mcts.py).

A wave of leaves selected under virtual loss is evaluated together on the fast decode step
(models/fastdecode.py): each leaf's prefix (the root's K/V and its ancestors') is placed in
one static cache, left-padded to the longest prefix, and all leaves forward their token in
one step of B rows. Padding is masked out by `keep` and each row keeps its own positions, so
row i computes what a batch-1 forward over its own prefix computes (equal within float
rounding; tests/test_planning.py). Decode at these batch sizes is bound by reading the weights,
so B rows cost little more than one: that is the whole gain.

With rollout leaves the rows go on sampling from their priors, one batched step per token,
until every row has reached a finished node (rows that finished early ride along, ignored).
Each node on the way is expanded by the step that reached it and stays in the tree, as in the
one-at-a-time rollout.
"""

from __future__ import annotations

import torch

from . import kv as kvx


def _left_padded_cache(prefixes: list[kvx.KV], total: int):
    """Per layer (K, V) buffers [B, heads, total, dim] with row i's prefix ending at slot L (the
    longest prefix's length), and the [B, total] mask of the slots each row owns so far."""
    lens = [kvx.length(p) for p in prefixes]
    L, B = max(lens), len(prefixes)
    cache = []
    for layer in range(len(prefixes[0])):
        k0, v0 = prefixes[0][layer]
        K = k0.new_zeros((B, k0.shape[1], total, k0.shape[3]))  # zeros, not empty: masked slots must be finite
        V = v0.new_zeros((B, v0.shape[1], total, v0.shape[3]))
        for i, p in enumerate(prefixes):
            K[i, :, L - lens[i] : L].copy_(p[layer][0][0])
            V[i, :, L - lens[i] : L].copy_(p[layer][1][0])
        cache.append((K, V))
    keep = torch.zeros((B, total), dtype=torch.bool, device=prefixes[0][0][0].device)
    for i, n in enumerate(lens):
        keep[i, L - n : L] = True
    return cache, keep, lens, L


@torch.no_grad()
def expand_batch(tree, leaves: list, rollout: bool) -> tuple[list[list], list[float] | None]:
    """Expand each of `leaves` (unexpanded, unfinished nodes of `tree`) in one batched step;
    with `rollout`, go on sampling each row down to a finished node. Sets every expanded
    node's K/V and children; returns, per leaf, the chain of nodes sampled below it (empty
    without `rollout`) and, without `rollout`, the leaves' values V(s) (None where the run
    has no value head on the policy's trunk)."""
    fast, model, dev = tree.fast_wave, tree.model, tree.prompt_ids.device
    paths = [tree._path(n) for n in leaves]
    prefixes = [kvx.join(tree.root_kv, [n.kv for n in p[:-1]]) for p in paths]
    steps = max(tree.gen.max_new_tokens - n.depth + 1 for n in leaves) if rollout else 1
    cache, keep, lens, t = _left_padded_cache(prefixes, max(kvx.length(p) for p in prefixes) + steps)
    pos = torch.tensor(lens, device=dev)
    nodes, chains, live = list(leaves), [[] for _ in leaves], list(range(len(leaves)))
    values = None
    while live:
        keep[:, t] = True
        tok = torch.tensor([n.token for n in nodes], device=dev)
        with model.autocast():
            hidden = fast.step(tok, pos, keep[:, : t + 1], cache, t)
        logits = fast.logits(hidden)
        if not rollout and tree.own_values:
            values = model._value(hidden.float()).tolist()
        still = []
        for i in live:
            node = nodes[i]
            node.kv = [(K[i : i + 1, :, t : t + 1].clone(), V[i : i + 1, :, t : t + 1].clone()) for K, V in cache]
            tree.forward_passes += 1  # one node expanded (the batched step costs about one)
            tree._add_children(node, logits[i], None)
            if not rollout:
                continue
            node = tree.rng.choices(node.children, weights=[c.prior for c in node.children])[0]
            nodes[i] = node
            chains[i].append(node)
            if not node.terminal:
                still.append(i)
        live = still
        pos = pos + 1
        t += 1
    return chains, values


def evaluate(tree, leaves: list) -> None:
    """Score a wave's leaves (some open, some finished) as `tree`'s sequential path would:
    the open ones expanded in one batched step (rollouts: rolled out to the end together),
    then every finished text — and, for `leaf: reward` / `mean`, every open leaf's partial
    text — scored in one reward call. Sets each leaf's value (rollouts: also its chain)."""
    open_ = [n for n in leaves if not n.terminal]
    chains, values = expand_batch(tree, open_, rollout=tree.rollout)
    own = [[m.token for m in tree._path(n)] for n in open_]  # each open leaf's path below the committed tokens
    if not tree.rollout and not tree.own_values and tree.want_values:  # a critic of its own: its own passes
        values = [tree._critic_value(p) for p in own]
    finished = [n for n in leaves if n.terminal] + ([c[-1] for c in chains] if tree.rollout else [])
    partial = own if not tree.rollout and tree.cfg.leaf != "value" else []
    texts = [tree.committed + [m.token for m in tree._path(n)] for n in finished] + [tree.committed + p for p in partial]
    scores = tree._rewards(texts, [n.ended for n in finished] + [False] * len(partial))
    for n, r in zip(finished, scores):
        n.value = r + n.path_reward
    partial_r = scores[len(finished):]
    for i, n in enumerate(open_):
        if tree.rollout:
            for m in chains[i][:-1]:
                m.value = chains[i][-1].value
            n.value, n.chain = chains[i][-1].value, chains[i]
        else:
            v = values[i] if values is not None else None
            n.value = tree._leaf_value(v, tree.committed + own[i], n.path_reward, partial_r[i] if partial else None)
