"""Benchmark workloads: what is sent, when, and how long each prompt and answer is.

Owns the seeded description of a run. A workload is a list of sessions; a session is an ordered
list of turns (single-turn workloads have one turn per session). Turn ``k + 1`` of a session is
sent only after turn ``k``'s answer arrived, and its messages include that answer.

Schedules: closed loop (at most ``concurrency`` sessions in flight, the next starts when one
finishes) or open loop (each session starts at its ``arrival_s`` offset, Poisson arrivals),
still capped at ``concurrency`` in flight.

Invariant: every builder is a pure function of its arguments; the same seed gives an equal
workload (same texts, lengths and arrival times).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Literal

from headway.bench.text import TextGenerator

LengthKind = Literal["fixed", "uniform", "normal"]
WorkloadKind = Literal["fixed", "poisson", "shared-prefix", "multi-turn"]
WORKLOAD_KINDS: tuple[str, ...] = ("fixed", "poisson", "shared-prefix", "multi-turn")


@dataclass(frozen=True)
class LengthDist:
    """A token-length distribution: fixed, uniform [low, high], or normal clipped to [low, high]."""

    kind: LengthKind
    value: int = 0
    low: int = 0
    high: int = 0
    mean: float = 0.0
    std: float = 0.0

    def __post_init__(self) -> None:
        if self.kind == "fixed":
            if self.value < 1:
                raise ValueError(f"fixed length must be >= 1, got {self.value}")
        elif self.kind in ("uniform", "normal"):
            if not 1 <= self.low <= self.high:
                raise ValueError(f"{self.kind} length needs 1 <= low <= high, got low={self.low} high={self.high}")
            if self.kind == "normal" and self.std < 0:
                raise ValueError(f"normal length needs std >= 0, got {self.std}")
        else:
            raise ValueError(f"unknown length kind {self.kind!r}; allowed: fixed, uniform, normal")

    @classmethod
    def parse(cls, spec: str | int) -> LengthDist:
        """Parse '128', 'uniform:64:256' or 'normal:MEAN:STD:LOW:HIGH'."""
        text = str(spec).strip()
        parts = text.split(":")
        try:
            if len(parts) == 1:
                return cls("fixed", value=int(parts[0]))
            if parts[0] == "uniform" and len(parts) == 3:
                return cls("uniform", low=int(parts[1]), high=int(parts[2]))
            if parts[0] == "normal" and len(parts) == 5:
                return cls("normal", mean=float(parts[1]), std=float(parts[2]),
                           low=int(parts[3]), high=int(parts[4]))
        except ValueError as exc:
            raise ValueError(f"bad length spec {text!r}: {exc}") from None
        raise ValueError(f"bad length spec {text!r}; allowed: N, uniform:LOW:HIGH, normal:MEAN:STD:LOW:HIGH")

    @property
    def max(self) -> int:
        """The largest length this distribution can produce."""
        return self.value if self.kind == "fixed" else self.high

    def sample(self, rng: random.Random) -> int:
        """One length drawn with ``rng``."""
        if self.kind == "fixed":
            return self.value
        if self.kind == "uniform":
            return rng.randint(self.low, self.high)
        return int(min(self.high, max(self.low, round(rng.gauss(self.mean, self.std)))))

    def describe(self) -> str:
        if self.kind == "fixed":
            return str(self.value)
        if self.kind == "uniform":
            return f"uniform:{self.low}:{self.high}"
        return f"normal:{self.mean:g}:{self.std:g}:{self.low}:{self.high}"


@dataclass(frozen=True)
class Turn:
    """One request of a session: the user text and how many tokens to ask for."""

    user: str
    max_tokens: int
    prompt_tokens: int  # target length of ``user`` (exact when built with a tokenizer)


@dataclass(frozen=True)
class Session:
    """A conversation: an optional system prompt and turns sent one after another."""

    id: int
    turns: tuple[Turn, ...]
    system: str | None = None
    group: int | None = None
    arrival_s: float | None = None  # open-loop start offset; None = closed loop


@dataclass(frozen=True)
class Workload:
    """A seeded, reproducible description of one benchmark run."""

    kind: WorkloadKind
    sessions: tuple[Session, ...]
    concurrency: int
    seed: int
    params: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if not self.sessions:
            raise ValueError("a workload needs at least one session")

    @property
    def num_requests(self) -> int:
        return sum(len(s.turns) for s in self.sessions)

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "sessions": len(self.sessions), "requests": self.num_requests,
                "concurrency": self.concurrency, "seed": self.seed, **self.params}


def build_messages(session: Session, turn: int, answers: list[str]) -> list[dict[str, str]]:
    """Chat messages for ``session.turns[turn]``, given the answers to the earlier turns."""
    if len(answers) < turn:
        raise ValueError(f"turn {turn} needs {turn} earlier answers, got {len(answers)}")
    messages: list[dict[str, str]] = []
    if session.system:
        messages.append({"role": "system", "content": session.system})
    for k in range(turn):
        messages.append({"role": "user", "content": session.turns[k].user})
        messages.append({"role": "assistant", "content": answers[k]})
    messages.append({"role": "user", "content": session.turns[turn].user})
    return messages


def render_prompt(messages: list[dict[str, str]]) -> str:
    """Plain-text prompt for ``/v1/completions`` from chat messages (no chat template)."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


