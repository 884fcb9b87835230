"""ASR benchmark: Headway's server (a subprocess on a real port, `headway serve whisper-base`)
against faster-whisper's plain `WhisperModel.transcribe` in process, same model, same threads,
on one deterministic ~10-minute recording (espeak-ng sentences with pauses, sent as FLAC).

Prints, for both: wall time, real-time factor (seconds of compute per second of audio; lower
is faster) and speed (x real time), their ratio, WER against the known text, and the load
average of the machine, which is part of any absolute number.

    python -m headway.bench.asr [--seconds 600] [--threads N] [--beam-size 5]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from headway.bench.speech import encode, have_espeak, recording, wer

MODEL = "whisper-base"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def headway_run(flac: bytes, threads: int, beam_size: int, tmp: Path) -> tuple[float, str, dict[str, object]]:
    pkg = tmp / "pkg"
    pkg.mkdir(exist_ok=True)
    (pkg / "headway.yaml").write_text(
        f"name: {MODEL}\nruntime: asr\nmodel: {{source: {MODEL}}}\n"
        f"engine: {{num_threads: {threads}, beam_size: {beam_size}}}\nruntime_options: {{max_request_body: 25MB}}\n")
    port = _port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp / "server.log", "wb")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "headway", "serve", str(pkg), "--port", str(port),
                             "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not become ready:\n{(tmp / 'server.log').read_text()}")
            try:
                if httpx.get(url + "/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        started = time.perf_counter()
        r = httpx.post(url + "/v1/audio/transcriptions", data={"model": MODEL, "language": "en"},
                       files={"file": ("recording.flac", flac, "audio/flac")}, timeout=3600)
        wall = time.perf_counter() - started
        r.raise_for_status()
        state = httpx.get(url + "/headway/state", timeout=10).json()
        return wall, r.json()["text"], state.get("asr", {})
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def plain_run(audio: object, threads: int) -> tuple[float, str]:
    from faster_whisper import WhisperModel

    from headway.library import resolve

    model = WhisperModel(str(resolve(MODEL).path), device="cpu", compute_type="int8", cpu_threads=threads)
    started = time.perf_counter()
    segments, _ = model.transcribe(audio, language="en")   # faster-whisper's defaults (beam 5)
    text = "".join(s.text for s in segments)
    return time.perf_counter() - started, text


def main(argv: list[str] | None = None) -> dict[str, object]:
    from headway.runtime.asr.engine import cpu_share

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=600.0, help="length of the recording (default 600)")
    p.add_argument("--threads", type=int, default=cpu_share(), help="CPU threads for both (default: CPU share)")
    p.add_argument("--beam-size", type=int, default=5, help="Headway's beam size (faster-whisper's default: 5)")
    p.add_argument("--voice", choices=("espeak", "piper"), default="espeak",
                   help="espeak-ng, or the library's Piper voice piper-joe (needs piper-tts)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if not have_espeak():
        sys.exit("espeak-ng is needed to synthesize the recording (apt-get install espeak-ng)")
    audio, text = recording(args.seconds, voice=args.voice)
    duration = audio.size / 16000
    flac = encode(audio, "flac")
    print(f"recording: {duration:.1f} s of {args.voice} speech ({len(text.split())} words), FLAC {len(flac) / 1e6:.1f} MB; "
          f"threads {args.threads}; load average before: {_load()}", flush=True)
    with tempfile.TemporaryDirectory() as d:
        wall_h, text_h, figures = headway_run(flac, args.threads, args.beam_size, Path(d))
    load_h = _load()
    print(f"headway:   {wall_h:7.1f} s  RTF {wall_h / duration:.4f}  ({duration / wall_h:5.1f}x real time)  "
          f"WER {wer(text, text_h):.3f}  [beam {args.beam_size}, batched VAD chunks]  load {load_h}", flush=True)
    wall_p, text_p = plain_run(audio, args.threads)
    load_p = _load()
    print(f"baseline:  {wall_p:7.1f} s  RTF {wall_p / duration:.4f}  ({duration / wall_p:5.1f}x real time)  "
          f"WER {wer(text, text_p):.3f}  [faster-whisper transcribe, defaults]  load {load_p}", flush=True)
    print(f"speed-up: {wall_p / wall_h:.2f}x (baseline wall / headway wall)")
    result: dict[str, object] = {
        "audio_seconds": round(duration, 2), "voice": args.voice, "threads": args.threads, "beam_size": args.beam_size,
        "headway": {"wall_s": round(wall_h, 2), "rtf": round(wall_h / duration, 4), "wer": round(wer(text, text_h), 4),
                    "server_figures": figures, "load_avg_after": load_h},
        "faster_whisper_transcribe": {"wall_s": round(wall_p, 2), "rtf": round(wall_p / duration, 4),
                                      "wer": round(wer(text, text_p), 4), "load_avg_after": load_p},
        "speedup": round(wall_p / wall_h, 3)}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
