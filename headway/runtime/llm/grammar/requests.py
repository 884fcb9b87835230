"""From an OpenAI request to the one constraint its output must follow (or None)."""

from __future__ import annotations

from typing import Any

from headway.runtime.llm.grammar.spec import GrammarSpec
from headway.runtime.llm.grammar.tools import tool_call_spec


def constraint_for(req: Any) -> GrammarSpec | None:
    """``req`` is a validated ``ChatCompletionRequest`` or ``CompletionRequest``; protocol has
    already ensured that at most one of tool calls, ``response_format`` and
    ``structured_outputs`` is in force. Raises ``GrammarError`` for a malformed constraint."""
    tools = getattr(req, "tools", None)
    if tools:
        choice = req.effective_tool_choice
        spec = tool_call_spec([t.model_dump(exclude_none=True) for t in tools], choice,
                              parallel=req.parallel_tool_calls)
        if spec is not None:
            return spec
    so = req.structured_outputs
    if so is not None:
        if so.json_ is not None:
            return GrammarSpec.json_schema(so.json_, strict=True, param="structured_outputs.json")
        if so.regex is not None:
            return GrammarSpec.regex(so.regex, param="structured_outputs.regex")
        return GrammarSpec.ebnf(so.grammar or "", param="structured_outputs.grammar")
    rf = req.response_format
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return GrammarSpec.json_object()
    js = rf.json_schema
    assert js is not None  # protocol checked
    return GrammarSpec.json_schema(js.schema_, strict=bool(js.strict), param="response_format.json_schema.schema")
