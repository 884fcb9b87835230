"""The JSON-schema keywords whose guarantee we can keep, checked before compiling.

xgrammar 0.1.27 silently ignores some keywords and gets others wrong (measured: a ``number``
in [0, 1] accepted ``1.633139``; ``exclusiveMinimum: 3`` on an integer accepted ``3``;
``multipleOf``, ``uniqueItems``, ``not``, ``allOf``, ``contains``, ``if``/``then``/``else`` had no
effect). Output that does not validate would break the promise that every constrained output
does, so such schemas are refused up front with the path of the offending keyword and what to
use instead. Integer ``exclusiveMinimum``/``exclusiveMaximum`` are rewritten to the equivalent
``minimum``/``maximum``, which xgrammar does enforce.
"""

from __future__ import annotations

import math
from typing import Any, cast

from headway.runtime.llm.grammar.spec import GrammarError

_IGNORED = {
    "multipleOf": "multipleOf is not enforced; drop it or use an enum",
    "uniqueItems": "uniqueItems is not enforced; drop it",
    "not": "'not' is not enforced; express the allowed values positively (enum, anyOf)",
    "allOf": "allOf is not enforced; merge its schemas into one",
    "contains": "contains is not enforced; drop it",
    "if": "if/then/else is not enforced; use anyOf",
}
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SUBSCHEMAS = ("items", "additionalProperties")


def checked_schema(schema: dict[str, Any], param: str | None) -> dict[str, Any]:
    """``schema`` with integer exclusive bounds rewritten; ``GrammarError`` naming the path of
    the first keyword whose constraint the grammar could not guarantee."""
    # _walk maps a dict to a dict (any other JSON value passes through unchanged)
    return cast(dict[str, Any], _walk(schema, "", param))


def _walk(node: Any, path: str, param: str | None) -> Any:
    if not isinstance(node, dict):
        return node
    where = path or "the schema root"
    for key, why in _IGNORED.items():
        if key in node:  # (a property named like a keyword sits in a properties map: not here)
            raise GrammarError(f"unsupported JSON schema keyword at {where}: {why}", param)
    out = dict(node)
    bounds = [b for b in _BOUNDS if b in node]
    if bounds:
        types = node.get("type")
        types = [types] if isinstance(types, str) else list(types or [])
        numeric = [t for t in types if t in ("number", "integer")]
        if numeric != ["integer"]:
            raise GrammarError(f"unsupported JSON schema keyword at {where}: {', '.join(bounds)} can be guaranteed only "
                               'on "type": "integer" (bounds on "number" are not enforced); use an integer (e.g. '
                               "a percentage 0..100) or drop the bound", param)
        for ex, plain, step in (("exclusiveMinimum", "minimum", 1), ("exclusiveMaximum", "maximum", -1)):
            if ex in out:
                v = out.pop(ex)
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise GrammarError(f"{ex} at {where} must be a number, got {v!r}", param)
                edge = math.floor(v) + 1 if step > 0 else math.ceil(v) - 1
                cur = out.get(plain)
                out[plain] = edge if cur is None else (max(cur, edge) if step > 0 else min(cur, edge))
    for key in _SUBSCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            out[key] = {k: _walk(v, f"{path}.{key}.{k}".lstrip("."), param) for k, v in node[key].items()}
    for key in _SUBSCHEMA_LISTS:
        if isinstance(node.get(key), list):
            out[key] = [_walk(v, f"{path}.{key}.{i}".lstrip("."), param) for i, v in enumerate(node[key])]
    for key in _SUBSCHEMAS:
        if isinstance(node.get(key), dict):
            out[key] = _walk(node[key], f"{path}.{key}".lstrip("."), param)
    return out
