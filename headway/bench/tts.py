"""Time to first audio byte of the TTS runtime, against synthesizing the whole text first:
`python -m headway.bench.tts`.

Starts `headway serve piper-joe` on a real port, then, alternating so both see the same load:
- HTTP: POST /v1/audio/speech (pcm, streamed) of a paragraph whose first sentence is short;
  time from sending the request to the first audio byte, and to the last;
- baseline: the same paragraph synthesized whole with Piper in this process (same threads),
  which is what a server that does not stream makes its client wait before the first byte.
Then the WebSocket fed one token every 20 ms: time from sending the token that ends the first
sentence to the first audio frame. Reports p50/p95, the ratio baseline / streamed first byte,
and the load average (the machine is shared: absolute times only with it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

import httpx

PARAGRAPH = ("Sure thing. The forecast for tomorrow shows clear skies in the morning, with clouds building "
             "in the afternoon and a chance of light rain by the evening. Temperatures will stay mild, "
             "around eighteen degrees, and the wind will be calm for most of the day. Enjoy the sunshine "
             "while it lasts, and keep an umbrella close for the ride home.")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _start(model: str, threads: int | None) -> tuple[subprocess.Popen[bytes], str]:
    port = _port()
    args = [sys.executable, "-m", "headway", "serve", model, "--port", str(port), "--log-level", "warning"]
    if threads:
        args += ["--threads", str(threads)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"`headway serve {model}` exited with {proc.returncode}")
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit(f"`headway serve {model}` was not ready in 180 s")


def http_first_byte(client: httpx.Client, model: str, text: str) -> tuple[float, float]:
    """(seconds to the first audio byte, seconds to the last) of one streamed request."""
    started = time.perf_counter()
    first = 0.0
    with client.stream("POST", "/v1/audio/speech", json={"model": model, "voice": "joe", "input": text,
                                                         "response_format": "pcm"}) as r:
        r.raise_for_status()
        for chunk in r.iter_raw():
            if chunk and not first:
                first = time.perf_counter() - started
    return first, time.perf_counter() - started


async def ws_first_audio(url: str, model: str, text: str, every_s: float = 0.02) -> float:
    """Seconds from sending the token that ends the first sentence to the first audio frame."""
    import websockets

    words = text.split()
    tokens = [(" " if i else "") + w for i, w in enumerate(words)]
    async with websockets.connect(url.replace("http", "ws", 1) + f"/v1/audio/speech/stream?model={model}") as ws:
        await ws.recv()                       # speech.start
        sentence_end = 0.0

        async def feed() -> None:
            nonlocal sentence_end
            for tok in tokens:
                await ws.send(json.dumps({"text": tok}))
                if not sentence_end and tok.rstrip().endswith((".", "!", "?")):
                    sentence_end = time.perf_counter()
                await asyncio.sleep(every_s)
            await ws.send(json.dumps({"end": True}))

        feeder = asyncio.ensure_future(feed())
        first = 0.0
        async for msg in ws:
            if isinstance(msg, bytes) and not first:
                first = time.perf_counter()
        await feeder
        return first - sentence_end


def run(model: str, requests: int, ws_runs: int, threads: int | None) -> dict[str, Any]:
    from headway.library import resolve
    from headway.runtime.tts.synth import Synthesizer

    load_before = os.getloadavg()
    proc, url = _start(model, threads)
    synth = Synthesizer(resolve(model, progress=False).path, threads)
    try:
        synth.speak("Hello there.")            # warm, as the server warms itself
        first, last, whole = [], [], []
        with httpx.Client(base_url=url, timeout=120) as client:
            http_first_byte(client, model, "Warm up.")
            for _ in range(requests):
                f, t = http_first_byte(client, model, PARAGRAPH)
                first.append(f)
                last.append(t)
                started = time.perf_counter()
                list(synth.voice.synthesize(PARAGRAPH))
                whole.append(time.perf_counter() - started)
        ws = [asyncio.run(ws_first_audio(url, model, PARAGRAPH)) for _ in range(ws_runs)]
    finally:
        synth.stop()
        proc.terminate()
        proc.wait(10)
    return {"model": model, "threads": synth.threads, "cpus": os.cpu_count(), "requests": requests,
            "load_avg_before": [round(x, 2) for x in load_before],
            "load_avg_after": [round(x, 2) for x in os.getloadavg()],
            "http_first_byte_s": {"p50": _pct(first, 0.5), "p95": _pct(first, 0.95)},
            "http_last_byte_s": {"p50": _pct(last, 0.5), "p95": _pct(last, 0.95)},
            "baseline_whole_paragraph_s": {"p50": _pct(whole, 0.5), "p95": _pct(whole, 0.95)},
            "ratio_baseline_over_first_byte_p50": statistics.median(whole) / statistics.median(first),
            "ws_sentence_end_to_audio_s": {"p50": _pct(ws, 0.5), "p95": _pct(ws, 0.95), "runs": ws_runs}}


def report(r: dict[str, Any]) -> str:
    ms = lambda d: f"{1000 * d['p50']:7.0f} {1000 * d['p95']:7.0f}"  # noqa: E731
    return "\n".join([
        (f"TTS time to first audio, {r['model']}: {r['requests']} requests, {r['threads']} ONNX thread(s), "
         f"{r['cpus']} CPUs, load average {r['load_avg_before']} -> {r['load_avg_after']}"),
        f"{'':50} {'p50 ms':>7} {'p95 ms':>7}",
        f"{'HTTP streamed: first audio byte':50} {ms(r['http_first_byte_s'])}",
        f"{'HTTP streamed: last audio byte':50} {ms(r['http_last_byte_s'])}",
        f"{'baseline: whole paragraph, piper in-process':50} {ms(r['baseline_whole_paragraph_s'])}",
        f"{'WebSocket, 1 token / 20 ms: sentence end -> audio':50} {ms(r['ws_sentence_end_to_audio_s'])}",
        f"ratio baseline / streamed first byte (p50): {r['ratio_baseline_over_first_byte_p50']:.1f}x",
    ])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="piper-joe")
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--ws-runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="ONNX threads (default: the server's own choice)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = ap.parse_args(argv)
    result = run(args.model, args.requests, args.ws_runs, args.threads)
    print(report(result))
    if args.json:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
