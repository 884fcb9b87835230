"""Structured output and tool calls: the grammar parts on their own (spec keys, the compiler's
cache and errors, the matcher's draft/rollback interface, the tool-call parser), then through
a real server with the official `openai` client — tinycoder-test (random weights: a grammar
must still force valid output) for plumbing, SmolLM2 for what a user sees."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import jsonschema
import openai
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from openai import OpenAI

from headway.library import resolve
from headway.runtime.llm.grammar import (GrammarCompiler, GrammarError, GrammarSpec, GrammarState, ToolCallParser,
                                         allocate_bitmask, apply_bitmask)
from headway.runtime.llm.grammar.tools import CALL_END, call_begin, chat_messages, render_call, tool_call_spec
from headway.tokenization import ModelTokenizer
from tests.conftest import running_server

SMOL = "smollm2-135m-instruct"
TINY = "tinycoder-test"

# A varied set: every output must parse and validate against its schema.
SCHEMAS: dict[str, dict] = {
    "nested_enum": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 24},
        "address": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 24},
            "country": {"enum": ["FR", "DE", "US", "JP"]}}, "required": ["city", "country"]}},
        "required": ["name", "address"]},
    "array_bounds": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 2, "maxItems": 3}},
        "required": ["tags"]},
    "numbers": {"type": "object", "properties": {
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "score": {"type": "number"},
        "count": {"type": "integer", "minimum": -5, "maximum": 5}}, "required": ["age", "score", "count"]},
    "nullable_anyof": {"type": "object", "properties": {
        "nickname": {"type": ["string", "null"], "maxLength": 16},
        "id": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 1000}, {"type": "string", "pattern": "^[A-Z]{3}$"}]},
        "ok": {"type": "boolean"}}, "required": ["nickname", "id", "ok"]},
    "pattern_optional": {"type": "object", "properties": {
        "sku": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{4}$"},
        "note": {"type": "string", "maxLength": 20}}, "required": ["sku"], "additionalProperties": False},
}


def client(server) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def grammar_state(server) -> dict:
    return httpx.get(f"{server.url}/headway/state").json()["grammar"]


def rf(schema: dict, strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": strict}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    with running_server(["serve", TINY, "--threads", "1"], tmp_path_factory.mktemp("tiny")) as s:
        yield s


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    with running_server(["serve", SMOL], tmp_path_factory.mktemp("smol"), timeout=300) as s:
        yield s


@pytest.fixture(scope="module")
def compiler() -> GrammarCompiler:
    tok = ModelTokenizer(resolve(TINY).path)
    gc = GrammarCompiler(tok.tokenizer, vocab_size=32000, stop_token_ids=[2])
    yield gc
    gc.shutdown()


class Held:
    """Whether a text is a prefix the grammar of a spec accepts, for one model's tokenizer: what
    holds of an output that `max_tokens` cut (finish_reason "length") on every machine, where
    the text itself depends on a greedy near-tie or on sampling numerics."""

    def __init__(self, model: str):
        path = resolve(model).path
        self.tok = ModelTokenizer(path)
        vocab = json.loads((path / "config.json").read_text())["vocab_size"]
        self.gc = GrammarCompiler(self.tok.tokenizer, vocab_size=vocab, stop_token_ids=[])

    def __call__(self, spec: GrammarSpec, text: str) -> bool:
        state = GrammarState(self.gc.submit(spec).result(timeout=120))
        return all(state.accept(t) for t in self.tok.tokenizer.encode(text, add_special_tokens=False).ids)


@pytest.fixture(scope="module")
def tiny_held():
    held = Held(TINY)
    yield held
    held.gc.shutdown()


@pytest.fixture(scope="module")
def smol_held():
    held = Held(SMOL)
    yield held
    held.gc.shutdown()


def check_json(held: Held, spec: GrammarSpec, schema: dict | None, text: str, finish_reason: str) -> None:
    """A constrained JSON output: complete, it parses (and validates); cut by max_tokens, what
    came is a prefix the grammar accepts."""
    if finish_reason == "length":
        assert held(spec, text), f"a cut output the grammar does not accept: {text!r}"
        return
    assert finish_reason == "stop", (finish_reason, text)
    value = json.loads(text)
    if schema is None:
        assert isinstance(value, dict), text
    else:
        jsonschema.validate(value, schema)


def raw_calls(content: str | None, calls: list[tuple[str, str]]) -> str:
    """The generated text back from a cut answer's content and (name, arguments) of its calls."""
    ends = [CALL_END + "\n"] * (len(calls) - 1) + [""]
    return (content or "") + "".join(call_begin(name) + args + end for (name, args), end in zip(calls, ends))


