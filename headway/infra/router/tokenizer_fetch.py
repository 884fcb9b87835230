"""Exact prefix routing without configuration: an LLM deployment's tokenizer, fetched from a replica.

A policy that matches prefixes (predicted-latency, cache-aware) needs each prompt's token ids as the
replica computes them, to compare with the prefix digests replicas publish; without them it
estimates prefixes from text (~4 characters a token), which keeps crediting a small KV pool with
prefixes it has already evicted. When a request for an LLM deployment finds no tokenizer for it
(none given with `--tokenizer`), the router fetches the replica's tokenizer files
(`GET /headway/tokenizer`) in the background and uses them from then on; requests before that
route on the text estimate. A failed fetch is retried after `RETRY_S`, doubling up to
`MAX_RETRY_S` (a replica without the endpoint, say, is not asked every few seconds). Off with
`headway route --no-auto-tokenizer`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

if TYPE_CHECKING:
    from headway.infra.router.replicas import ReplicaSet
    from headway.infra.router.upstream import RouterConfig

log = logging.getLogger("headway.router")


class TokenizerFetcher:
    RETRY_S = 30.0
    MAX_RETRY_S = 600.0

    def __init__(self, config: RouterConfig, replicas: ReplicaSet):
        self.config = config
        self.replicas = replicas
        self.sources: dict[str, str] = {d: "--tokenizer" for d in config.tokenizers or {}}
        self._next_try: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._dir: Path | None = None

    def want(self, deployment: str, session: aiohttp.ClientSession | None) -> None:
        """A request for `deployment` had no tokenizer: start fetching one, unless a fetch is
        running or failed less than RETRY_S ago, or no LLM replica of it is usable."""
        if not self.config.auto_tokenizer or session is None or deployment in (self.config.tokenizers or {}):
            return
        now = time.monotonic()
        if now < self._next_try.get(deployment, 0.0):
            return
        replica = next((r for r in self.replicas.candidates(deployment) if r.runtime == "llm"), None)
        if replica is None:
            return
        self._next_try[deployment] = now + self.MAX_RETRY_S   # no second fetch while this one runs
        task = asyncio.ensure_future(self._fetch(deployment, replica.url, session))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fetch(self, deployment: str, url: str, session: aiohttp.ClientSession) -> None:
        from headway.infra.router.tokenize import SegmentCachedTokenizer
        from headway.tokenization import ModelTokenizer

        try:
            async with session.get(url + "/headway/tokenizer", timeout=aiohttp.ClientTimeout(total=60)) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
                files = (await resp.json())["files"]
            if self._dir is None:
                self._dir = Path(tempfile.mkdtemp(prefix="headway-router-tokenizers-"))
            where = self._dir / re.sub(r"[^A-Za-z0-9._-]", "_", deployment)
            tokenizer = await asyncio.to_thread(ModelTokenizer.from_files, files, where)
        except Exception as exc:  # noqa: BLE001 - routing goes on with the text estimate
            n = self._failures[deployment] = self._failures.get(deployment, 0) + 1
            wait = min(self.MAX_RETRY_S, self.RETRY_S * 2 ** (n - 1))
            self._next_try[deployment] = time.monotonic() + wait
            log.warning("deployment '%s': no tokenizer from %s (%s: %s); routing on the prompt text, "
                        "next try in %.0f s", deployment, url, type(exc).__name__, exc, wait)
            return
        self.config.tokenizers = {**(self.config.tokenizers or {}), deployment: SegmentCachedTokenizer(tokenizer)}
        self.sources[deployment] = url
        log.info("deployment '%s': routing on exact token ids (tokenizer from %s)", deployment, url)

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
