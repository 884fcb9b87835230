"""Tool calls: the output format, its grammar, the prompt that describes it, and the parser
that turns generated text back into OpenAI ``tool_calls`` (also incrementally, for streams).

The format is the Hermes / Qwen one, which many chat templates already teach their models::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

``tool_choice`` maps to an xgrammar structural tag over one tag per allowed function (its
``begin`` fixes the name, its content is the function's ``parameters`` schema):

- ``auto``: free text, and wherever the model writes ``<tool_call>`` the call that follows is
  constrained (a *triggered* tag). The model decides; text-only answers stay unconstrained.
- ``required``: one or more calls (only one if ``parallel_tool_calls`` is false), nothing else.
- a named function: exactly one call of that function.
- ``none``: no grammar, no tools in the prompt.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from headway.runtime.llm.grammar.schema_check import checked_schema
from headway.runtime.llm.grammar.spec import GrammarError, GrammarSpec

CALL_OPEN = "<tool_call>"
CALL_END = "}\n</tool_call>"
_HEAD = re.compile(r'<tool_call>\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:')
_MAX_HEAD = 512  # longer than any grammatical head: the text was not a call after all


def call_begin(name: str) -> str:
    return f'{CALL_OPEN}\n{{"name": {json.dumps(name)}, "arguments": '


def functions_of(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """name -> parameters schema (checked), from OpenAI ``tools`` (shape-checked by openai_types)."""
    out: dict[str, dict[str, Any]] = {}
    for i, t in enumerate(tools):
        fn = t["function"]
        name = fn["name"]
        if name in out:
            raise GrammarError(f"function name {name!r} appears twice; names must be unique",
                               f"tools.{i}.function.name")
        params = fn.get("parameters")
        out[name] = checked_schema(params, f"tools.{i}.function.parameters") if params is not None else {
            "type": "object", "properties": {}}
    return out


def tool_call_spec(tools: list[dict[str, Any]], choice: str | dict[str, Any], *, parallel: bool = True
                   ) -> GrammarSpec | None:
    """The grammar for ``tool_choice`` over ``tools`` (None for ``none``)."""
    if choice == "none" or not tools:
        return None
    fns = functions_of(tools)
    if isinstance(choice, dict):
        fns = {choice["function"]["name"]: fns[choice["function"]["name"]]}
    tags = [{"type": "tag", "begin": call_begin(name), "content": {"type": "json_schema", "json_schema": schema},
             "end": CALL_END} for name, schema in fns.items()]
    if choice == "auto":
        fmt: dict[str, Any] = {"type": "triggered_tags", "triggers": [CALL_OPEN], "tags": tags,
                               "at_least_one": False, "stop_after_first": not parallel}
    else:  # "required" or a named function
        fmt = {"type": "tags_with_separator", "tags": tags, "separator": "\n", "at_least_one": True,
               "stop_after_first": isinstance(choice, dict) or not parallel}
    return GrammarSpec.structural_tag({"type": "structural_tag", "format": fmt}, param="tools")


def tools_system_prompt(tools: list[dict[str, Any]]) -> str:
    """Tool definitions and the call format, for chat templates that do not render ``tools``."""
    defs = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("You may call one or more functions to assist with the user query. Function signatures are "
            f"within <tools></tools> XML tags:\n<tools>\n{defs}\n</tools>\n\nFor each function call, return a "
            "JSON object with the function name and arguments within <tool_call></tool_call> XML tags:\n"
            '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def render_call(name: str, arguments: str | dict[str, Any]) -> str:
    """A prior assistant tool call written back in the model's own format."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return f"{call_begin(name)}{args}{CALL_END}"


