"""Structured output: constraints (``spec``), their compilation off the step loop
(``compiler``), per-sequence matching and batched masking (``matcher``), tool calls (``tools``)
and the mapping from an OpenAI request (``requests``). See docs/engine-internals.md."""

from headway.runtime.llm.grammar.compiler import Grammar, GrammarCompiler
from headway.runtime.llm.grammar.matcher import GrammarMasker, GrammarState, allocate_bitmask, apply_bitmask
from headway.runtime.llm.grammar.requests import constraint_for
from headway.runtime.llm.grammar.spec import GrammarError, GrammarSpec
from headway.runtime.llm.grammar.tools import ToolCallParser

__all__ = ["Grammar", "GrammarCompiler", "GrammarError", "GrammarMasker", "GrammarSpec", "GrammarState",
           "ToolCallParser", "allocate_bitmask", "apply_bitmask", "constraint_for"]
