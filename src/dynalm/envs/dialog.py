"""A multi-turn dialog environment with a simulated user (the seed article's environment
model P(s', r | s, a), where an LM plays the other side of the conversation).

State: the conversation so far, as the assistant sees it (the user's opening and the turns
since; no persona, no goal). Action: one assistant turn, sampled token by token. Transition:
a frozen user-simulator LM, prompted with the row's persona and goal and the conversation
with the roles swapped (it plays the user), writes the user's next message. Reward: the
configured reward functions score each assistant turn once the user has answered it
(rewards/dialog.py: user_sentiment, engagement, relevance, turn_repetition, or any other
reward function). An episode is `env.turns` assistant turns.

The training sequence of an episode is built by the one rollout of every environment
(rl/episodes.py), which drives this env through `begin`/`advance` (envs/base.py): the
user's replies are context there, never actions, and each turn's score sits on its last token.

User simulator: `env.user_model: reference` (the default) samples the user from the policy's
own frozen reference: the LoRA adapter switched off, or the frozen copy kept for full
fine-tuning. It costs no memory beyond what training already holds, and with the default
policy it *is* the embedded SmolLM2-135M-Instruct. Any other name (e.g.
`smollm2-135m-instruct`, a folder, a .gguf file) loads a separate frozen LM, once per
process and device.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from ..config import Config, EnvConfig, GenerationConfig, ModelConfig
from ..data import render_template
from ..errors import UserError
from ..models.generation import (
    check_context_length, decode_completions, encode_prompts, glue_text, left_pad, render_messages, sample, sample_turn,
)
from ..models.policy import PolicyValueModel
from ..rewards import RewardSet, ScoredTerms
from .base import Turn

_ROLE_LABELS = ("\nAssistant:", "\nUser:")


@dataclass
class DialogState:
    row: dict
    messages: list[dict]  # the assistant's view: alternating user / assistant messages, user first
    turn: int = 0  # assistant turns taken

    @property
    def last_user(self) -> str:
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")

    @property
    def assistant_turns(self) -> list[str]:
        return [m["content"] for m in self.messages if m["role"] == "assistant"]


@dataclass
class DialogTurns:
    """The outcome of one batched turn: what `step` returns, plus the simulated user replies."""

    next_states: list[DialogState]
    scored: ScoredTerms
    done: list[bool]
    user_replies: list[str] = field(default_factory=list)


_USER_MODELS: dict[tuple[str, str], PolicyValueModel] = {}


def load_user_model(name: str, device: torch.device) -> PolicyValueModel:
    """A frozen LM for the user simulator, loaded once per (name, device)."""
    key = (name, str(device))
    if key not in _USER_MODELS:
        _USER_MODELS[key] = PolicyValueModel.build(ModelConfig(name=name), value_head=False, device=device, frozen=True)
    return _USER_MODELS[key]


def region_tokens(e: EnvConfig, g: GenerationConfig) -> int:
    """An upper bound on the tokens after the first prompt (for the memory estimate)."""
    return e.turns * g.max_new_tokens + (e.turns - 1) * (e.user_generation.max_new_tokens + 24)


class DialogEnv:
    """reset(row) → state; step(state, reply) → (next_state, turn reward terms, done);
    begin/advance: the batched episode interface of rl/episodes.py (the user LM batched)."""

    @property
    def max_turns(self) -> int:
        return self.cfg.env.turns

    def __init__(self, cfg: Config, model: PolicyValueModel | None = None, rewards: RewardSet | None = None, tokenizer=None):
        if model is None and tokenizer is None:
            raise ValueError("DialogEnv needs the policy model (or at least its tokenizer)")
        self.cfg = cfg
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        self.rewards = rewards if rewards is not None else RewardSet(cfg.rewards)
        self._user: PolicyValueModel | None = None
        if cfg.env.user_model != "reference" and model is not None:
            self._user = load_user_model(cfg.env.user_model, model.device)  # fail early on a bad name

    # ------------------------------------------------------------------ text interface
    def reset(self, row: dict) -> DialogState:
        d = self.cfg.data
        opening = render_template(d.template, row, d.prompt_field)
        return DialogState(row=row, messages=[{"role": "user", "content": opening}])

    def _chat(self, tokenizer) -> bool:
        return self.cfg.model.use_chat_template and bool(getattr(tokenizer, "chat_template", None))

    def render(self, state: DialogState) -> str:
        """The assistant's prompt for its next turn (the chat template, or a plain transcript)."""
        m = self.cfg.model
        return render_messages(self.tokenizer, state.messages, chat=m.use_chat_template, system_prompt=m.system_prompt)

    def glue_text(self, state: DialogState, user_reply: str, last_token: int | None) -> str:
        """models.generation.glue_text for the user's reply after the assistant's sampled turn."""
        m = self.cfg.model
        return glue_text(
            self.tokenizer, state.messages, [{"role": "user", "content": user_reply}], last_token,
            chat=m.use_chat_template, system_prompt=m.system_prompt,
        )

    def user_prompt(self, state: DialogState, reply: str, tokenizer) -> str:
        """The user simulator's prompt: persona and goal, then the conversation with the
        roles swapped (the simulator is the 'assistant' of this chat and speaks next)."""
        row = {k: ("" if v is None else v) for k, v in state.row.items()}
        instr = " ".join(self.cfg.env.user_instructions.format_map(defaultdict(str, row)).split())
        conv = state.messages + [{"role": "assistant", "content": reply}]
        if self._chat(tokenizer):
            swapped = [{"role": "assistant" if m["role"] == "user" else "user", "content": m["content"]} for m in conv]
            try:
                return tokenizer.apply_chat_template(
                    [{"role": "system", "content": instr}] + swapped, tokenize=False, add_generation_prompt=True
                )
            except Exception:  # a template that insists on user-first alternation: plain text below
                pass
        lines = [f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in conv]
        return f"{instr}\n\n" + "\n".join(lines) + "\nUser:"

    @staticmethod
    def _clean_user(text: str) -> str:
        """Keep the user's own message when the simulator runs on into a transcript."""
        text = text.strip()
        if text.startswith("User:"):
            text = text[len("User:") :]
        for lab in _ROLE_LABELS:
            i = text.find(lab)
            if i >= 0:
                text = text[:i]
        return text.strip()

    @torch.no_grad()
    def simulate_user(
        self, states: list[DialogState], replies: list[str], generator: torch.Generator | None = None,
        rows: list[int] | None = None,
    ) -> list[str]:
        """The simulated user's next message for each (state, assistant reply). `rows`: the
        episodes (of `begin`) these are; with `env.user_generation.turn_cache` the simulator
        then keeps each episode's KV cache across turns and prefills only what its re-rendered
        prompt does not share with what it read last turn."""
        e = self.cfg.env
        if self._user is not None:
            user, use_ref = self._user, False
        else:
            if self.model is None:
                raise UserError("env.user_model 'reference' needs the policy model", "pass the model to DialogEnv")
            user, use_ref = self.model, True
        tok = user.tokenizer
        texts = [self.user_prompt(s, r, tok) for s, r in zip(states, replies)]
        ids, mask, truncated = encode_prompts(tok, texts, e.user_max_prompt_tokens, user.device)
        check_context_length(user, ids.shape[1], e.user_generation.max_new_tokens, "the user simulator's prompt")
        g = e.user_generation
        cache = getattr(self, "_user_cache", None)
        if rows is None or not g.turn_cache or truncated:  # a cut prompt shares no prefix with the last one
            out, _, amask, _, _, ended = sample(user, ids, mask, g, generator=generator, with_values=False, use_reference=use_ref)
            self._user_cache = None
        else:
            prefix = None
            if cache is not None and all(i in cache[1] for i in rows):
                prompts = [ids[j, mask[j].bool()].tolist() for j in range(len(rows))]
                prefix, rest = cache[0].select([cache[1][i] for i in rows]).reuse(prompts)
                if prefix is not None:
                    ids, mask = left_pad(rest, tok.pad_token_id if tok.pad_token_id is not None else 0, user.device)
            (out, _, amask, _, _, ended), state = sample_turn(
                user, ids, mask, g, prefix, generator=generator, with_values=False, use_reference=use_ref
            )
            self._user_cache = (state, {i: j for j, i in enumerate(rows)}) if state is not None else None
        return [self._clean_user(t) for t in decode_completions(tok, out, amask, ended)]

    def score(
        self, states: list[DialogState], replies: list[str], user_replies: list[str], ended: list[bool] | None, *, training: bool
    ) -> ScoredTerms:
        """The turn's reward terms (rewards/dialog.py documents the keyword arguments)."""
        pf = self.cfg.data.prompt_field
        keys = sorted({k for s in states for k in s.row} - {pf})
        extras = {k: [s.row.get(k) for s in states] for k in keys}
        extras.update(
            user_reply=list(user_replies),
            assistant_history=[s.assistant_turns for s in states],
            turn=[s.turn for s in states],
            ended=list(ended) if ended is not None else [True] * len(states),
        )
        return self.rewards([s.last_user for s in states], list(replies), update_stats=training, **extras)

    def step_batch(
        self,
        states: list[DialogState],
        replies: list[str],
        ended: list[bool] | None = None,
        *,
        training: bool = False,
        generator: torch.Generator | None = None,
        rows: list[int] | None = None,
    ) -> DialogTurns:
        """One assistant turn for a batch of episodes: the user answers, the turn is scored."""
        t0 = time.perf_counter()
        users = self.simulate_user(states, replies, generator, rows)
        t1 = time.perf_counter()
        scored = self.score(states, replies, users, ended, training=training)
        self.last_timing = {"user": t1 - t0, "reward": time.perf_counter() - t1}
        nxt = [
            DialogState(s.row, s.messages + [{"role": "assistant", "content": r}, {"role": "user", "content": u}], s.turn + 1)
            for s, r, u in zip(states, replies, users)
        ]
        return DialogTurns(nxt, scored, [s.turn >= self.cfg.env.turns for s in nxt], users)

    def step(self, state: DialogState, reply: str, *, generator: torch.Generator | None = None):
        """(next_state, {term: value} plus 'score', done) for one episode's assistant reply."""
        res = self.step_batch([state], [reply], generator=generator)
        terms = {k: v[0] for k, v in res.scored.terms.items()}
        terms["score"] = res.scored.scores[0]
        return res.next_states[0], terms, res.done[0]

    # ------------------------------------------------------------------ episodes (rl/episodes.py)
    def begin(self, rows: list[dict], *, training: bool) -> tuple[list[str], list[str]]:
        self._states = [self.reset(r) for r in rows]
        self._user_cache = None  # (TurnCache, episode -> its row) of the simulator's last turn
        self._scores: list[list[float]] = [[] for _ in rows]
        self._terms: list[list[dict]] = [[] for _ in rows]
        self._user_words: list[int] = []
        self._t_user = 0.0
        return [self.render(s) for s in self._states], [str(r[self.cfg.data.prompt_field]) for r in rows]

    def advance(self, live, replies, last_tokens, ended, *, training: bool, generator=None, score: bool = True) -> Turn:
        """The simulated user answers every live episode's turn in one batch; the turn is scored."""
        states = [self._states[i] for i in live]
        res = self.step_batch(states, list(replies), list(ended), training=training, generator=generator, rows=list(live))
        self._t_user += self.last_timing["user"]
        self._user_words += [len(u.split()) for u in res.user_replies]
        glue = []
        for j, i in enumerate(live):
            self._scores[i].append(res.scored.scores[j])
            self._terms[i].append({k: v[j] for k, v in res.scored.terms.items()})
            glue.append(None if res.done[j] else self.glue_text(states[j], res.user_replies[j], last_tokens[j]))
            self._states[i] = res.next_states[j]
        n = len(live)
        return Turn(list(res.scored.scores), res.scored.terms, list(res.done), [False] * n, glue, [{} for _ in range(n)])

    def transcripts(self) -> list[list[dict]]:
        return [self.transcript(s, sc, tt) for s, sc, tt in zip(self._states, self._scores, self._terms)]

    def messages(self, i: int) -> list[dict]:
        """Episode i's conversation so far, as the assistant sees it."""
        return self._states[i].messages

    def episode_info(self) -> dict:
        return {"dialog/user_words": sum(self._user_words) / max(len(self._user_words), 1), "time/user": self._t_user}

    @staticmethod
    def transcript(state: DialogState, scores: list[float], terms: list[dict]) -> list[dict]:
        """The conversation as a list of messages; assistant turns carry their score and terms."""
        out, k = [], 0
        for m in state.messages:
            rec = {"role": m["role"], "content": m["content"]}
            if m["role"] == "assistant":
                rec["reward"] = scores[k]
                rec["terms"] = terms[k]
                k += 1
            out.append(rec)
        return out
