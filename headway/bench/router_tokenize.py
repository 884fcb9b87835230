"""What exact prefix routing costs the router per request: chat prompts encoded whole against
the segment cache (`tokenize.SegmentCachedTokenizer`), side by side on the same multi-turn bodies.

    python -m headway.bench.router_tokenize [--model smollm2-135m-instruct] [--conversations 40]
"""

from __future__ import annotations

import argparse
import random
import time

from headway.bench.text import TextGenerator
from headway.infra.router.tokenize import SegmentCachedTokenizer, prompt_token_ids


def main(argv: list[str] | None = None) -> int:
    from headway.library import resolve
    from headway.tokenization import ModelTokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="library name or model directory")
    ap.add_argument("--conversations", type=int, default=40)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--groups", type=int, default=8, help="system prompts shared by groups of conversations")
    ap.add_argument("--system-tokens", type=int, default=1200)
    args = ap.parse_args(argv)
    try:
        path = resolve(args.model, install=False, progress=False).path
    except KeyError:
        path = args.model
    whole = ModelTokenizer(path)
    tg, rng = TextGenerator(None), random.Random(0)
    systems = [tg.text(args.system_tokens, rng) for _ in range(args.groups)]
    bodies = []
    for conv in range(args.conversations):
        msgs = [{"role": "system", "content": systems[conv % args.groups]}]
        for _ in range(args.turns):
            msgs = msgs + [{"role": "user", "content": tg.text(50, rng)}]
            bodies.append({"messages": msgs})
            msgs = msgs + [{"role": "assistant", "content": tg.text(30, rng)}]
    cached = SegmentCachedTokenizer(whole)
    checks = cached.verify_left
    for b in bodies[:checks]:             # the cache's own self-checks (each also encodes whole)
        prompt_token_ids(cached, b)
    rest = bodies[checks:]
    tokens = sum(len(prompt_token_ids(whole, b) or ()) for b in rest) / max(1, len(rest))
    times = {}
    for name, tok in (("whole", whole), ("segment-cached", cached)):
        t = time.perf_counter()
        for b in rest:
            prompt_token_ids(tok, b)
        times[name] = (time.perf_counter() - t) / max(1, len(rest))
        print(f"{name:15s} {times[name] * 1000:7.3f} ms per request")
    print(f"{len(rest)} multi-turn chat bodies, {tokens:.0f} prompt tokens on average; cache "
          f"{'on' if cached.enabled else 'OFF (pieces differ from whole for this tokenizer)'}: "
          f"{times['whole'] / times['segment-cached']:.1f}x less time per request")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
