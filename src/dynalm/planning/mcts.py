"""Token-level MCTS guided by the value head (PPO-MCTS: Liu et al., 2023, "Don't throw away
your value model!").

A node is a prefix, an edge a token. Expanding a node costs one incremental forward (see
`kv.py`): it gives the node's value V(s) and the priors of its children — the policy's
top-k tokens, softmax renormalised over those k. Selection is PUCT,
    Q(s,a) + c_puct · P(s,a) · sqrt(N(s)) / (1 + N(s,a)),   N(s) = Σ_b N(s,b),
with Q rescaled to [0, 1] by the lowest and highest leaf score
seen in the tree (MuZero's normalisation; `planner.normalize_q`), and where an unvisited
child's Q is its parent's own value (rewards have no fixed scale, so
Q=0 would push search toward or away from new tokens depending on their sign). A leaf is
scored by V(leaf) (or, with `planner.leaf`, by the run's reward on the partial text, the
mean of both, or a rollout — see below); a finished leaf (EOS, or the token limit) by the true reward from
`env.step` instead (once per leaf: rewards are taken to be deterministic). Values are
backed up along the path; Q is their mean. Priors and the KL term use
generation.temperature; generation.top_k/top_p do not apply (the planner's top_k does).

Every leaf is scored on the scale the value head was trained on: the per-token rewards
along its path (from the prompt to the leaf) plus V(leaf) when it is open, or plus the
sequence score when it is finished, as PPO-MCTS does. The per-token rewards are the run's
own (`PathReward`): −kl_coef·(log π − log π_ref) per token — kl_coef is the run's β for
a2c/ppo, whose value head learned returns with that penalty (0 for grpo/rloo), or
`planner.kl_coef` when set — and α·log P_env(a_t|s_t) with α = env.fluency_coef. Without
them an open leaf's V would carry the future per-token terms while a finished leaf's score
carries none, and with negative terms (fluency) the search would prefer an early EOS.

After `simulations` simulations the emitted token is the most visited child of the root
(or one sampled ∝ N^(1/T)). The root then moves to that child and KEEPS its subtree:
its children start with the visits they already had, so after each search the root's
child visits sum to `carried + simulations` (`StepStats` records both).

`planner.leaf: rollout` is classic MCTS with playouts, for when no value head predicts the
reward (a critic-free run, or a reward the head cannot read off the hidden states): a new
leaf is completed by sampling from the priors down to a finished node, and the true reward
of that whole text is the leaf's score. The rollout's nodes are expanded by the forwards
that sampled them and stay in the tree, so a node's Q is the mean reward of the finished
texts through it, and later simulations branch off earlier rollouts. Since each simulation
already reaches the end, the search runs once, before the first token; the emitted text is
then the most visited path (visit ties go to the higher Q), itself one of the rollouts.
Cost: at most `simulations` rollouts, i.e. ≤ simulations × max_new_tokens one-token
forwards and `simulations` reward calls per completion.

`planner.batch_leaves: K` runs the simulations in waves of K (leaf parallelism with virtual
loss, as in AlphaGo): leaves are selected one after another, each path charged a virtual
visit at the lowest score seen so the next selection looks elsewhere, then all K are
evaluated in one batched forward (rollouts: one batched step per token; `wave.py`) and their
finished texts scored in one reward call. With K = 1 the search is the sequential one above;
with K > 1 the tree differs (later leaves of a wave do not see earlier ones' scores), and a
reward term that depends on its batch (batch_repetition) sees the wave's texts together.
"""

from __future__ import annotations

import math
import random

import torch

from ..config import GenerationConfig
from ..errors import UserError
from ..models.critic import PrefixCritic
from ..models.fastdecode import decoder_for, static_cache
from ..models.generation import stop_ids
from . import kv as kvx
from . import wave
from .pathreward import PathReward, path_reward_for  # noqa: F401  (re-exported)
from .config import PlannerConfig
from .tree import Node, StepStats


