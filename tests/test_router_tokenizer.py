"""A replica's tokenizer files rebuild the same tokenizer at the router (exact prefix routing)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from headway.library import resolve
from headway.tokenization import TOKENIZER_FILES, ModelTokenizer


def test_tokenizer_files_round_trip(tmp_path: Path) -> None:
    src = ModelTokenizer(resolve("smollm2-135m-instruct", install=False, progress=False).path)
    files = src.files()
    assert "tokenizer.json" in files and set(files) <= set(TOKENIZER_FILES)
    copy = ModelTokenizer.from_files(files, tmp_path / "tok")
    messages = [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Hello there!"}]
    assert copy.encode_chat(messages, add_generation_prompt=True) == src.encode_chat(messages, add_generation_prompt=True)
    assert copy.encode("def f(x): return x") == src.encode("def f(x): return x")
    assert copy.eos_token_ids == src.eos_token_ids
    with pytest.raises(ValueError, match="not a tokenizer file: '../evil'"):
        ModelTokenizer.from_files({"../evil": "x"}, tmp_path / "bad")
    assert not (tmp_path / "evil").exists()


def conversation(turns: int) -> list[list[dict[str, str]]]:
    import random

    from headway.bench.text import TextGenerator

    tg, rng = TextGenerator(None), random.Random(0)
    msgs = [{"role": "system", "content": tg.text(600, rng)}]
    out = []
    for _ in range(turns):
        msgs = msgs + [{"role": "user", "content": tg.text(40, rng) + " é✓ 数字 \n\n  x"}]
        out.append(msgs)
        msgs = msgs + [{"role": "assistant", "content": tg.text(20, rng)}]
    return out


@pytest.mark.parametrize("model", ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
def test_segment_cache_gives_the_same_ids_and_reuses_history(model: str) -> None:
    from headway.infra.router.tokenize import SegmentCachedTokenizer

    try:
        whole = ModelTokenizer(resolve(model, install=False, progress=False).path)
    except Exception as exc:  # noqa: BLE001 - the Qwen pair is a benchmark model, not always installed
        pytest.skip(f"{model} is not installed here: {exc}")
    cached = SegmentCachedTokenizer(whole, verify=0)
    for msgs in conversation(5):
        kw = {"add_generation_prompt": True}
        assert cached.encode_chat(msgs, **kw) == whole.encode_chat(msgs, **kw)
    if cached.enabled:     # a template with special tokens between messages: later turns reuse earlier pieces
        assert cached.hits > cached.misses


def test_segment_cache_switches_itself_off_when_pieces_differ() -> None:
    from headway.infra.router.tokenize import SegmentCachedTokenizer

    class Odd:
        """Encodes a text as its length: pieces never add up to the whole."""
        def __init__(self, inner: ModelTokenizer):
            self.tokenizer = inner.tokenizer
            self.inner = inner

        def render_chat(self, messages, **kw):  # noqa: ANN001, ANN003, ANN201
            return self.inner.render_chat(messages, **kw)

        def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
            return [len(text)]

    odd = Odd(ModelTokenizer(resolve("smollm2-135m-instruct", install=False, progress=False).path))
    cached = SegmentCachedTokenizer(odd, verify=4)
    msgs = conversation(1)[0]
    text = odd.render_chat(msgs, add_generation_prompt=True)
    assert cached.encode_chat(msgs, add_generation_prompt=True) == [len(text)]
    assert not cached.enabled
    assert cached.encode_chat(msgs, add_generation_prompt=True) == [len(text)]


def test_tokenize_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from headway.bench.router_tokenize import main

    assert main(["--conversations", "20", "--turns", "4", "--system-tokens", "200"]) == 0
    out = capsys.readouterr().out
    assert "segment-cached" in out and "cache on" in out and "x less time per request" in out


async def test_a_failed_tokenizer_fetch_backs_off_and_routing_goes_on(tmp_path: Path) -> None:
    """A replica without /headway/tokenizer (404): one fetch, a logged failure, no new fetch until
    the back-off ends; the deployment keeps routing on the text estimate."""
    import aiohttp

    from headway.infra.router.replicas import Replica, ReplicaSet
    from headway.infra.router.tokenizer_fetch import TokenizerFetcher
    from headway.infra.router.upstream import RouterConfig
    from tests.test_router_support import ws_replica

    proc = ws_replica(tmp_path)          # speaks the state contract, has no tokenizer endpoint
    proc.wait()
    try:
        rep = Replica(proc.url, deployment="d")
        rep.ready, rep.healthy, rep.runtime = True, True, "llm"
        config = RouterConfig()
        fetcher = TokenizerFetcher(config, ReplicaSet([rep]))
        async with aiohttp.ClientSession() as session:
            fetcher.want("d", session)
            assert len(fetcher._tasks) == 1
            fetcher.want("d", session)                    # one fetch at a time
            assert len(fetcher._tasks) == 1
            await asyncio.gather(*fetcher._tasks)
            assert fetcher._failures == {"d": 1} and "d" not in (config.tokenizers or {})
            fetcher.want("d", session)                    # backing off: no new fetch
            assert not fetcher._tasks
            fetcher._next_try["d"] = 0.0                  # the back-off is over
            fetcher.want("d", session)
            await asyncio.gather(*fetcher._tasks)
            assert fetcher._failures == {"d": 2}
            assert fetcher._next_try["d"] - time.monotonic() > TokenizerFetcher.RETRY_S * 1.5   # doubled
        fetcher.close()
    finally:
        proc.stop()