def _check(num: int, name: str) -> None:
    if num < 1:
        raise ValueError(f"{name} must be >= 1, got {num}")


def _single_turn(kind: WorkloadKind, num_requests: int, concurrency: int, prompt: LengthDist,
                 output: LengthDist, text: TextGenerator, seed: int, *,
                 arrivals: list[float] | None = None, systems: list[str] | None = None,
                 params: dict[str, object] | None = None) -> Workload:
    rng = random.Random(seed)
    sessions = []
    for i in range(num_requests):
        n_prompt = prompt.sample(rng)
        turn = Turn(user=text.text(n_prompt, rng), max_tokens=output.sample(rng), prompt_tokens=n_prompt)
        group = i % len(systems) if systems else None
        sessions.append(Session(id=i, turns=(turn,), system=systems[group] if systems and group is not None else None,
                                group=group, arrival_s=arrivals[i] if arrivals else None))
    base = {"prompt_tokens": prompt.describe(), "output_tokens": output.describe(), "exact_tokens": text.exact}
    return Workload(kind=kind, sessions=tuple(sessions), concurrency=concurrency, seed=seed,
                    params={**base, **(params or {})})


def fixed_workload(num_requests: int, concurrency: int, prompt: LengthDist, output: LengthDist,
                   text: TextGenerator, seed: int = 0) -> Workload:
    """``num_requests`` independent requests, closed loop at ``concurrency``."""
    _check(num_requests, "num_requests")
    return _single_turn("fixed", num_requests, concurrency, prompt, output, text, seed)


def poisson_arrivals(num: int, rate: float, rng: random.Random) -> list[float]:
    """Start offsets (s) of ``num`` Poisson arrivals at ``rate`` per second; the first is at 0."""
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"rate must be a positive number of requests per second, got {rate}")
    t, out = 0.0, []
    for _ in range(num):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def poisson_workload(num_requests: int, rate: float, prompt: LengthDist, output: LengthDist,
                     text: TextGenerator, seed: int = 0, concurrency: int = 256) -> Workload:
    """``num_requests`` requests arriving as a Poisson process at ``rate`` req/s (open loop)."""
    _check(num_requests, "num_requests")
    arrivals = poisson_arrivals(num_requests, rate, random.Random(seed ^ 0x5EED))
    return _single_turn("poisson", num_requests, concurrency, prompt, output, text, seed,
                        arrivals=arrivals, params={"rate": rate})


def shared_prefix_workload(num_requests: int, concurrency: int, groups: int, system_tokens: int,
                           prompt: LengthDist, output: LengthDist, text: TextGenerator,
                           seed: int = 0) -> Workload:
    """Requests in ``groups`` groups; each group shares a ``system_tokens``-token system prompt."""
    _check(num_requests, "num_requests")
    _check(groups, "groups")
    _check(system_tokens, "system_tokens")
    rng = random.Random(seed ^ 0x5A5A)
    systems = [text.text(system_tokens, rng) for _ in range(groups)]
    return _single_turn("shared-prefix", num_requests, concurrency, prompt, output, text, seed,
                        systems=systems, params={"groups": groups, "system_tokens": system_tokens})


def multi_turn_workload(num_conversations: int, turns: int, concurrency: int, groups: int,
                        prompt: LengthDist, output: LengthDist, text: TextGenerator, seed: int = 0,
                        system: LengthDist | None = None, max_turns: int | None = None) -> Workload:
    """``num_conversations`` chats of ``turns`` turns (or uniform in ``turns..max_turns``); groups
    share a 500-1,500-token system prompt."""
    _check(num_conversations, "num_conversations")
    _check(turns, "turns")
    if max_turns is not None and max_turns < turns:
        raise ValueError(f"max_turns ({max_turns}) must be >= turns ({turns})")
    _check(groups, "groups")
    system = system or LengthDist("uniform", low=500, high=1500)
    rng = random.Random(seed)
    systems = [text.text(system.sample(rng), rng) for _ in range(groups)]
    sessions = []
    for i in range(num_conversations):
        group = i % groups
        conv_turns = []
        for _ in range(turns if max_turns is None else rng.randint(turns, max_turns)):
            n_prompt = prompt.sample(rng)
            conv_turns.append(Turn(user=text.text(n_prompt, rng), max_tokens=output.sample(rng),
                                   prompt_tokens=n_prompt))
        sessions.append(Session(id=i, turns=tuple(conv_turns), system=systems[group], group=group))
    return Workload(kind="multi-turn", sessions=tuple(sessions), concurrency=concurrency, seed=seed,
                    params={"turns": turns if max_turns is None else f"uniform:{turns}:{max_turns}",
                            "groups": groups, "system_tokens": system.describe(),
                            "prompt_tokens": prompt.describe(), "output_tokens": output.describe(),
                            "exact_tokens": text.exact})


def max_context_tokens(workload: Workload) -> int:
    """Upper bound (text tokens, template excluded) on any request's prompt + answer length."""
    worst = 0
    for s in workload.sessions:
        total = text_tokens_estimate(s.system) if s.system else 0
        for t in s.turns:
            total += t.prompt_tokens + t.max_tokens
        worst = max(worst, total)
    return worst


def text_tokens_estimate(text: str) -> int:
    """Rough token count of shipped-word-list text (~1.3 tokens per word, for sizing only)."""
    return int(len(text.split()) * 1.3) + 1
