"""Arithmetic word problems with a calculator tool, for `env.kind: custom`.

Each episode is one problem (from the seed). The assistant may call the calculator with

    <tool_call>{"name": "calculator", "arguments": {"expression": "37 - 18"}}</tool_call>

and gets the result back as a `tool` message; any other turn is its final answer, scored
1 when its last number equals the answer (and `success`), 0.1 when it is a wrong number
written as "Answer: N" (the format the prompt asks for), else 0. A turn that calls the
tool costs nothing; a malformed call gets an error message as the tool's result.

    dynalm train -c configs/calculator.yaml
"""

from __future__ import annotations

import ast
import operator
import random
import re

from dynalm.envs.tools import parse_tool_call, tool_result

_NUM = re.compile(r"-?\d+(?:\.\d+)?")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv, ast.USub: operator.neg}

TEMPLATES = [
    ("A farmer had {a} sheep and bought {b} more. How many sheep does the farmer have now?", lambda a, b: a + b),
    ("A shop had {a} apples and sold {b} of them. How many apples are left?", lambda a, b: a - b),
    ("Each box holds {b} pens. How many pens are in {a} boxes?", lambda a, b: a * b),
    ("A class of {a} children is joined by {b} more. How many children are in the class?", lambda a, b: a + b),
    ("A train carried {a} people and {b} got off. How many people are still on the train?", lambda a, b: a - b),
]


def calculate(expression: str) -> float:
    """+, −, ×, ÷ and parentheses on numbers; anything else raises ValueError."""

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError("only numbers and + - * / ( ) are allowed")

    return ev(ast.parse(expression, mode="eval"))


class Calculator:
    def __init__(self, max_calls: int = 2):
        self.max_calls = max_calls

    def reset(self, seed=None, options=None):
        rng = random.Random(seed)
        text, fn = rng.choice(TEMPLATES)
        a, b = rng.randint(12, 99), rng.randint(2, 11)
        self.answer = fn(a, b)
        self.calls = 0
        prompt = (
            f"{text.format(a=a, b=b)}\n"
            'You may use a calculator: write <tool_call>{"name": "calculator", "arguments": {"expression": "2 + 3"}}</tool_call> '
            "and you will get the result. When you know the answer, reply with 'Answer: ' and the number."
        )
        return prompt, {"answer": self.answer}

    def step(self, action: str):
        call = parse_tool_call(action)
        if call is not None and self.calls < self.max_calls:
            self.calls += 1
            if call["name"] != "calculator":
                return tool_result(f"error: unknown tool '{call['name']}'"), 0.0, False, False, {"tool_calls": self.calls}
            try:
                value = calculate(str(call["arguments"].get("expression", "")))
                result = int(value) if float(value).is_integer() else round(value, 6)
            except (ValueError, SyntaxError, ZeroDivisionError, TypeError) as exc:
                result = f"error: {exc}"
            return tool_result(result), 0.0, False, False, {"tool_calls": self.calls}
        nums = _NUM.findall(action.split("Answer:")[-1])
        right = bool(nums) and float(nums[-1]) == float(self.answer)
        formatted = "Answer:" in action and bool(nums)
        reward = 1.0 if right else (0.1 if formatted else 0.0)
        return "", reward, True, False, {"success": right, "tool_calls": self.calls}


def make_env(**kwargs):
    return Calculator(**kwargs)
