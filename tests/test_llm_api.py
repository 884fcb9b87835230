"""The OpenAI-compatible API of a real LLM replica, driven by the official `openai` client.

tinycoder (1M random weights) covers the plumbing fast; SmolLM2-135M-Instruct (marked slow)
covers what a user sees: chat template, answers, streaming, stop, seed, logprobs, n.
"""

from __future__ import annotations

import json
import re
import time

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import running_server, wait_for

SMOL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    with running_server(["serve", "tinycoder-test", "--threads", "1"], tmp_path_factory.mktemp("tiny")) as s:
        yield s


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    with running_server(["serve", SMOL], tmp_path_factory.mktemp("smol"), timeout=300) as s:
        yield s


def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def kv_idle(server) -> bool:
    state = httpx.get(f"{server.url}/headway/state").json()
    kv = state["kv"]
    return state["in_flight"] == 0 and kv["used_tokens"] == kv["evictable_tokens"]



# ---- plumbing, on tinycoder ------------------------------------------------------------------

def test_completions_plumbing(tiny) -> None:
    c = client(tiny)
    assert [m.id for m in c.models.list().data] == ["tinycoder-test"]
    r = c.completions.create(model="tinycoder-test", prompt="def add(a, b):", max_tokens=12, temperature=0,
                             extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.usage.completion_tokens == 12
    assert r.choices[0].finish_reason == "length"
    again = c.completions.create(model="tinycoder-test", prompt="def add(a, b):", max_tokens=12, temperature=0,
                                 extra_body={"ignore_eos": True})
    assert again.choices[0].text == r.choices[0].text  # greedy is deterministic
    batch = c.completions.create(model="tinycoder-test", prompt=["a", "b c"], max_tokens=3, n=2, temperature=1,
                                 seed=3, extra_body={"ignore_eos": True})
    assert sorted(ch.index for ch in batch.choices) == [0, 1, 2, 3]
    assert batch.usage.completion_tokens == 12


def test_errors_have_openai_shape(tiny) -> None:
    c = client(tiny)
    with pytest.raises(openai.NotFoundError) as nf:
        c.completions.create(model="gpt-9", prompt="x", max_tokens=2)
    assert "gpt-9" in str(nf.value) and "tinycoder-test" in str(nf.value)
    with pytest.raises(openai.BadRequestError) as br:
        c.completions.create(model="tinycoder-test", prompt="x", max_tokens=2, top_p=0)
    assert br.value.body["param"] == "top_p"
    with pytest.raises(openai.BadRequestError) as long:
        c.completions.create(model="tinycoder-test", prompt="hello " * 3000, max_tokens=2)
    msg = str(long.value)
    assert "maximum context length is 2048" in msg and re.search(r"your prompt has \d{4} tokens", msg)
    assert long.value.body["param"] == "prompt"
    bad_stop = httpx.post(f"{tiny.url}/v1/completions", json={"model": "tinycoder-test", "prompt": "x",
                                                               "stop_token_ids": [-1]})
    assert bad_stop.status_code == 400 and "stop_token_ids" in bad_stop.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        c.chat.completions.create(model="tinycoder-test", messages=[{"role": "user", "content": "x"}])
    raw = httpx.post(f"{tiny.url}/v1/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    bad_ids = httpx.post(f"{tiny.url}/v1/completions", json={"model": "tinycoder-test", "prompt": [10**9]})
    assert bad_ids.status_code == 400 and "token ids" in bad_ids.json()["error"]["message"]


def test_stream_usage_and_done(tiny) -> None:
    with httpx.stream("POST", f"{tiny.url}/v1/completions", json={
        "model": "tinycoder-test", "prompt": "x", "max_tokens": 5, "stream": True, "temperature": 0,
        "ignore_eos": True, "stream_options": {"include_usage": True}}) as r:
        lines = [ln for ln in r.iter_lines() if ln.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[5:]) for ln in lines[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert all(ch["usage"] is None for ch in chunks[:-1])


def test_disconnect_frees_kv_at_once(tiny) -> None:
    c = client(tiny)
    # a prompt long enough for the engine to measure its prefill rate (a few tokens measure only a step's fixed cost)
    stream = c.completions.create(model="tinycoder-test", prompt="go " * 24, max_tokens=1500, stream=True,
                                  extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    assert wait_for(lambda: kv_idle(tiny)), httpx.get(f"{tiny.url}/headway/state").json()
    finished = httpx.get(f"{tiny.url}/metrics").text
    assert 'headway_llm_requests_finished_total{model="tinycoder-test",reason="abort"}' in finished
    # the gauges follow the abort without another step running
    assert wait_for(lambda: 'headway_llm_running_sequences{model="tinycoder-test"} 0.0'
                    in httpx.get(f"{tiny.url}/metrics").text)
    state = httpx.get(f"{tiny.url}/headway/state").json()
    assert state["running"] == 0 and state["preemptions"] == 0
    assert state["prefill_tokens_per_s"] > 0            # measured by the engine; the router reads it
    assert state["prefix_cache"]["query_tokens"] >= state["prefix_cache"]["hit_tokens"] >= 0
    assert wait_for(lambda: httpx.get(f"{tiny.url}/headway/state").json()["tokens_per_s"] == 0.0, 10)


def test_generic_predict_endpoint(tiny) -> None:
    r = httpx.post(f"{tiny.url}/v1/models/tinycoder-test:predict",
                   json={"prompt": "x", "max_tokens": 3, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    bad = httpx.post(f"{tiny.url}/v1/models/tinycoder-test:predict", json={"prompt": "x", "max_tokens": -1})
    assert bad.status_code == 422 and "max_tokens" in bad.json()["error"]["message"]


# ---- what a user sees, on SmolLM2 ------------------------------------------------------------

@pytest.mark.slow
def test_chat_answers_and_streams(smol) -> None:
    c = client(smol)
    r = c.chat.completions.create(model=SMOL, temperature=0, max_tokens=30,
                                  messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop" and r.usage.prompt_tokens > 10
    pieces = []
    for chunk in c.chat.completions.create(model=SMOL, temperature=0, max_tokens=30, stream=True,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}]):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    assert len(pieces) > 3 and "".join(pieces) == r.choices[0].message.content


@pytest.mark.slow
def test_stop_seed_logprobs_n(smol) -> None:
    c = client(smol)
    msgs = [{"role": "user", "content": "Count from 1 to 10, one number per line."}]
    full = c.chat.completions.create(model=SMOL, messages=msgs, temperature=0, max_tokens=60).choices[0].message.content
    assert "5" in full
    stopped = c.chat.completions.create(model=SMOL, messages=msgs, temperature=0, max_tokens=60, stop=["5"])
    text = stopped.choices[0].message.content
    assert "5" not in text and full.startswith(text) and stopped.choices[0].finish_reason == "stop"
    a = c.chat.completions.create(model=SMOL, messages=msgs, temperature=1.0, seed=7, max_tokens=20, n=3)
    b = c.chat.completions.create(model=SMOL, messages=msgs, temperature=1.0, seed=7, max_tokens=20, n=3)
    assert [ch.message.content for ch in a.choices] == [ch.message.content for ch in b.choices]
    assert len({ch.message.content for ch in a.choices}) > 1  # n samples differ from each other
    lp = c.chat.completions.create(model=SMOL, messages=msgs, temperature=0, max_tokens=5, logprobs=True,
                                   top_logprobs=3)
    content = lp.choices[0].logprobs.content
    assert len(content) == lp.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3 and item.logprob <= 0
        assert item.top_logprobs[0].logprob >= item.top_logprobs[-1].logprob
        assert item.token == item.top_logprobs[0].token  # greedy picks the most likely token
    assert "".join(i.token for i in content) == lp.choices[0].message.content


@pytest.mark.slow
def test_state_and_metrics_report_the_engine(smol) -> None:
    c = client(smol)
    system = "You are a meticulous assistant. " * 40  # > 64 tokens: a digest block
    for q in ("Name a colour.", "Name a fruit."):
        c.chat.completions.create(model=SMOL, max_tokens=4, temperature=0,
                                  messages=[{"role": "system", "content": system}, {"role": "user", "content": q}])
    state = httpx.get(f"{smol.url}/headway/state").json()
    assert state["runtime"] == "llm" and state["ready"] is True
    assert state["kv"]["total_tokens"] > 0 and state["prefix_digest"]["hashes"]
    assert state["prefix_cache"]["hit_rate"] > 0
    metrics = httpx.get(f"{smol.url}/metrics").text
    for name in ("headway_llm_time_to_first_token_seconds_bucket", "headway_llm_inter_token_latency_seconds_bucket",
                 "headway_llm_e2e_request_latency_seconds_bucket", "headway_llm_generation_tokens_total",
                 "headway_llm_running_sequences", "headway_llm_waiting_sequences", "headway_llm_kv_usage_ratio",
                 "headway_llm_prefix_cache_hit_rate", "headway_llm_preemptions_total",
                 "headway_llm_generation_tokens_per_second"):
        assert name in metrics, name


@pytest.mark.slow
def test_streamed_stop_usage_and_cache_salt(smol) -> None:
    """Streaming with the official client: stop strings never leak into the streamed text, usage
    arrives in the last chunk when asked; a cache salt isolates the prefix cache."""
    c = client(smol)
    msgs = [{"role": "user", "content": "Count from 1 to 10, one number per line."}]
    full = c.chat.completions.create(model=SMOL, messages=msgs, temperature=0, max_tokens=60).choices[0].message.content
    chunks = list(c.chat.completions.create(model=SMOL, messages=msgs, temperature=0, max_tokens=60, stop=["5"],
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert "5" not in text and full.startswith(text) and len(text) > 0
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert all(ch.usage is None for ch in chunks[:-1])

    def hit_tokens() -> int:
        return httpx.get(f"{smol.url}/headway/state").json()["prefix_cache"]["hit_tokens"]

    system = [{"role": "system", "content": "You are a terse assistant for a salt test. " * 8},
              {"role": "user", "content": "Say yes."}]
    first = c.chat.completions.create(model=SMOL, messages=system, max_tokens=1, extra_body={"cache_salt": "tenant-a"})
    time.sleep(0.5)  # the state snapshot is refreshed at least every 0.25 s
    before = hit_tokens()
    other = c.chat.completions.create(model=SMOL, messages=system, max_tokens=1, extra_body={"cache_salt": "tenant-b"})
    time.sleep(0.5)
    assert hit_tokens() == before  # another salt: nothing shared
    again = c.chat.completions.create(model=SMOL, messages=system, max_tokens=1, extra_body={"cache_salt": "tenant-a"})
    assert wait_for(lambda: hit_tokens() - before >= 64, 5)  # the same salt: the prompt is found cached
    # usage says so too, as OpenAI's API does (prompt_tokens_details.cached_tokens)
    assert first.usage.prompt_tokens_details.cached_tokens == 0 == other.usage.prompt_tokens_details.cached_tokens
    assert 64 <= again.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens
    streamed = list(c.chat.completions.create(model=SMOL, messages=system, max_tokens=2, stream=True,
                                              stream_options={"include_usage": True},
                                              extra_body={"cache_salt": "tenant-a"}))
    assert streamed[-1].usage.prompt_tokens_details.cached_tokens >= 64


@pytest.mark.slow
def test_chat_template_renders_as_transformers_does() -> None:
    """Served chat prompts are token for token what `apply_chat_template` produces."""
    from transformers import AutoTokenizer

    from headway.library import resolve
    from headway.tokenization import ModelTokenizer

    path = resolve(SMOL, install=False, progress=False).path
    ours, hf = ModelTokenizer(path), AutoTokenizer.from_pretrained(path)
    conversations = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
         {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3+3? Ünïcödé ✓"}],
    ]
    for msgs in conversations:
        for gen in (True, False):
            expected = hf.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True)
            if isinstance(expected, dict) or hasattr(expected, "input_ids"):
                expected = expected["input_ids"]
            assert ours.encode_chat(msgs, add_generation_prompt=gen) == list(expected), msgs
