"""The one batch object that flows through a training step.

Layout: every row is `[left-padded prompt | completion, right-padded]`. All prompts end
at the same column P, so the completion region is columns P..P+T-1 for every row and
per-token tensors are [B, T]. Padding is tracked only by masks, never by token ids.
Each stage of the step adds fields; none rewrites an earlier stage's.

A multi-turn dialog (envs/dialog.py) uses the same layout with the whole conversation as
the "completion": `[left-padded first prompt | assistant turn 1 | user turn 2 + template
tokens | assistant turn 2 | ...]`. Only assistant tokens are actions (action_mask 1);
`turn_ids` says which turn each action token belongs to and `turn_scores` holds each
turn's reward at the turn's last token. Both are None for a single-turn batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Batch:
    # rollout
    input_ids: torch.Tensor  # [B, P+T]
    attention_mask: torch.Tensor  # [B, P+T]
    action_mask: torch.Tensor  # [B, T] float: 1 on real completion tokens (EOS included)
    logprobs: torch.Tensor  # [B, T] log π_old(a_t|s_t)
    values: torch.Tensor | None  # [B, T] V_old(s_t)
    prompts: list[str]  # raw prompts (before templating), one per row
    completions: list[str]  # decoded completion text (EOS stripped)
    group: torch.Tensor  # [B] index of the prompt each row came from
    ended: torch.Tensor  # [B] bool: the completion reached EOS
    extras: dict = field(default_factory=dict)  # per-row data fields passed to reward functions
    turn_ids: torch.Tensor | None = None  # [B, T] long, multi-turn only: assistant turn (0..K−1) of each action token, −1 elsewhere
    # scoring
    ref_logprobs: torch.Tensor | None = None  # [B, T]
    scores: torch.Tensor | None = None  # [B] weighted sequence score
    reward_terms: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [B]
    turn_scores: torch.Tensor | None = None  # [B, T] multi-turn only: each turn's weighted score at its last token
    rewards: torch.Tensor | None = None  # [B, T] per-token rewards (score on the last token, KL and shaping per token)
    # advantages
    advantages: torch.Tensor | None = None  # [B, T]
    returns: torch.Tensor | None = None  # [B, T]
    # the sampler's own log-probs when π_old was recomputed by the training model (rollout.recompute_logprobs);
    # truncated importance sampling (rollout.is_cap) weighs by their gap
    rollout_logprobs: torch.Tensor | None = None

    @property
    def n_actions(self) -> int:
        return self.action_mask.shape[1]

    @property
    def lengths(self) -> torch.Tensor:
        return self.action_mask.sum(-1)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, idx: torch.Tensor) -> "Batch":
        """A minibatch view (tensor fields indexed by `idx`)."""

        def take(x):
            return x[idx] if isinstance(x, torch.Tensor) else x

        ids = idx.tolist()
        return Batch(
            input_ids=take(self.input_ids),
            attention_mask=take(self.attention_mask),
            action_mask=take(self.action_mask),
            logprobs=take(self.logprobs),
            values=take(self.values),
            prompts=[self.prompts[i] for i in ids],
            completions=[self.completions[i] for i in ids],
            group=take(self.group),
            ended=take(self.ended),
            extras={k: [v[i] for i in ids] for k, v in self.extras.items()},
            turn_ids=take(self.turn_ids),
            ref_logprobs=take(self.ref_logprobs),
            scores=take(self.scores),
            reward_terms={k: take(v) for k, v in self.reward_terms.items()},
            turn_scores=take(self.turn_scores),
            rewards=take(self.rewards),
            advantages=take(self.advantages),
            returns=take(self.returns),
            rollout_logprobs=take(self.rollout_logprobs),
        )

    @staticmethod
    def concat(parts: list["Batch"], pad_id: int = 0) -> "Batch":
        """Rows of several batches (after the rollout and scoring stages) as one: prompts
        re-padded on the left to the widest P, completions on the right to the widest T."""
        P = max(b.input_ids.shape[1] - b.n_actions for b in parts)
        T = max(b.n_actions for b in parts)

        def seq(b, x, fill):  # [B, P_b + T_b] → [B, P + T]
            p_b = b.input_ids.shape[1] - b.n_actions
            return torch.nn.functional.pad(x, (P - p_b, T - b.n_actions), value=fill)

        def tok(x, fill=0.0):  # [B, T_b] → [B, T]
            return None if x is None else torch.nn.functional.pad(x, (0, T - x.shape[1]), value=fill)

        def cat(xs):
            return None if any(x is None for x in xs) else torch.cat(xs)

        return Batch(
            input_ids=torch.cat([seq(b, b.input_ids, pad_id) for b in parts]),
            attention_mask=torch.cat([seq(b, b.attention_mask, 0) for b in parts]),
            action_mask=torch.cat([tok(b.action_mask) for b in parts]),
            logprobs=torch.cat([tok(b.logprobs) for b in parts]),
            values=cat([tok(b.values) for b in parts]),
            prompts=[p for b in parts for p in b.prompts],
            completions=[c for b in parts for c in b.completions],
            group=torch.cat([b.group for b in parts]),
            ended=torch.cat([b.ended for b in parts]),
            extras={k: [v for b in parts for v in b.extras.get(k, [None] * len(b))] for k in _keys(b.extras for b in parts)},
            turn_ids=cat([tok(b.turn_ids, -1) for b in parts]),
            scores=cat([b.scores for b in parts]),
            # a term one part lacks (another environment's) is NaN there, as Dyna's imagined rows
            reward_terms={k: torch.cat([b.reward_terms[k] if k in b.reward_terms else _nan(b, _like(parts, k)) for b in parts])
                          for k in _keys(b.reward_terms for b in parts)},
            turn_scores=cat([tok(b.turn_scores) for b in parts]),
        )



def _keys(dicts) -> list:
    """The union of the dicts' keys, in order of first sight."""
    return list(dict.fromkeys(k for d in dicts for k in d))


def _like(parts: list[Batch], k: str) -> torch.Tensor:
    return next(b.reward_terms[k] for b in parts if k in b.reward_terms)


def _nan(b: Batch, like: torch.Tensor) -> torch.Tensor:
    """NaN for a part without the term, on the term's own device and dtype."""
    return torch.full((len(b),), float("nan"), device=like.device, dtype=like.dtype)