def check_tool_choice(held: Held, spec: GrammarSpec, choice, message, finish_reason: str,
                      names: set[str]) -> None:
    """A forced tool call (required / named, no parallel calls): finished, exactly one call of an
    allowed name whose arguments parse and validate; cut by max_tokens, the call so far is a
    prefix the grammar accepts. Which function and which arguments a greedy near-tie picks is
    the machine's, not the test's."""
    calls = message.tool_calls or []
    if finish_reason == "length":
        raw = raw_calls(message.content, [(c.function.name, c.function.arguments) for c in calls])
        assert held(spec, raw), f"a cut tool call the grammar does not accept: {raw!r}"
        return
    assert finish_reason == "tool_calls" and len(calls) == 1, (finish_reason, message)
    call = calls[0]
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in names, call
    if isinstance(choice, dict):
        assert call.function.name == choice["function"]["name"]
    jsonschema.validate(json.loads(call.function.arguments), _params(call.function.name))


# ---- the parts ---------------------------------------------------------------------------------

def test_spec_keys_and_bad_specs() -> None:
    a = GrammarSpec.json_schema(json.loads('{"type": "object", "properties": {"a": {"type": "integer"}}}'))
    b = GrammarSpec.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}}, param="x")
    assert a.key == b.key  # formatting and the field name do not matter
    assert GrammarSpec.json_schema({"properties": {"a": {}, "b": {}}}).key != \
        GrammarSpec.json_schema({"properties": {"b": {}, "a": {}}}).key  # property order is output order
    assert a.key != GrammarSpec.json_schema(json.loads(a.source), strict=False).key
    assert GrammarSpec.regex("a+").key != GrammarSpec.ebnf("a+").key
    with pytest.raises(GrammarError, match="must be a JSON object"):
        GrammarSpec.json_schema([1, 2], param="response_format")
    with pytest.raises(GrammarError, match="non-empty"):
        GrammarSpec.regex("")


def test_compiler_caches_by_key_and_reports_errors(compiler: GrammarCompiler) -> None:
    before = compiler.stats()
    spec = GrammarSpec.json_schema(SCHEMAS["numbers"])
    futs = [compiler.submit(spec) for _ in range(3)]  # the 2nd and 3rd share the first's compile
    grammars = {id(f.result(timeout=60)) for f in futs}
    after = compiler.stats()
    assert len(grammars) == 1
    assert after["compiles"] - before["compiles"] == 1 and after["cache_hits"] - before["cache_hits"] == 2
    bad = [(GrammarSpec.json_schema({"type": "object", "properties": {"a": {"type": "nonsense"}}}),
            'Unsupported type "nonsense"'),
           (GrammarSpec.regex("[a-", param="structured_outputs.regex"), "Unclosed '\\['"),
           (GrammarSpec.ebnf("root ::= foo", param="structured_outputs.grammar"), 'Rule "foo" is not defined')]
    for spec, msg in bad:
        for _ in range(2):  # a failure is never cached: reported every time
            with pytest.raises(GrammarError, match=msg) as err:
                compiler.submit(spec).result(timeout=60)
            assert err.value.param == spec.param and ".cc:" not in err.value.message
    assert compiler.stats()["errors"] - after["errors"] == 6