@dataclass
class ToolCallDelta:
    """New output of one tool call: ``id``/``name`` on its first delta only."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


def _held(buf: str, marker: str) -> int:
    """Length of the longest suffix of ``buf`` that is a proper prefix of ``marker``."""
    for k in range(min(len(buf), len(marker) - 1), 0, -1):
        if marker.startswith(buf[-k:]):
            return k
    return 0


@dataclass
class ToolCallParser:
    """Splits generated text into content and tool calls as it arrives (``feed``), holding back
    only what may still turn out to be a marker. ``finish`` flushes at the end. Whitespace before
    a call and after the last one (the separator between calls) is dropped once a call was seen."""

    calls: list[dict[str, str]] = field(default_factory=list)  # {"id", "name", "arguments"}
    _state: str = "text"
    _buf: str = ""
    _ws: str = ""

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        self._buf += text
        content, deltas = "", []
        while True:
            if self._state == "text":
                pos = self._buf.find(CALL_OPEN)
                cut = pos if pos >= 0 else len(self._buf) - _held(self._buf, CALL_OPEN)
                content += self._content(self._buf[:cut])
                self._buf = self._buf[cut:]
                if pos < 0:
                    break
                self._state = "head"
            elif self._state == "head":
                m = _HEAD.match(self._buf)
                if m is None:
                    if len(self._buf) > _MAX_HEAD:  # not a call: it was text
                        content += self._content(self._buf[: len(CALL_OPEN)])
                        self._buf, self._state = self._buf[len(CALL_OPEN):], "text"
                        continue
                    break
                call = {"id": "call_" + uuid.uuid4().hex[:24], "name": json.loads(m.group(1)), "arguments": ""}
                self.calls.append(call)
                deltas.append(ToolCallDelta(len(self.calls) - 1, "", call["id"], call["name"]))
                self._buf, self._state = self._buf[m.end():], "args"
            else:
                pos = self._buf.find(CALL_END)
                cut = pos if pos >= 0 else len(self._buf) - _held(self._buf, CALL_END)
                self._args(self._buf[:cut], deltas)
                if pos < 0:
                    self._buf = self._buf[cut:]
                    break
                self._buf, self._state = self._buf[pos + len(CALL_END):], "text"
        return content, deltas

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """Flush what was held back (output cut short by max_tokens ends up here)."""
        content = ""
        deltas: list[ToolCallDelta] = []
        if self._state == "args":
            self._args(self._buf, deltas)
        elif self._buf:
            content = self._content(self._buf)
        if not self.calls:
            content += self._ws
        self._buf = self._ws = ""
        return content, deltas

    def _content(self, text: str) -> str:
        """Content to emit now; trailing whitespace waits to see what follows (dropped before a
        call or at the end once there were calls), so the split of the input never matters."""
        text = self._ws + text
        body = text.rstrip()
        self._ws = text[len(body):]
        return body

    def _args(self, text: str, deltas: list[ToolCallDelta]) -> None:
        if not self.calls[-1]["arguments"]:
            text = text.lstrip()  # the space after "arguments": is not part of them
        if text:
            self.calls[-1]["arguments"] += text
            deltas.append(ToolCallDelta(len(self.calls) - 1, text))


def chat_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, *,
                  template_renders_tools: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Messages (``role``, ``content`` text, optional ``tool_calls`` / ``tool_call_id``) and the
    ``tools`` argument for the chat template. A template that renders tools (it mentions
    ``tools``) gets them as Hugging Face expects (call arguments as objects); for one that does
    not, the definitions go into the system message, prior calls are written back in the
    ``<tool_call>`` format and tool results become ``<tool_response>`` user turns."""
    if template_renders_tools:
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": _as_object(c["function"])}}
                                   for c in m["tool_calls"]]
            out.append(m)
        return out, tools or None
    out = []
    for m in messages:
        if m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        elif m.get("tool_calls"):
            calls = "\n".join(render_call(c["function"]["name"], c["function"].get("arguments", "{}"))
                              for c in m["tool_calls"])
            text = m["content"] or ""
            out.append({"role": "assistant", "content": f"{text}\n{calls}" if text else calls})
        else:
            out.append({k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")})
    if tools:
        prompt = tools_system_prompt(tools)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, None


def _as_object(fn: dict[str, Any]) -> Any:
    args = fn.get("arguments", "{}")
    if isinstance(args, str):
        try:
            return json.loads(args)
        except json.JSONDecodeError:
            return args
    return args
