"""A multi-turn dialog environment with a simulated user (the seed article's environment
model P(s', r | s, a), where an LM plays the other side of the conversation).

State: the conversation so far, as the assistant sees it (the user's opening and the turns
since; no persona, no goal). Action: one assistant turn, sampled token by token. Transition:
a frozen user-simulator LM, prompted with the row's persona and goal and the conversation
with the roles swapped (it plays the user), writes the user's next message. Reward: the
configured reward functions score each assistant turn once the user has answered it
(rewards/dialog.py: user_sentiment, engagement, relevance, turn_repetition, or any other
reward function). An episode is `env.turns` assistant turns.

Training sequence, one per episode (rl/batch.py's layout, the conversation as the completion):

    [left-padded first prompt | assistant turn 1 | user turn 2 + template | assistant turn 2 | ...]

built from token ids (never re-tokenised), so the log-probs and values recorded while
sampling each turn equal those of one forward over the whole sequence. Only assistant
tokens are actions (action_mask 1); the user's tokens and the chat-template tokens between
turns are 0, so they never enter a loss, the KL, the fluency term or a metric. Each turn's
weighted score sits on that turn's last token; GAE/TD(0) skip the masked gaps, so credit
flows across turns through the value head, discounted by `env.turn_gamma` between turns.

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

from ..config import Config, ModelConfig
from ..data import render_template
from ..errors import UserError
from ..models.policy import PolicyValueModel
from ..rewards import RewardSet, ScoredTerms
from ..rl.batch import Batch
from ..rl.rollout import decode_completions, encode_prompts, sample

_SENTINEL = "@@DYNALM-ASSISTANT-TURN@@"
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


def region_tokens(cfg: Config) -> int:
    """An upper bound on the tokens after the first prompt (for the memory estimate)."""
    e, g = cfg.env, cfg.generation
    return e.turns * g.max_new_tokens + (e.turns - 1) * (e.user_generation.max_new_tokens + 24)


class DialogEnv:
    """reset(row) → state; step(state, reply) → (next_state, turn reward terms, done);
    rollout(...) → the batched multi-turn Batch the trainer learns from."""

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

    def _with_system(self, messages: list[dict]) -> list[dict]:
        sp = self.cfg.model.system_prompt
        return ([{"role": "system", "content": sp}] if sp is not None else []) + messages

    def render(self, state: DialogState) -> str:
        """The assistant's prompt for its next turn (the chat template, or a plain transcript)."""
        if self._chat(self.tokenizer):
            return self.tokenizer.apply_chat_template(
                self._with_system(state.messages), tokenize=False, add_generation_prompt=True
            )
        sp = self.cfg.model.system_prompt
        lines = [f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in state.messages]
        return (f"{sp}\n\n" if sp else "") + "\n".join(lines) + "\nAssistant:"

    def glue_text(self, state: DialogState, user_reply: str, last_token: int | None) -> str:
        """The text between the end of the assistant's sampled turn and its next turn: the end
        of its message (unless the turn's last sampled token, `last_token`, is the template's
        own end-of-turn token and so already closed it), the user's message, and the
        template's cue for the assistant. `last_token` is None for a turn cut at the token
        limit; a turn that stopped on another stop id keeps the template's marker."""
        if self._chat(self.tokenizer):
            msgs = self._with_system(
                state.messages + [{"role": "assistant", "content": _SENTINEL}, {"role": "user", "content": user_reply}]
            )
            full = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            suffix = full[full.rindex(_SENTINEL) + len(_SENTINEL) :]
            head = suffix.lstrip()
            if last_token is not None and head:
                first = self.tokenizer(head, add_special_tokens=False)["input_ids"][:1]
                marker = self.tokenizer.decode([last_token])
                if first == [last_token] and marker and head.startswith(marker):
                    # the sampled token is the template's end-of-turn marker: it closed the
                    # message (with whatever the template puts before it)
                    suffix = head[len(marker) :]
            return suffix
        return f"\nUser: {user_reply}\nAssistant:"

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
    def simulate_user(self, states: list[DialogState], replies: list[str], generator: torch.Generator | None = None) -> list[str]:
        """The simulated user's next message for each (state, assistant reply)."""
        e = self.cfg.env
        if self._user is not None:
            user, use_ref = self._user, False
        else:
            if self.model is None:
                raise UserError("env.user_model 'reference' needs the policy model", "pass the model to DialogEnv")
            user, use_ref = self.model, True
        tok = user.tokenizer
        texts = [self.user_prompt(s, r, tok) for s, r in zip(states, replies)]
        ids, mask, _ = encode_prompts(tok, texts, e.user_max_prompt_tokens, user.device)
        self._check_length(user, ids.shape[1], e.user_generation.max_new_tokens, "the user simulator's prompt")
        out, _, amask, _, _, ended = sample(
            user, ids, mask, e.user_generation, generator=generator, with_values=False, use_reference=use_ref
        )
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
    ) -> DialogTurns:
        """One assistant turn for a batch of episodes: the user answers, the turn is scored."""
        t0 = time.perf_counter()
        users = self.simulate_user(states, replies, generator)
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

    # ------------------------------------------------------------------ batched rollout
    @staticmethod
    def _check_length(model: PolicyValueModel, prompt_len: int, new: int, what: str) -> None:
        limit = getattr(model.lm.config.get_text_config(), "max_position_embeddings", None)
        if limit and prompt_len + new > limit:
            raise UserError(
                f"{what} reaches {prompt_len + new} tokens, past the model's {limit} positions",
                "lower env.turns, generation.max_new_tokens or env.user_generation.max_new_tokens",
            )

    @torch.no_grad()
    def rollout(
        self,
        model: PolicyValueModel,
        rows: list[dict],
        group: list[int],
        *,
        generator: torch.Generator | None = None,
        training: bool = False,
        use_reference: bool = False,
        with_values: bool = True,
    ) -> tuple[Batch, int, dict]:
        """`env.turns` assistant turns per row; returns (batch, n_truncated_prompts, metrics).

        `use_reference` samples the assistant from the reference policy (eval's base side).
        """
        cfg, tok = self.cfg, model.tokenizer
        K, gen = cfg.env.turns, cfg.generation
        dev = model.device
        states = [self.reset(r) for r in rows]
        p_ids, p_mask, truncated = encode_prompts(tok, [self.render(s) for s in states], cfg.model.max_prompt_tokens, dev)
        B, P = p_ids.shape
        ctx = [p_ids[i, p_mask[i].bool()].tolist() for i in range(B)]  # each episode's tokens so far
        region = [[] for _ in range(B)]  # tokens after the first prompt
        act, lps, vals, tids = ([[] for _ in range(B)] for _ in range(4))
        ends: list[list[int]] = [[] for _ in range(B)]  # region index of each turn's last token
        turn_terms: list[dict[str, list[float]]] = []
        turn_scores: list[list[float]] = []
        turn_ended: list[list[bool]] = []
        users_all: list[list[str]] = []
        t_user = t_reward = 0.0
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        for k in range(K):
            width = max(len(c) for c in ctx)
            self._check_length(model, width, gen.max_new_tokens, f"assistant turn {k + 1}'s context")
            ids = torch.full((B, width), pad, dtype=torch.long)
            mask = torch.zeros((B, width), dtype=torch.long)
            for i, c in enumerate(ctx):
                ids[i, width - len(c) :] = torch.tensor(c, dtype=torch.long)
                mask[i, width - len(c) :] = 1
            out, _, amask, logp, values, ended = sample(
                model, ids.to(dev), mask.to(dev), gen, generator=generator, with_values=with_values, use_reference=use_reference
            )
            replies = decode_completions(tok, out, amask, ended)
            n_tok = amask.sum(-1).long().tolist()
            for i in range(B):
                n = n_tok[i]
                toks = out[i, width : width + n].tolist()
                region[i] += toks
                ctx[i] += toks
                act[i] += [1.0] * n
                lps[i] += logp[i, :n].tolist()
                vals[i] += values[i, :n].tolist() if values is not None else [0.0] * n
                tids[i] += [k] * n
                ends[i].append(len(region[i]) - 1)
            res = self.step_batch(states, replies, ended.tolist(), training=training, generator=generator)
            t_user += self.last_timing["user"]
            t_reward += self.last_timing["reward"]
            turn_terms.append(res.scored.terms)
            turn_scores.append(res.scored.scores)
            turn_ended.append(ended.tolist())
            users_all.append(res.user_replies)
            if k < K - 1:  # the user's message (and template) before the next assistant turn
                for i in range(B):
                    last = int(out[i, width + n_tok[i] - 1]) if bool(ended[i]) and n_tok[i] else None
                    glue = tok(self.glue_text(states[i], res.user_replies[i], last), add_special_tokens=False)["input_ids"]
                    region[i] += glue
                    ctx[i] += glue
                    act[i] += [0.0] * len(glue)
                    lps[i] += [0.0] * len(glue)
                    vals[i] += [0.0] * len(glue)
                    tids[i] += [-1] * len(glue)
            states = res.next_states

        T = max(len(r) for r in region)
        input_ids = torch.full((B, P + T), pad, dtype=torch.long)
        attn = torch.zeros((B, P + T), dtype=torch.long)
        input_ids[:, :P], attn[:, :P] = p_ids.cpu(), p_mask.cpu()
        action_mask = torch.zeros((B, T))
        logprobs = torch.zeros((B, T))
        value_t = torch.zeros((B, T))
        turn_ids = torch.full((B, T), -1, dtype=torch.long)
        scores_t = torch.zeros((B, T))
        for i in range(B):
            n = len(region[i])
            input_ids[i, P : P + n] = torch.tensor(region[i], dtype=torch.long)
            attn[i, P : P + n] = 1
            action_mask[i, :n] = torch.tensor(act[i])
            logprobs[i, :n] = torch.tensor(lps[i])
            value_t[i, :n] = torch.tensor(vals[i])
            turn_ids[i, :n] = torch.tensor(tids[i])
            for k, pos in enumerate(ends[i]):
                scores_t[i, pos] = turn_scores[k][i]
        names = list(turn_terms[0])
        transcripts = [
            self.transcript(states[i], [ts[i] for ts in turn_scores], [{n_: tt[n_][i] for n_ in names} for tt in turn_terms])
            for i in range(B)
        ]
        extra_keys = sorted({k for r in rows for k in r if k != cfg.data.prompt_field})
        batch = Batch(
            input_ids=input_ids.to(dev),
            attention_mask=attn.to(dev),
            action_mask=action_mask.to(dev),
            logprobs=logprobs.to(dev),
            values=value_t.to(dev) if with_values and model.value_head is not None else None,
            prompts=[str(r[cfg.data.prompt_field]) for r in rows],
            completions=[format_transcript(t) for t in transcripts],
            group=torch.tensor(group, dtype=torch.long, device=dev),
            ended=torch.tensor([all(e[i] for e in turn_ended) for i in range(B)], device=dev),
            extras={**{k: [r.get(k) for r in rows] for k in extra_keys}, "transcript": transcripts},
            turn_ids=turn_ids.to(dev),
            turn_scores=scores_t.to(dev),
        )
        # Episode totals (undiscounted): the score is the sum of the turn scores, each term the sum of its raw values.
        batch.scores = torch.tensor([sum(ts[i] for ts in turn_scores) for i in range(B)], dtype=torch.float32, device=dev)
        batch.reward_terms = {
            n_: torch.tensor([sum(tt[n_][i] for tt in turn_terms) for i in range(B)], dtype=torch.float32) for n_ in names
        }
        flat_ended = [e for es in turn_ended for e in es]
        info = {
            **{f"reward/turn_{k + 1}": sum(turn_scores[k]) / B for k in range(K)},
            "dialog/turn_eos_rate": sum(flat_ended) / len(flat_ended),
            "dialog/assistant_tokens_per_turn": float(action_mask.sum()) / (B * K),
            "dialog/user_words": sum(len(u.split()) for us in users_all for u in us) / (B * K),
            "time/user": t_user,
            "time/reward": t_reward,
        }
        return batch, truncated, info

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