def test_matcher_masks_accepts_and_rolls_back_drafts(compiler: GrammarCompiler) -> None:
    tok = ModelTokenizer(resolve(TINY).path)
    g = compiler.submit(GrammarSpec.regex("(ab|cd)+x")).result(timeout=60)
    st_ = GrammarState(g)
    ids = [tok.tokenizer.token_to_id(t) for t in ("ab", "cd", "x")]  # no leading-space pieces
    mask = allocate_bitmask(len(ids) + 1, 32000)
    assert st_.fill_draft(ids, mask, first_row=0) == len(ids) and st_.num_accepted == 0  # state restored
    logits = torch.zeros(len(ids) + 1, 32000)
    apply_bitmask(logits, mask, list(range(len(ids) + 1)))
    for i, t in enumerate(ids):  # each position allows its draft token, and not everything
        assert logits[i, t] == 0 and torch.isinf(logits[i]).any()
    assert set(torch.nonzero(logits[len(ids)] == 0).flatten().tolist()) == {2}  # complete: only EOS
    for t in ids:
        assert st_.accept(t)
    assert not st_.is_terminated and st_.accept(2) and st_.is_terminated
    st_.rollback(2)  # the verifier's undo of the last two tokens (x, EOS)
    assert st_.num_accepted == len(ids) - 1 and not st_.is_terminated
    bad = [tok.tokenizer.token_to_id(t) for t in ("ab", "q")]
    st2 = GrammarState(g)
    assert st2.fill_draft(bad, allocate_bitmask(4, 32000), 0) < len(bad) and st2.num_accepted == 0
    with pytest.raises(ValueError, match="only 0 tokens"):
        st2.rollback(1)


CALLS_TEXT = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "n": [1, {"a": "}"}]}}\n'
              '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n')


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(CALLS_TEXT)), max_size=12))
def test_tool_call_parser_is_split_independent(cuts: list[int]) -> None:
    pieces, last = [], 0
    for c in sorted(set(cuts)) + [len(CALLS_TEXT)]:
        pieces.append(CALLS_TEXT[last:c])
        last = c
    p = ToolCallParser()
    content, args = "", {}
    for piece in pieces:
        text, deltas = p.feed(piece)
        content += text
        for d in deltas:
            args[d.index] = args.get(d.index, "") + d.arguments
    text, deltas = p.finish()
    content += text
    for d in deltas:
        args[d.index] += d.arguments
    assert content == "Let me check."
    assert [c["name"] for c in p.calls] == ["get_weather", "get_time"]
    assert json.loads(args[0]) == {"city": "Paris", "n": [1, {"a": "}"}]} and json.loads(args[1]) == {}
    assert [c["arguments"] for c in p.calls] == [args[0], args[1]]


def test_tool_messages_render_for_templates_without_tools() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]},
            {"role": "tool", "content": "42", "tool_call_id": "c1"}]
    out, tools_arg = chat_messages(msgs, tools, template_renders_tools=False)
    assert tools_arg is None and out[0]["role"] == "system" and '"name": "f"' in out[0]["content"]
    assert out[2] == {"role": "assistant", "content": render_call("f", '{"x": 1}')}
    assert out[3] == {"role": "user", "content": "<tool_response>\n42\n</tool_response>"}
    native, native_tools = chat_messages(msgs, tools, template_renders_tools=True)
    assert native_tools == tools and native[1]["tool_calls"][0]["function"]["arguments"] == {"x": 1}


# ---- through a real server: tinycoder-test (random weights) --------------------------------------

def test_random_model_output_validates_under_each_schema(tiny, tiny_held) -> None:
    c = client(tiny)
    for schema in SCHEMAS.values():
        for seed in (1, 2):
            r = c.completions.create(model=TINY, prompt="{", max_tokens=400, temperature=1.0, seed=seed,
                                     extra_body={"response_format": rf(schema)})
            ch = r.choices[0]
            check_json(tiny_held, GrammarSpec.json_schema(schema), schema, ch.text, ch.finish_reason)


