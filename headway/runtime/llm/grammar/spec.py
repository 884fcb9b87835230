"""What a request asks its output to follow: a ``GrammarSpec`` (kind + source), pure data.

Owns the canonical form of a constraint, which is also its cache key: a JSON schema is keyed by
its compact JSON (no spaces; key order kept, since the order of ``properties`` is the order
the output is generated in), so requests that send the same schema share one compiled
grammar whatever their formatting. Nothing here imports xgrammar.

Kinds:
  ``json_object``  any JSON object (OpenAI ``response_format: {"type": "json_object"}``)
  ``json_schema``  a JSON schema; ``strict`` forbids properties the schema does not name
  ``regex``        a regular expression the whole output must match
  ``ebnf``         an EBNF grammar (xgrammar / GBNF dialect) with a ``root`` rule
  ``structural_tag`` an xgrammar structural tag (built by ``tools.py`` for tool calls)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["json_object", "json_schema", "regex", "ebnf", "structural_tag"]
KINDS: tuple[str, ...] = ("json_object", "json_schema", "regex", "ebnf", "structural_tag")


class GrammarError(ValueError):
    """A constraint that cannot be compiled; ``param`` names the request field it came from."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


def canonical_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class GrammarSpec:
    """One constraint. ``source`` is the canonical text (schema JSON, regex, EBNF, tag JSON);
    ``param`` is the request field it came from (error messages only, not part of the key)."""

    kind: Kind
    source: str = ""
    strict: bool = True
    param: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GrammarError(f"unknown grammar kind {self.kind!r}; allowed: {', '.join(KINDS)}", self.param)

    @property
    def key(self) -> tuple[str, str, bool]:
        return (self.kind, self.source, self.strict if self.kind == "json_schema" else True)

    @classmethod
    def json_object(cls, param: str | None = "response_format") -> GrammarSpec:
        return cls("json_object", "", True, param)

    @classmethod
    def json_schema(cls, schema: Any, *, strict: bool = True, param: str | None = None) -> GrammarSpec:
        if schema is False:
            raise GrammarError("a schema of false allows no output at all", param)
        if schema is True:
            schema = {}
        if not isinstance(schema, dict):
            raise GrammarError(f"a JSON schema must be a JSON object, got {type(schema).__name__}", param)
        from headway.runtime.llm.grammar.schema_check import checked_schema

        return cls("json_schema", canonical_json(checked_schema(schema, param)), bool(strict), param)

    @classmethod
    def regex(cls, pattern: object, param: str | None = None) -> GrammarSpec:  # (request JSON: checked here)
        if not isinstance(pattern, str) or not pattern:
            raise GrammarError("a regex must be a non-empty string", param)
        return cls("regex", pattern, True, param)

    @classmethod
    def ebnf(cls, grammar: object, param: str | None = None) -> GrammarSpec:  # (request JSON: checked here)
        if not isinstance(grammar, str) or not grammar.strip():
            raise GrammarError("a grammar must be a non-empty EBNF string with a 'root' rule", param)
        return cls("ebnf", grammar, True, param)

    @classmethod
    def structural_tag(cls, tag: dict[str, Any], param: str | None = None) -> GrammarSpec:
        return cls("structural_tag", canonical_json(tag), True, param)
