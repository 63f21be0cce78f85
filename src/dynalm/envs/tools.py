"""Tool calls in assistant turns, for environments that train tool use.

The format is the one the Hermes and Qwen chat templates define, and which many tool-using
models emit: a JSON object with `name` and `arguments` inside `<tool_call>…</tool_call>`:

    <tool_call>{"name": "calculator", "arguments": {"expression": "37 - 18"}}</tool_call>

An environment parses the call from the action with `parse_tool_call`, runs the tool, and
returns its result as a `tool` message (`tool_result`), which the rollout renders through
the model's chat template like any other observation. SmolLM2's template renders any role,
`tool` included; a template without tool support renders it as plain text.
"""

from __future__ import annotations

import json
import re

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def parse_tool_call(text: str) -> dict | None:
    """The first tool call in `text` as {"name": str, "arguments": dict}, or None when there
    is none or it is not valid JSON of that shape (a missing closing tag is forgiven: a turn
    may stop at its token limit or at the stop token right after the JSON)."""
    m = _CALL.search(text)
    if not m:
        return None
    body = m.group(1).strip()
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        end = body.rfind("}")  # trailing text after the object
        try:
            call = json.loads(body[: end + 1]) if end >= 0 else None
        except json.JSONDecodeError:
            return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    args = call.get("arguments", {})
    if isinstance(args, str):  # some models emit the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return {"name": call["name"], "arguments": args if isinstance(args, dict) else {}}


def tool_result(content) -> list[dict]:
    """An observation holding a tool's result."""
    return [{"role": "tool", "content": str(content)}]