def test_regex_ebnf_json_object_and_n(tiny, tiny_held) -> None:
    c = client(tiny)
    r = c.completions.create(model=TINY, prompt="x", max_tokens=50, temperature=1.0, seed=3, n=3,
                             extra_body={"structured_outputs": {"regex": r"[0-9]{3}-[a-z]{2,4}"}})
    assert len(r.choices) == 3
    for ch in r.choices:
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", ch.text) and ch.finish_reason == "stop", ch.text
    ebnf = 'root ::= "(" expr ")"\nexpr ::= num | num "+" num\nnum ::= [1-9] [0-9]?'
    r = c.completions.create(model=TINY, prompt="x", max_tokens=30, temperature=1.0, seed=4,
                             extra_body={"structured_outputs": {"grammar": ebnf}})
    assert re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)?\)", r.choices[0].text), r.choices[0].text
    # json_object: an object; a random model may not close it, so it may end by length
    r = c.completions.create(model=TINY, prompt="{", max_tokens=300, temperature=1.0, seed=5,
                             extra_body={"response_format": {"type": "json_object"}})
    text, reason = r.choices[0].text, r.choices[0].finish_reason
    assert text.startswith("{")
    check_json(tiny_held, GrammarSpec.json_object(), None, text, reason)
    # streamed: the same grammar, same seed, same text
    schema = SCHEMAS["pattern_optional"]
    once = c.completions.create(model=TINY, prompt="{", max_tokens=100, temperature=1.0, seed=6,
                                extra_body={"response_format": rf(schema)})
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=TINY, prompt="{", max_tokens=100, temperature=1.0, seed=6, extra_body={"response_format": rf(schema)}, stream=True))
    assert streamed == once.choices[0].text and re.fullmatch(r'\{"sku": "[A-Z]{2}-[0-9]{4}"(, "note": ".*")?\}', streamed)


def test_invalid_constraints_are_400_naming_the_field(tiny) -> None:
    c = client(tiny)
    cases = [
        ({"response_format": rf({"type": "object", "properties": {"a": {"type": "nonsense"}}})},
         "response_format.json_schema.schema", 'Unsupported type "nonsense"'),
        ({"response_format": {"type": "json_schema"}}, "response_format", "needs json_schema"),
        # keywords the grammar engine would not enforce are refused, not silently broken
        ({"response_format": rf({"type": "object", "properties": {"p": {"type": "number", "maximum": 1}}})},
         "response_format.json_schema.schema", 'at properties.p: maximum can be guaranteed only on "type": "integer"'),
        ({"response_format": rf({"type": "array", "uniqueItems": True})}, "response_format.json_schema.schema",
         "uniqueItems is not enforced"),
        ({"response_format": {"type": "yaml"}}, "response_format.type", "json_schema"),
        ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs.regex", "Unclosed"),
        ({"structured_outputs": {"grammar": "root ::= foo"}}, "structured_outputs.grammar",
         'Rule "foo" is not defined'),
        ({"structured_outputs": {"regex": "a", "grammar": "root ::= \"a\""}}, "structured_outputs",
         "exactly one of"),
        ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, None,
         "cannot be combined"),
    ]
    for body, param, msg in cases:
        with pytest.raises(openai.BadRequestError) as err:
            c.completions.create(model=TINY, prompt="x", max_tokens=5, extra_body=body)
        assert msg in err.value.body["message"], err.value.body
        assert err.value.body["param"] == param, err.value.body
    for stream in (False, True):  # a stream is refused before it starts, with the same 400
        r = httpx.post(f"{tiny.url}/v1/completions", json={"model": TINY, "prompt": "x", "stream": stream,
                                                           "structured_outputs": {"regex": "(("}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "structured_outputs.regex"


def test_grammar_compiled_once_for_repeated_requests(tiny) -> None:
    c = client(tiny)
    schema = {"type": "object", "properties": {"k": {"enum": ["a", "b", f"unique-{time.time_ns()}"]}},
              "required": ["k"]}
    before = grammar_state(tiny)
    for seed in range(3):
        r = c.completions.create(model=TINY, prompt="{", max_tokens=80, seed=seed,
                                 extra_body={"response_format": rf(schema)})
        assert json.loads(r.choices[0].text)["k"] in schema["properties"]["k"]["enum"]
    after = grammar_state(tiny)
    assert after["compiles"] - before["compiles"] == 1 and after["cache_hits"] - before["cache_hits"] == 2


@pytest.mark.slow
def test_slow_compile_does_not_block_the_step_loop(tiny) -> None:
    """A huge schema compiles (seconds) while another request streams to its end: the stream
    finishes while the compile is still in flight, so the loop never waited for it."""
    props = {f"f{i}": {"type": "string", "pattern": f"^[a-z]{{{i % 7 + 1},{i % 7 + 9}}}[0-9]{{2}}$"}
             for i in range(2500)}
    big = {"type": "object", "properties": props, "required": list(props)}
    done: dict = {}

    def send_big() -> None:
        done["status"] = httpx.post(f"{tiny.url}/v1/completions", json={
            "model": TINY, "prompt": "{", "max_tokens": 1, "response_format": rf(big)}, timeout=120).status_code

    t = threading.Thread(target=send_big)
    t.start()
    deadline = time.monotonic() + 30
    while grammar_state(tiny)["compiling"] == 0 and "status" not in done and time.monotonic() < deadline:
        time.sleep(0.005)
    assert grammar_state(tiny)["compiling"] == 1, "the big compile did not start"
    chunks = list(client(tiny).completions.create(model=TINY, prompt="x", max_tokens=8, stream=True,
                                                  extra_body={"ignore_eos": True}))
    still_compiling = grammar_state(tiny)["compiling"]
    t.join(120)
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].text) >= 1 and chunks[-1].choices[0].finish_reason
    assert still_compiling == 1, "the stream waited for the compile"
    assert done["status"] == 200


