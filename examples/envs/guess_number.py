"""Guess the number: a multi-turn text game with feedback, for `env.kind: custom`.

The environment picks a secret integer in [low, high] from the episode's seed. Each
assistant turn is a guess; the reply says "higher" or "lower" until the guess is right or
the guesses run out. Reward: 1 for finding the number, −0.05 per turn spent (a quicker
search pays more), and −0.1 more for a turn without a number in range, which gets a
reminder and counts as a guess (the small model must first learn to answer with a number).

    dynalm train -c configs/guess.yaml
"""

from __future__ import annotations

import random
import re

_INT = re.compile(r"-?\d+")


class GuessNumber:
    def __init__(self, low: int = 1, high: int = 20, max_guesses: int = 6, step_cost: float = 0.05, invalid_cost: float = 0.1):
        self.low, self.high, self.max_guesses = low, high, max_guesses
        self.step_cost, self.invalid_cost = step_cost, invalid_cost

    def reset(self, seed=None, options=None):
        self.secret = random.Random(seed).randint(self.low, self.high)
        self.guesses = 0
        prompt = (
            f"Let's play a game. I am thinking of a whole number from {self.low} to {self.high}. "
            f"Guess it: reply with just a number, like {(self.low + self.high) // 2}. After each guess I will say "
            f"higher or lower. You have {self.max_guesses} guesses."
        )
        return prompt, {"secret": self.secret}

    def step(self, action: str):
        self.guesses += 1
        m = _INT.search(action)
        left = self.max_guesses - self.guesses
        valid = m is not None and self.low <= int(m.group()) <= self.high
        if not valid:
            obs, done, won = f"Please reply with just a number from {self.low} to {self.high}.", left <= 0, False
        else:
            g = int(m.group())
            won = g == self.secret
            done = won or left <= 0
            obs = "Correct!" if won else (f"Higher. {left} guesses left." if g < self.secret else f"Lower. {left} guesses left.")
        reward = (1.0 if won else 0.0) - self.step_cost - (0.0 if valid else self.invalid_cost)
        return obs, reward, done, False, {"success": won, "guesses": self.guesses}


def make_env(**kwargs):
    return GuessNumber(**kwargs)
