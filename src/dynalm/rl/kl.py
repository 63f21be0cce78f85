"""KL coefficient controllers: fixed β, or adaptive toward a target (Ziegler et al., 2019)."""

from __future__ import annotations


class KLController:
    """β for the KL penalty. With `target` set, β follows the proportional controller
    e = clip(KL / target − 1, −0.2, 0.2); β ← β · (1 + e · n / horizon)."""

    def __init__(self, coef: float, target: float | None = None, horizon: int = 10000):
        self.value = coef
        self.target = target
        self.horizon = horizon

    def update(self, kl: float, n_samples: int) -> None:
        if self.target is None:
            return
        err = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_samples / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]
        self.target = state["target"]
        self.horizon = state["horizon"]