# ---- through a real server: SmolLM2 -------------------------------------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Get the local time in a timezone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "pattern": "^[A-Z][a-z]+/[A-Z][a-z]+$"}},
                   "required": ["tz"]}}}
SHOT = [{"role": "user", "content": "What's the weather in Berlin?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Berlin", "unit": "celsius"}'}}]}]


def _params(name: str) -> dict:
    return {"get_weather": WEATHER, "get_time": TIME}[name]["function"]["parameters"]


@pytest.mark.slow
def test_smol_schemas_all_validate_and_prefix_cache_still_hits(smol, smol_held) -> None:
    c = client(smol)
    ask = [{"role": "system", "content": "You answer with JSON only."},
           {"role": "user", "content": "Invent a record about a customer of a bike shop."}]
    for i, schema in enumerate(SCHEMAS.values()):
        r = c.chat.completions.create(model=SMOL, messages=ask, max_tokens=120, temperature=0.7, seed=11,
                                      response_format=rf(schema, strict=i % 2 == 0))
        ch = r.choices[0]
        check_json(smol_held, GrammarSpec.json_schema(schema, strict=i % 2 == 0), schema, ch.message.content,
                   ch.finish_reason)
        ask_tokens = r.usage.prompt_tokens
    r = c.chat.completions.create(model=SMOL, messages=ask[:1] + [{"role": "user", "content": (
        "Reply with a JSON object for a person named Bob who is 30, with the keys name and age.")}],
        max_tokens=60, temperature=0, response_format={"type": "json_object"})
    check_json(smol_held, GrammarSpec.json_object(), None, r.choices[0].message.content, r.choices[0].finish_reason)
    hits = httpx.get(f"{smol.url}/headway/state").json()["prefix_cache"]["hit_tokens"]
    assert hits >= 4 * (ask_tokens - 1) // 2, "grammar requests must still share the cached prompt"


@pytest.mark.slow
def test_smol_tool_choice_required_named_auto(smol, smol_held) -> None:
    c = client(smol)
    ask = [{"role": "user", "content": "What's the weather in Paris?"}]
    tools = [WEATHER, TIME]
    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        r = c.chat.completions.create(model=SMOL, messages=ask, max_tokens=80, temperature=0, tools=tools,
                                      tool_choice=choice, parallel_tool_calls=False)
        ch = r.choices[0]
        check_tool_choice(smol_held, tool_call_spec(tools, choice, parallel=False), choice, ch.message,
                          ch.finish_reason, {"get_weather", "get_time"})
    # cut short on purpose (the call's opening alone is longer): the branch a near-tie can take
    spec = tool_call_spec(tools, "required", parallel=False)
    r = c.chat.completions.create(model=SMOL, messages=ask, max_tokens=24, temperature=0, tools=tools,
                                  tool_choice="required", parallel_tool_calls=False)
    assert r.choices[0].finish_reason == "length"
    check_tool_choice(smol_held, spec, "required", r.choices[0].message, "length", {"get_weather", "get_time"})
    assert not smol_held(spec, call_begin("get_weather") + '{"town"')   # the check can fail
    # auto: the model decides, and whatever it decides is well formed: a call (after an example
    # call it usually calls) parses and validates; text is free; a cut call is a grammatical prefix
    auto = tool_call_spec([WEATHER], "auto")
    for messages in (SHOT + ask, [{"role": "user", "content": "What is 2+2?"}]):
        r = c.chat.completions.create(model=SMOL, messages=messages, max_tokens=60, temperature=0, tools=[WEATHER])
        ch = r.choices[0]
        if ch.message.tool_calls and ch.finish_reason == "tool_calls":
            assert ch.message.tool_calls[0].function.name == "get_weather", ch
            jsonschema.validate(json.loads(ch.message.tool_calls[0].function.arguments), _params("get_weather"))
        elif ch.message.tool_calls:
            assert ch.finish_reason == "length", ch
            raw = raw_calls(ch.message.content, [(t.function.name, t.function.arguments)
                                                 for t in ch.message.tool_calls])
            assert smol_held(auto, raw), raw
        else:
            assert ch.finish_reason in ("stop", "length") and ch.message.content, ch
    # errors name the field
    bad_tool = {"type": "function", "function": {"name": "bad", "parameters": {"type": "object", "properties": {
        "x": {"type": "nonsense"}}}}}
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model=SMOL, messages=ask, tools=[WEATHER, bad_tool], tool_choice="required")
    assert err.value.body["param"] == "tools.1.function.parameters" and "nonsense" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        c.chat.completions.create(model=SMOL, messages=ask, tools=[WEATHER],
                                  tool_choice={"type": "function", "function": {"name": "nope"}})


