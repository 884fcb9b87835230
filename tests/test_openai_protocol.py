"""OpenAI request validation and the chat template, without a model."""

from __future__ import annotations

import pytest

from headway.runtime.llm.openai_types import ChatCompletionRequest, CompletionRequest, OpenAIError, parse_request

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("extra, param, fragment", [
    ({"temperature": 3}, "temperature", "less than or equal to 2"),
    ({"top_p": 0}, "top_p", "greater than 0"),
    ({"n": 0}, "n", "greater than or equal to 1"),
    ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"stop": [""]}, "stop", "must not be empty"),
    ({"top_logprobs": 3}, None, "requires logprobs"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs", "less than or equal to 20"),
    ({"stream_options": {"include_usage": True}}, None, "only allowed when stream"),
    ({"presence_penalty": 2.5}, "presence_penalty", "less than or equal to 2"),
    ({"messages": []}, "messages", "at least 1"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role", "'system'"),
])
def test_chat_parameter_errors_name_the_parameter(extra: dict, param: str | None, fragment: str) -> None:
    with pytest.raises(OpenAIError) as info:
        parse_request(ChatCompletionRequest, {**CHAT, **extra})
    err = info.value
    assert err.status == 400 and err.type == "invalid_request_error"
    assert err.param == param
    assert fragment in err.message
    body = err.body()["error"]
    assert set(body) == {"message", "type", "param", "code"}


def test_missing_and_unknown_fields() -> None:
    with pytest.raises(OpenAIError) as info:
        parse_request(ChatCompletionRequest, {"messages": CHAT["messages"]})
    assert info.value.param == "model" and "required" in info.value.message
    req = parse_request(ChatCompletionRequest, {**CHAT, "some_future_field": 1, "stop": "END"})
    assert req.stop == ["END"]
    with pytest.raises(OpenAIError, match="JSON object"):
        parse_request(ChatCompletionRequest, [1])


def test_content_parts_and_limits() -> None:
    req = parse_request(ChatCompletionRequest, {**CHAT, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        "max_completion_tokens": 7, "max_tokens": 9})
    assert req.messages[0].text() == "ab"
    assert req.output_limit == 7
    img = parse_request(ChatCompletionRequest, {**CHAT, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
    with pytest.raises(ValueError, match="image_url"):
        img.messages[0].text()


def test_completion_prompts() -> None:
    assert parse_request(CompletionRequest, {"model": "m", "prompt": "x"}).prompts() == ["x"]
    assert parse_request(CompletionRequest, {"model": "m", "prompt": [1, 2]}).prompts() == [[1, 2]]
    assert parse_request(CompletionRequest, {"model": "m", "prompt": ["a", "b"]}).prompts() == ["a", "b"]
    with pytest.raises(OpenAIError, match="suffix"):
        parse_request(CompletionRequest, {"model": "m", "prompt": "x", "suffix": "y"})
    with pytest.raises(OpenAIError, match="best_of"):
        parse_request(CompletionRequest, {"model": "m", "prompt": "x", "best_of": 3})
