"""Guess the number: a multi-turn text game with feedback, for `env.kind: custom`.

The environment picks a secret integer in [low, high] from the episode's seed. Each
assistant turn is a guess; the reply says "higher" or "lower" until the guess is right or
the guesses run out. Reward: 1 for finding the number, and −0.05 per turn spent, so that a
quicker search pays more; a turn without a number gets a reminder and counts as a guess.

    dynalm train -c configs/guess.yaml
"""

from __future__ import annotations

import random
import re

_INT = re.compile(r"-?\d+")


class GuessNumber:
    def __init__(self, low: int = 1, high: int = 20, max_guesses: int = 6, step_cost: float = 0.05):
        self.low, self.high, self.max_guesses, self.step_cost = low, high, max_guesses, step_cost

    def reset(self, seed=None, options=None):
        self.secret = random.Random(seed).randint(self.low, self.high)
        self.guesses = 0
        prompt = (
            f"Let's play a game. I am thinking of a whole number from {self.low} to {self.high}. "
            f"Guess it: answer with one number only. After each guess I will say higher or lower. "
            f"You have {self.max_guesses} guesses."
        )
        return prompt, {"secret": self.secret}

    def step(self, action: str):
        self.guesses += 1
        m = _INT.search(action)
        left = self.max_guesses - self.guesses
        if m is None:
            obs, done, won = f"Please answer with one number from {self.low} to {self.high}.", left <= 0, False
        else:
            g = int(m.group())
            won = g == self.secret
            done = won or left <= 0
            obs = "Correct!" if won else (f"Higher. {left} guesses left." if g < self.secret else f"Lower. {left} guesses left.")
        reward = (1.0 if won else 0.0) - self.step_cost
        return obs, reward, done, False, {"success": won, "guesses": self.guesses}


def make_env(**kwargs):
    return GuessNumber(**kwargs)