@pytest.mark.slow
def test_smol_streamed_tool_calls_assemble_like_the_sdk_expects(smol, smol_held) -> None:
    c = client(smol)
    kw = dict(model=SMOL, messages=SHOT + [{"role": "user", "content": "And in Tokyo?"}], max_tokens=60,
              temperature=0, tools=[WEATHER, TIME], tool_choice="required")
    whole = c.chat.completions.create(**kw).choices[0]
    with c.chat.completions.stream(**kw) as stream:
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == whole.finish_reason     # the same request on the same server, streamed or not
    got = [(t.function.name, t.function.arguments) for t in final.message.tool_calls or []]
    assert got == [(t.function.name, t.function.arguments) for t in whole.message.tool_calls or []]
    spec = tool_call_spec([WEATHER, TIME], "required")
    if final.finish_reason == "length":
        raw = raw_calls(final.message.content, got)
        assert smol_held(spec, raw), raw
    else:
        assert final.finish_reason == "tool_calls" and got
        for name, args in got:
            jsonschema.validate(json.loads(args), _params(name))


@pytest.mark.slow
def test_smol_tool_call_arguments_are_compact_single_line_json(smol, smol_held) -> None:
    """Tool-call arguments are generated as compact single-line JSON (README: "JSON is generated
    compact"), as `response_format` JSON is: the grammar allows no newline or indentation between
    tokens, so none is spent; the arguments are exactly their own one-line serialisation."""
    c = client(smol)
    spec = tool_call_spec([WEATHER], "required", parallel=False)
    assert not smol_held(spec, call_begin("get_weather") + '{\n    "city"')        # indentation refused
    assert smol_held(spec, call_begin("get_weather") + '{"city": "Oslo", "unit": "celsius"}' + CALL_END)
    seen = 0
    for city in ("Oslo", "Paris", "Tokyo"):
        for temperature, seed in ((0.0, None), (1.0, 7)):
            r = c.chat.completions.create(model=SMOL, messages=[{"role": "user", "content": f"Weather in {city}?"}],
                                          max_tokens=60, temperature=temperature, seed=seed, tools=[WEATHER],
                                          tool_choice="required", parallel_tool_calls=False)
            ch = r.choices[0]
            for call in ch.message.tool_calls or []:
                args = call.function.arguments
                assert "\n" not in args and "\t" not in args, repr(args)
                if ch.finish_reason == "tool_calls":
                    value = json.loads(args)
                    assert args == json.dumps(value, ensure_ascii=False), repr(args)
                    jsonschema.validate(value, _params("get_weather"))
                    seen += 1
    assert seen >= 3, "most forced calls finish within 60 tokens"