class TokenMCTS:
    """Search for one prompt (batch size 1). `run()` returns (tokens, ended, stats)."""

    def __init__(
        self,
        model,
        env,
        row: dict,
        prompt_ids: torch.Tensor,  # [1, P], unpadded
        gen: GenerationConfig,
        cfg: PlannerConfig,
        rng: random.Random | None = None,  # for rollouts and for sampling the emitted token (temperature > 0)
        path_reward: PathReward | None = None,  # default: planner.kl_coef (0 when unset), no fluency term
    ):
        if model.value_head is None and cfg.leaf in ("value", "mean"):
            raise UserError(
                "planner 'mcts' needs a value head to score leaves",
                "set model.value_head: true, or use --set planner.leaf=rollout",
            )
        self.model, self.env, self.row, self.gen, self.cfg = model, env, row, gen, cfg
        self.rng = rng if rng is not None else random.Random(cfg.seed)
        self.stops = stop_ids(model.tokenizer, getattr(model.lm, "generation_config", None)) if gen.stop_at_eos else set()
        self.path_r = path_reward if path_reward is not None else PathReward(kl_coef=cfg.kl_coef or 0.0)
        self.use_kl = self.path_r.needs_reference  # the reference forwards give log π_ref
        self.forward_passes = 0
        self.reward_calls = 0
        self.committed: list[int] = []  # tokens emitted so far (the path from the prompt to the root)
        # The prompt: one prefill with the policy (and the reference for the KL term).
        self.rollout = cfg.leaf == "rollout"
        # Rollouts on the fast decode step (generation.fast_decode, a supported model), unless a
        # per-token reference term needs the reference's forwards too (the other folding).
        self.fast_rollouts = decoder_for(model, model.lm) if self.rollout and gen.fast_decode and not self.use_kl else None
        # planner.batch_leaves > 1: waves of leaves evaluated in one batched step (wave.py), on
        # the fast decoder only (the transformers path evaluates a wave's leaves one by one).
        self.fast_wave = decoder_for(model, model.lm) if cfg.batch_leaves > 1 and gen.fast_decode and not self.use_kl else None
        for fast in {id(f): f for f in (self.fast_rollouts, self.fast_wave) if f is not None}.values():
            fast.refresh(adapters_on=True)  # the weights do not change during a search
        self.want_values = cfg.leaf in ("value", "mean")
        # A head on the policy's trunk reads V off the policy's own forward; a critic with its
        # own trunk (model.critic: adapter | model) runs its own pass over each leaf's path, the prefix cached.
        self.own_values = self.want_values and getattr(model, "critic_kind", "head") == "head"
        self.prompt_ids = prompt_ids
        self.prefix_critic = PrefixCritic(model) if self.want_values and not self.own_values else None
        logits, value, self.root_kv = kvx.prefill(model, model.lm, prompt_ids, want_values=self.own_values)
        self.forward_passes += 1
        if self.want_values and not self.own_values:
            value = self._critic_value([])
        ref_logits, self.root_ref_kv = None, None
        if self.use_kl:
            with model.reference() as ref:
                ref_logits, _, self.root_ref_kv = kvx.prefill(model, ref, prompt_ids, want_values=False)
            self.forward_passes += 1
        self.root = Node(token=None, parent=None, prior=1.0, depth=0)
        # Rollout leaves: no score before the first rollout. An unvisited child's Q defaults to its
        # parent's own score: at the root the mean so far, below it the reward of the rollout
        # that first reached the parent.
        if self.rollout:
            self.vmin, self.vmax = math.inf, -math.inf
        else:
            self.root.value = self._leaf_value(value, [], 0.0)
            self.vmin = self.vmax = self.root.value  # the range of leaf scores seen, for normalize_q
        self._add_children(self.root, logits, ref_logits)

    # ------------------------------------------------------------------ one simulation
    def simulate(self) -> None:
        node, path = self.root, [self.root]
        while node.children:
            node = self._select(node)
            path.append(node)
        if node.value is None:  # first visit: a forward (or a reward call when finished)
            if self.rollout and not node.terminal:
                path += self._rollout(node)  # ends at a finished node, which holds the reward
                node = path[-1]
            else:
                node.value = self._evaluate(node)
            self.vmin, self.vmax = min(self.vmin, node.value), max(self.vmax, node.value)
        self._backup(path, node.value)

    def simulate_wave(self, k: int) -> int:
        """Up to `k` simulations whose leaves are chosen one after another under virtual loss
        and evaluated together; returns how many ran. Each selected path is charged a virtual
        visit worth the lowest leaf score seen (0 after normalize_q; before any score, the Q
        the node already had), so the next selection in the wave prefers other branches; the
        charge is taken back before the real backup. Leaves already in the wave are not
        selected again; a finished leaf scored earlier is backed up at once."""
        pending, used, inflight = [], 0, set()
        while used < k:
            node, path = self.root, [self.root]
            while node.children:
                child = self._select(node, inflight)
                if child is None:  # every way down from `node` ends in a leaf of this wave
                    break
                node = child
                path.append(node)
            if node.children:
                if node is self.root:
                    break
                inflight.add(id(node))  # skip the exhausted subtree from above; select again
                continue
            if node.value is not None:  # a finished node seen before: no evaluation needed
                self._backup(path, node.value)
                used += 1
                continue
            pending.append(path)
            inflight.add(id(node))
            used += 1
            for n in path[1:]:  # virtual loss
                v = self._virtual(n)
                n.visits += 1
                n.value_sum += v
        self._evaluate_wave(pending)
        for path in pending:
            leaf = path[-1]
            for n in path[1:]:  # take the virtual loss back
                n.visits -= 1
                n.value_sum -= n.virtual.pop()
            if self.rollout and not leaf.terminal:
                path += leaf.chain
                leaf.chain = None
            value = path[-1].value
            self.vmin, self.vmax = min(self.vmin, value), max(self.vmax, value)
            self._backup(path, value)
        return used

    def _virtual(self, n: Node) -> float:
        v = self.vmin if self.vmin < math.inf else n.q(n.parent.value if n.parent.value is not None else n.parent.q(0.0))
        n.virtual.append(v)
        return v

    def _evaluate_wave(self, paths: list[list[Node]]) -> None:
        """Score each path's leaf: batched on the fast decoder where there is one (wave.py), else one by one."""
        if self.fast_wave is None or all(p[-1].terminal for p in paths):
            for n in (p[-1] for p in paths):
                if self.rollout and not n.terminal:
                    n.chain = self._rollout(n)
                else:
                    n.value = self._evaluate(n)
            return
        wave.evaluate(self, [p[-1] for p in paths])

    def _backup(self, path: list[Node], value: float) -> None:
        for n in path:
            n.visits += 1
            n.value_sum += value

    def _norm(self, q: float) -> float:
        if not self.cfg.normalize_q or self.vmax <= self.vmin:
            return q
        return (q - self.vmin) / (self.vmax - self.vmin)

    def _select(self, node: Node, skip: set[int] | None = None) -> Node | None:
        """The PUCT child of `node`; children whose ids are in `skip` (a wave's leaves in flight,
        or subtrees with nothing left to select) are passed over (None when all are)."""
        sqrt_n = math.sqrt(sum(c.visits for c in node.children))
        default = node.value if node.value is not None else node.q(0.0)
        best, best_score = (node.children[0] if not skip else None), -math.inf
        for c in node.children:  # strict '>' keeps ties on the higher prior
            if skip and id(c) in skip:
                continue
            score = self._norm(c.q(default)) + self.cfg.c_puct * c.prior * sqrt_n / (1 + c.visits)
            if score > best_score:
                best, best_score = c, score
        return best

    def _path(self, node: Node) -> list[Node]:
        """Nodes from just below the root down to `node`."""
        out = []
        while node.parent is not None:
            out.append(node)
            node = node.parent
        return out[::-1]

    def _evaluate(self, node: Node) -> float:
        path = self._path(node)
        if node.terminal:
            return self._reward(self.committed + [n.token for n in path], node.ended) + node.path_reward
        value = self._expand(node, path)
        return self._leaf_value(value, self.committed + [n.token for n in path], node.path_reward)

    def _rollout(self, node: Node) -> list[Node]:
        """planner.leaf=rollout: complete `node`'s prefix by sampling from the priors (the policy's
        top-k, renormalised) down to a finished node, which is scored by the true reward. Every
        node on the way is expanded by the forward that sampled from it, so the rollout stays
        in the tree as a chain and later simulations branch off it for free. Returns the chain
        below `node`; each of its nodes keeps the rollout's score as its own value."""
        start, path, chain = node, self._path(node), []
        fast, dev = self.fast_rollouts, self.prompt_ids.device
        if fast is not None:  # the chain's forwards on one static cache (fastdecode.py)
            prefix = kvx.join(self.root_kv, [n.kv for n in path[:-1]])
            t = kvx.length(prefix)
            cache = static_cache(prefix, t + self.gen.max_new_tokens - node.depth + 1)
        while not node.terminal:
            if fast is None:
                self._expand(node, path)
            else:
                keep = torch.ones((1, t + 1), dtype=torch.bool, device=dev)
                with self.model.autocast():
                    hidden = fast.step(torch.tensor([node.token], device=dev), torch.tensor([t], device=dev), keep, cache, t)
                node.kv = [(K[:, :, t : t + 1].clone(), V[:, :, t : t + 1].clone()) for K, V in cache]
                self.forward_passes += 1
                self._add_children(node, fast.logits(hidden)[0], None)
                t += 1
            weights = [c.prior for c in node.children]
            node = self.rng.choices(node.children, weights=weights)[0]
            path.append(node)
            chain.append(node)
        value = self._reward(self.committed + [n.token for n in path], node.ended) + node.path_reward
        for n in [start, *chain]:
            n.value = value
        return chain

    def _expand(self, node: Node, path: list[Node]):
        """One incremental forward of the node's token over root + ancestors' K/V: adds its
        children and returns V(node) (None without a value head)."""
        m = self.model
        prefix = kvx.join(self.root_kv, [n.kv for n in path[:-1]])
        logits, value, node.kv = kvx.extend(m, m.lm, prefix, node.token, self.own_values)
        self.forward_passes += 1
        if self.want_values and not self.own_values:
            value = self._critic_value([n.token for n in path])
        ref_logits = None
        if self.use_kl:
            prefix = kvx.join(self.root_ref_kv, [n.ref_kv for n in path[:-1]])
            with m.reference() as ref:
                ref_logits, _, node.ref_kv = kvx.extend(m, ref, prefix, node.token, False)
            self.forward_passes += 1
        self._add_children(node, logits, ref_logits)
        return value

    @torch.no_grad()
    def _critic_value(self, path_tokens: list[int]) -> float:
        """V(s) of the prompt + the committed tokens + `path_tokens`, by the critic's own pass
        (its pass over the prompt and committed tokens cached: models/critic.PrefixCritic)."""
        self.forward_passes += 1
        return self.prefix_critic.value(self.prompt_ids[0].tolist() + self.committed, path_tokens)

    def _leaf_value(self, value, tokens: list[int], path_reward: float, reward: float | None = None) -> float:
        """An unfinished leaf's score: V(s), the reward of the partial text (`reward` where the
        caller has scored it already), or their mean; plus the path's per-token rewards."""
        leaf = self.cfg.leaf
        if leaf == "value":
            return float(value) + path_reward
        r = self._reward(tokens, False) if reward is None else reward
        return (r if leaf == "reward" else 0.5 * (float(value) + r)) + path_reward

    def _add_children(self, node: Node, logits: torch.Tensor, ref_logits: torch.Tensor | None) -> None:
        logp = torch.log_softmax(logits.float() / self.gen.temperature, dim=-1)
        top = torch.topk(logp, min(self.cfg.top_k, logp.shape[-1]))
        priors = torch.softmax(top.values, dim=-1).tolist()  # renormalised over the top k
        tok_r = [0.0] * len(priors)
        if ref_logits is not None:  # the per-token reward of each child's token, as the trainer computes it
            ref_logp = torch.log_softmax(ref_logits.float() / self.gen.temperature, dim=-1)[top.indices]
            pr = self.path_r
            tok_r = (-pr.kl_coef * (top.values - ref_logp) + pr.fluency_coef * ref_logp).tolist()
        depth = node.depth + 1
        for tok, p, r in zip(top.indices.tolist(), priors, tok_r):
            ended = tok in self.stops
            terminal = ended or depth >= self.gen.max_new_tokens
            node.children.append(Node(tok, node, p, depth, path_reward=node.path_reward + r, terminal=terminal, ended=ended))

    def _reward(self, tokens: list[int], ended: bool) -> float:
        return self._rewards([tokens], [ended])[0]

    def _rewards(self, tokens: list[list[int]], ended: list[bool]) -> list[float]:
        """The true reward of each finished text, in one call to the environment."""
        if not tokens:
            return []
        texts = [decode(self.model.tokenizer, t, e) for t, e in zip(tokens, ended)]
        _, scored, _ = self.env.step([self.row] * len(texts), texts, list(ended))
        self.reward_calls += len(texts)
        return [float(x) for x in scored.scores]

    # ------------------------------------------------------------------ moving on
    def choose(self) -> Node:
        kids = self.root.children
        if self.cfg.temperature == 0:
            if self.rollout:  # below the first branchings most nodes hold one visit: ties go to the better rollout
                return max(kids, key=lambda c: (c.visits, c.q(-math.inf)))
            return max(kids, key=lambda c: c.visits)  # first max = higher prior on ties
        top = max(c.visits for c in kids)  # scale to ≤ 1 so a small T cannot overflow
        weights = [(c.visits / top) ** (1.0 / self.cfg.temperature) for c in kids]
        return self.rng.choices(kids, weights=weights)[0]

    def advance(self, child: Node) -> None:
        """Make `child` the root, keeping its subtree and statistics; drop its siblings."""
        self.committed.append(child.token)
        self.root_kv = kvx.join(self.root_kv, [child.kv])
        if self.use_kl:
            self.root_ref_kv = kvx.join(self.root_ref_kv, [child.ref_kv])
        child.kv = child.ref_kv = None  # now part of root_kv
        child.parent = None
        self.root = child

    def run(self) -> tuple[list[int], bool, list[StepStats]]:
        stats = []
        while True:
            carried = sum(c.visits for c in self.root.children)
            # Rollout leaves: every simulation already ends in a finished text, so one search
            # before the first token builds the whole tree; the emitted text then follows its
            # most visited path (re-searching after every token would cost `simulations`
            # rollouts per token).
            todo = 0 if self.rollout and stats else self.cfg.simulations
            while todo > 0:
                if self.cfg.batch_leaves == 1:
                    self.simulate()
                    todo -= 1
                else:
                    todo -= self.simulate_wave(min(self.cfg.batch_leaves, todo))
            child = self.choose()
            stats.append(StepStats(child.token, {c.token: c.visits for c in self.root.children}, carried))
            if child.terminal:
                return self.committed + [child.token], child.ended, stats
            # visits > 0 and not terminal ⇒ expanded, so its K/V exists
            self.advance(child)


def decode(tokenizer, tokens: list[int], ended: bool) -> str:
    """Like rollout.decode_completions: drop the EOS token itself."""
    toks = tokens[:-1] if ended and tokens else tokens
    return tokenizer.decode(toks, skip_special_tokens=True).strip()