def format_transcript(turns: list[dict]) -> str:
    return "\n".join(f"{t['role']}: {t['content']}" for t in turns)


# ----------------------------------------------------------------------------- eval


@torch.no_grad()
def evaluate_dialog_side(model: PolicyValueModel, env: DialogEnv, rows: list[dict], cfg: Config, *, use_reference: bool) -> dict:
    """Dialog episodes on `rows` with the policy (or the reference as the assistant), scored."""
    from ..metrics import self_bleu
    from ..rewards import text as lex

    e = cfg.eval
    gen = torch.Generator(device=model.device).manual_seed(e.seed)
    rows = [r for r in rows for _ in range(e.samples_per_prompt)]
    temp = cfg.generation.temperature
    totals, terms, per_turn, kl, samples = [], defaultdict(list), defaultdict(list), [], []
    ref_nll, n_tok, replies, lengths, eos, user_words = 0.0, 0.0, [], [], [], []
    t0 = time.perf_counter()
    for s in range(0, len(rows), e.batch_size):
        chunk = rows[s : s + e.batch_size]
        batch, _, info = env.rollout(
            model, chunk, list(range(len(chunk))), generator=gen, use_reference=use_reference, with_values=False
        )
        m, T = batch.action_mask, batch.n_actions
        ref_lp = model.reference_logprobs(batch.input_ids, batch.attention_mask, T, temp)
        pol_lp = ref_lp if use_reference or model.is_reference else batch.logprobs
        kl += ((pol_lp - ref_lp) * m).sum(-1).tolist()
        ref_lp1 = ref_lp if temp == 1.0 else model.reference_logprobs(batch.input_ids, batch.attention_mask, T, 1.0)
        ref_nll += float(-(ref_lp1 * m).sum())
        n_tok += float(m.sum())
        totals += batch.scores.tolist()
        for k, v in batch.reward_terms.items():
            terms[k] += v.tolist()
        for k, v in info.items():
            if k.startswith("reward/turn_"):
                per_turn[k].append((v, len(chunk)))
        eos.append((info["dialog/turn_eos_rate"], len(chunk)))
        user_words.append((info["dialog/user_words"], len(chunk)))
        for i, tr in enumerate(batch.extras["transcript"]):
            a_turns = [t for t in tr if t["role"] == "assistant"]
            replies += [t["content"] for t in a_turns]
            samples.append(
                {
                    "prompt": batch.prompts[i],
                    "completion": batch.completions[i],
                    "reward": float(batch.scores[i]),
                    "persona": chunk[i].get("persona"),
                    "goal": chunk[i].get("goal"),
                    "turns": tr,
                }
            )
        for i in range(len(chunk)):
            ids = batch.turn_ids[i][m[i] > 0]
            lengths += torch.bincount(ids, minlength=cfg.env.turns).tolist()
    secs = time.perf_counter() - t0
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    wmean = lambda pairs: sum(v * n for v, n in pairs) / max(sum(n for _, n in pairs), 1)  # noqa: E731
    return {
        "planner": "sample",
        "reward": mean(totals),  # mean total (undiscounted) turn reward per episode
        "reward_std": float(torch.tensor(totals).std()) if len(totals) > 1 else 0.0,
        **{f"reward/{k}": mean(v) for k, v in terms.items()},  # each term: its per-episode total, averaged
        **{k: wmean(v) for k, v in per_turn.items()},  # the mean score of turn k
        "kl": mean(kl),
        "perplexity_ref": float(torch.exp(torch.tensor(ref_nll / max(n_tok, 1.0)))),
        "distinct1": lex.distinct_n_corpus(replies, 1),
        "distinct2": lex.distinct_n_corpus(replies, 2),
        "self_bleu": self_bleu(replies),
        "mean_length": mean(lengths),  # assistant tokens per turn
        "eos_rate": wmean(eos),  # share of assistant turns that ended at EOS
        "user_words": wmean(user_words),
        "n": len(totals),
        "turns": cfg.env.turns,
        "seconds_per_sample": secs / max(len(totals), 1),
        "samples": samples,
    }


