"""Traces for the simulator: arrival times and token counts, from a seeded process or a file.

A `Trace` is sorted arrival times (seconds from 0) with each request's prompt and output token
counts. Processes (all seeded, all non-homogeneous Poisson drawn by thinning):
- `poisson`: a constant rate;
- `bursty`: a base rate with on/off bursts of `burst_factor` times it; bursts start at random
  (exponential gaps), last a random time, and rise and fall linearly over `rise_s`
  (`rise_s=0` gives steps);
- `diurnal`: a sinusoid between a trough and a peak over `period_s`;
- `replay`: a JSONL file, one `{"t": seconds, "prompt_tokens": n, "output_tokens": m}` a line.
Token counts of generated traces are log-normal around a median, clipped to [1, max].
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RateFn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Tokens:
    """Log-normal token counts: median, spread (sigma of the log) and a cap."""

    prompt_median: int = 256
    prompt_sigma: float = 0.6
    output_median: int = 192
    output_sigma: float = 0.5
    max_tokens: int = 2048


@dataclass(frozen=True)
class Trace:
    name: str
    times: list[float]          # arrival times, ascending, within [0, duration_s)
    prompt_tokens: list[int]
    output_tokens: list[int]
    duration_s: float
    params: dict[str, float]    # what generated it (for the report)

    def __len__(self) -> int:
        return len(self.times)


def _lognormal(rng: np.random.Generator, n: int, median: int, sigma: float, cap: int) -> list[int]:
    x = rng.lognormal(math.log(max(1, median)), sigma, n)
    return np.clip(np.rint(x), 1, cap).astype(np.int64).tolist()


def from_rate(name: str, rate: RateFn, peak: float, duration_s: float, seed: int, tokens: Tokens,
              params: dict[str, float]) -> Trace:
    """Arrivals of a Poisson process of intensity `rate(t)` <= `peak` over [0, duration_s), by thinning."""
    if duration_s <= 0 or peak <= 0:
        raise ValueError(f"need duration_s > 0 and a positive peak rate, got {duration_s} and {peak}")
    rng = np.random.default_rng(seed)
    n = rng.poisson(peak * duration_s)
    t = np.sort(rng.uniform(0.0, duration_s, n))
    keep = rng.uniform(0.0, peak, n) < rate(t)
    t = t[keep]
    prompts = _lognormal(rng, len(t), tokens.prompt_median, tokens.prompt_sigma, tokens.max_tokens)
    return Trace(name, t.tolist(), prompts,
                 _lognormal(rng, len(t), tokens.output_median, tokens.output_sigma, tokens.max_tokens),
                 duration_s, params)


def poisson(rate: float, duration_s: float, seed: int = 0, tokens: Tokens = Tokens()) -> Trace:
    if rate <= 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    return from_rate("poisson", lambda t: np.full_like(t, rate), rate, duration_s, seed, tokens, {"rate": rate})


def burst_windows(duration_s: float, seed: int, mean_gap_s: float, mean_burst_s: float,
                  first_at_s: float) -> list[tuple[float, float]]:
    """(start, end) of each burst: the first at `first_at_s`, then exponential gaps and lengths."""
    rng = np.random.default_rng([seed, 1])
    out, t = [], first_at_s
    while t < duration_s:
        length = max(1.0, float(rng.exponential(mean_burst_s)))
        out.append((t, min(duration_s, t + length)))
        t += length + max(1.0, float(rng.exponential(mean_gap_s)))
    return out


def bursty(base_rate: float, duration_s: float, seed: int = 0, *, burst_factor: float = 10.0,
           mean_gap_s: float = 600.0, mean_burst_s: float = 180.0, rise_s: float = 60.0,
           first_at_s: float = 300.0, tokens: Tokens = Tokens()) -> Trace:
    """A base rate with bursts of `burst_factor` x base that ramp up and down over `rise_s`."""
    if base_rate <= 0 or burst_factor < 1 or rise_s < 0 or mean_gap_s <= 0 or mean_burst_s <= 0:
        raise ValueError("need base_rate > 0, burst_factor >= 1, rise_s >= 0, mean_gap_s and mean_burst_s > 0; "
                         f"got {base_rate}, {burst_factor}, {rise_s}, {mean_gap_s}, {mean_burst_s}")
    windows = burst_windows(duration_s, seed, mean_gap_s, mean_burst_s, first_at_s)

    def rate(t: np.ndarray) -> np.ndarray:
        level = np.zeros_like(t)
        for start, end in windows:
            if rise_s == 0:
                shape = ((t >= start) & (t < end)).astype(float)
            else:  # trapezoid: up over rise_s from start, down over rise_s after end
                shape = np.clip(np.minimum((t - start) / rise_s, 1.0 - (t - end) / rise_s), 0.0, 1.0)
            level = np.maximum(level, shape)
        return base_rate * (1.0 + (burst_factor - 1.0) * level)

    return from_rate("bursty", rate, base_rate * burst_factor, duration_s, seed, tokens,
                     {"base_rate": base_rate, "burst_factor": burst_factor, "mean_gap_s": mean_gap_s,
                      "mean_burst_s": mean_burst_s, "rise_s": rise_s, "bursts": len(windows)})


def diurnal(trough_rate: float, peak_rate: float, duration_s: float, seed: int = 0, *, period_s: float = 3600.0,
            tokens: Tokens = Tokens()) -> Trace:
    """A sinusoid from `trough_rate` (at t=0) to `peak_rate` (half a period later)."""
    if not 0 <= trough_rate <= peak_rate or peak_rate <= 0 or period_s <= 0:
        raise ValueError(f"need 0 <= trough_rate <= peak_rate, peak_rate > 0, period_s > 0; "
                         f"got {trough_rate}, {peak_rate}, {period_s}")
    mid, amp = (peak_rate + trough_rate) / 2, (peak_rate - trough_rate) / 2
    return from_rate("diurnal", lambda t: mid - amp * np.cos(2 * np.pi * t / period_s), peak_rate, duration_s, seed,
                     tokens, {"trough_rate": trough_rate, "peak_rate": peak_rate, "period_s": period_s})


def replay(path: str | Path) -> Trace:
    """A trace file: JSONL, one request a line: {"t": 1.25, "prompt_tokens": 300, "output_tokens": 120}."""
    rows: list[tuple[float, int, int]] = []
    for no, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            row = (float(obj["t"]), int(obj["prompt_tokens"]), int(obj["output_tokens"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{no}: expected a JSON object like "
                             f'{{"t": 1.25, "prompt_tokens": 300, "output_tokens": 120}}, '
                             f"got {line[:80]!r} ({exc})") from None
        if row[0] < 0 or row[1] < 0 or row[2] < 1:
            raise ValueError(f"{path}:{no}: need t >= 0, prompt_tokens >= 0 and output_tokens >= 1, got {row}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no requests in the trace")
    rows.sort()
    return Trace(Path(path).stem, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                 rows[-1][0] + 1e-9, {"requests": len(rows)})


def write_jsonl(trace: Trace, path: str | Path) -> None:
    """The trace in the format `replay` reads."""
    with open(path, "w") as f:
        for t, p, o in zip(trace.times, trace.prompt_tokens, trace.output_tokens):
            f.write(json.dumps({"t": round(t, 6), "prompt_tokens": p, "output_tokens": o}) + "\n")
