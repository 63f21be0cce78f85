"""Evaluation metrics that are not rewards: Self-BLEU, corpus chrF/BLEU/TER, reward-hacking flags.

* `self_bleu(texts)` — diversity of a set of samples (Zhu et al., 2018, Texygen): the mean over
  texts of the sentence BLEU of each text against all the other texts as references, / 100.
  Higher means the samples look more alike (1.0 = identical texts); lower is more diverse.
* `corpus_chrf/corpus_bleu/corpus_ter(hyps, refs)` — sacrebleu's own corpus-level scores, on
  sacrebleu's scale (0..100; TER is the plain TER, lower is better — unlike the `ter` reward).
* `reward_hacking_flags(base, trained)` — plain-English warnings from two eval summaries.
"""

from __future__ import annotations

import math
from typing import Sequence


def self_bleu(texts: Sequence[str]) -> float:
    """Self-BLEU in 0..1: mean over texts of sacrebleu sentence BLEU (effective order) of the
    text against all the others as references, / 100. Fewer than 2 texts → 0.0 (undefined).

    Cost is quadratic in the number of texts; fine for eval sets of a few hundred samples.
    """
    from sacrebleu.metrics import BLEU

    texts = [str(t) for t in texts]
    if len(texts) < 2:
        return 0.0
    metric = BLEU(effective_order=True)
    scores = [metric.sentence_score(t, texts[:i] + texts[i + 1 :]).score for i, t in enumerate(texts)]
    return sum(scores) / len(scores) / 100.0


def _ref_streams(hyps: Sequence[str], refs: Sequence) -> list[list[str]]:
    """sacrebleu's reference streams from one reference per hypothesis (a string) or several
    (a list of strings, the same number for every hypothesis)."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    per_hyp = [[str(x) for x in r] if isinstance(r, (list, tuple)) else [str(r)] for r in refs]
    k = {len(r) for r in per_hyp}
    if len(k) > 1:
        raise ValueError("give the same number of references for every hypothesis")
    n_refs = k.pop() if k else 1
    return [[r[j] for r in per_hyp] for j in range(n_refs)]


def corpus_chrf(hyps: Sequence[str], refs: Sequence) -> float:
    """sacrebleu corpus chrF (0..100)."""
    from sacrebleu.metrics import CHRF

    return CHRF().corpus_score([str(h) for h in hyps], _ref_streams(hyps, refs)).score


def corpus_bleu(hyps: Sequence[str], refs: Sequence) -> float:
    """sacrebleu corpus BLEU (0..100), default settings."""
    from sacrebleu.metrics import BLEU

    return BLEU().corpus_score([str(h) for h in hyps], _ref_streams(hyps, refs)).score


def corpus_ter(hyps: Sequence[str], refs: Sequence) -> float:
    """sacrebleu corpus TER (edits per 100 reference words; lower is better)."""
    from sacrebleu.metrics import TER

    return TER().corpus_score([str(h) for h in hyps], _ref_streams(hyps, refs)).score


def _num(d: dict, key: str) -> float | None:
    v = d.get(key)
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def reward_hacking_flags(base: dict, trained: dict, *, kl_threshold: float = 10.0) -> list[str]:
    """Plain-English warnings that training may have gamed the reward.

    `base` and `trained` are eval summaries with keys `reward`, `distinct2`, `kl`,
    `mean_length`, `eos_rate`. Flags:

    1. reward rose while corpus distinct-2 fell by more than 0.05 (absolute) — mode collapse;
    2. the trained policy's KL to the reference is above `kl_threshold` (nats per sequence);
    3. mean length fell by more than 50% — length collapse;
    4. EOS rate fell by more than 0.2 (absolute) — the policy stopped ending its texts.

    A check whose keys are missing or not finite is skipped. Thresholds are strict ("more
    than") up to a 1e-9 tolerance, so 0.9 → 0.7 is not "more than 0.2" through float rounding.
    Returns [] when nothing is flagged.
    """
    eps = 1e-9
    flags: list[str] = []
    r0, r1 = _num(base, "reward"), _num(trained, "reward")
    d0, d1 = _num(base, "distinct2"), _num(trained, "distinct2")
    if None not in (r0, r1, d0, d1) and r1 > r0 and d0 - d1 > 0.05 + eps:
        flags.append(
            f"reward rose ({r0:.3f} → {r1:.3f}) while distinct-2 fell ({d0:.3f} → {d1:.3f}): "
            "the policy may be repeating a few high-reward phrases"
        )
    kl = _num(trained, "kl")
    if kl is not None and kl > kl_threshold + eps:
        flags.append(
            f"KL to the reference is {kl:.2f} nats, above {kl_threshold:g}: "
            "the policy has drifted far from the base model; raise kl.coef or train fewer steps"
        )
    l0, l1 = _num(base, "mean_length"), _num(trained, "mean_length")
    if l0 is not None and l1 is not None and l0 > 0 and l1 < 0.5 * l0 - eps:
        flags.append(
            f"mean length fell by more than half ({l0:.1f} → {l1:.1f}): "
            "the policy may be dodging the reward with short outputs"
        )
    e0, e1 = _num(base, "eos_rate"), _num(trained, "eos_rate")
    if e0 is not None and e1 is not None and e0 - e1 > 0.2 + eps:
        flags.append(
            f"EOS rate fell by more than 0.2 ({e0:.2f} → {e1:.2f}): "
            "the policy stops ending its texts; add the 'eos' reward with a positive weight"
        )
    return flags