def evaluate_dialog(
    model: PolicyValueModel, rows: list[dict], cfg: Config, *, base: bool = True, trained: bool = True, planner: str | None = None
) -> dict:
    """evaluate.evaluate for `env.kind: dialog`: base (the reference as the assistant) and/or trained."""
    name = planner or cfg.planner.name
    if name not in ("sample", "best-of-n"):
        raise UserError(
            f"planner '{name}' is not available for dialogs", "use planner 'sample' or 'best-of-n' with env.kind: dialog"
        )
    from ..evaluate import limit_rows

    env = DialogEnv(cfg, model)
    rows = limit_rows(rows, cfg)
    out: dict = {"n_prompts": len(rows)}
    if name == "best-of-n":  # turn-level lookahead through the user simulator (planning/dialog.py)
        out["trained"] = _planned_side(model, env, rows, cfg)
        return out
    if base:
        out["base"] = evaluate_dialog_side(model, env, rows, cfg, use_reference=True)
    if trained:
        out["trained"] = evaluate_dialog_side(model, env, rows, cfg, use_reference=False)
    if base and trained:
        out["delta_reward"] = out["trained"]["reward"] - out["base"]["reward"]
    return out


def _planned_side(model: PolicyValueModel, env: DialogEnv, rows: list[dict], cfg: Config) -> dict:
    from ..planning.dialog import plan_dialog
    from ..rewards import text as lex

    gen = torch.Generator(device=model.device).manual_seed(cfg.eval.seed)
    t0 = time.perf_counter()
    res = plan_dialog(model, env, rows, cfg.planner.n, generator=gen)
    secs = time.perf_counter() - t0
    replies = [t["content"] for tr in res.transcripts for t in tr if t["role"] == "assistant"]
    return {
        "planner": "best-of-n",
        "reward": sum(res.totals) / len(res.totals),
        "distinct1": lex.distinct_n_corpus(replies, 1),
        "distinct2": lex.distinct_n_corpus(replies, 2),
        "n": len(res.totals),
        "turns": cfg.env.turns,
        "reward_calls": res.reward_calls,
        "seconds_per_sample": secs / max(len(res.totals), 1),
        "samples": [
            {"prompt": str(r[cfg.data.prompt_field]), "completion": tr[-2]["content"] if len(tr) > 1 else "", "reward": tot, "turns": tr}
            for r, tr, tot in zip(rows, res.transcripts, res.totals)
        ],
    }


def write_transcripts(path, result: dict, n: int) -> int:
    """The first `n` eval episodes of each side as JSON lines; returns the count written."""
    import json

    from ..checkpoint import write_text_atomic

    lines = []
    for side in ("base", "trained", "model"):
        for i, s in enumerate(result.get(side, {}).get("samples", [])[:n]):
            rec = {"side": side, "episode": i, "persona": s.get("persona"), "goal": s.get("goal"), "reward": s["reward"], "turns": s["turns"]}
            lines.append(json.dumps(rec, ensure_ascii=False))
    write_text_atomic(path, "".join(line + "\n" for line in lines))
    return len(lines)
