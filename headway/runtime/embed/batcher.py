"""Which texts go into the next forward pass: a pure policy object (no threads, no clock).

Owns the pending texts of every admitted request (a `Job`) and forms batches under a token
budget. Fairness: jobs are visited round-robin, one text per job per turn, starting one job later
each batch, so a 2,000-text request is cut into budget-sized batches interleaved with everyone
else's and a 1-text request rides in the very next batch. Within a job, texts are handed out
longest first, so consecutive batches of a large job hold similar lengths (little padding in
attention). `next_batch(urgent_tokens=...)` forms a batch of small jobs only (the engine runs it
between two layers of a large batch).

Invariants (asserted by `check`, exercised in tests/test_embed_batcher.py):
- `pending_tokens` equals the summed length of the texts not yet handed out, over live jobs;
- a text is handed out at most once; a cancelled job hands out nothing more;
- a batch holds at least one text when any is pending, and more than one only within the budget.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(eq=False)
class Job:
    """One request's texts: `texts[i]` is the token ids of input i (specials included)."""

    texts: list[list[int]]
    # pending input indices, shortest last (handed out from the end: longest first)
    pending: list[int] = field(init=False)
    pending_tokens: int = field(init=False)
    started: bool = False    # some text of it was handed out
    cancelled: bool = False

    def __post_init__(self) -> None:
        self.pending = sorted(range(len(self.texts)), key=lambda i: len(self.texts[i]))
        self.pending_tokens = sum(len(t) for t in self.texts)


@dataclass(frozen=True)
class Item:
    job: Job
    index: int

    @property
    def ids(self) -> list[int]:
        return self.job.texts[self.index]


class Batcher:
    def __init__(self, max_batch_tokens: int):
        if max_batch_tokens < 1:
            raise ValueError("max_batch_tokens must be >= 1")
        self.max_batch_tokens = max_batch_tokens
        self.jobs: deque[Job] = deque()   # jobs with pending texts, in round-robin order
        self.pending_tokens = 0

    def add(self, job: Job) -> None:
        if job.pending:
            self.jobs.append(job)
            self.pending_tokens += job.pending_tokens

    def cancel(self, job: Job) -> None:
        """Drop the job's pending texts (those already in a batch finish and are discarded)."""
        if job.cancelled:
            return
        job.cancelled = True
        if job in self.jobs:
            self.jobs.remove(job)
            self.pending_tokens -= job.pending_tokens
        job.pending, job.pending_tokens = [], 0

    @property
    def queued_jobs(self) -> int:
        """Jobs none of whose texts has started."""
        return sum(1 for j in self.jobs if not j.started)

    def has_urgent(self, urgent_tokens: int) -> bool:
        return any(not j.started and j.pending_tokens <= urgent_tokens for j in self.jobs)

    def next_batch(self, urgent_tokens: int | None = None) -> list[Item]:
        """Texts for one forward pass, round-robin over jobs; with `urgent_tokens`, only jobs
        that have not started and hold at most that many tokens."""
        jobs = [j for j in self.jobs if urgent_tokens is None or (not j.started and j.pending_tokens <= urgent_tokens)]
        batch: list[Item] = []
        used = 0
        while jobs:
            still: list[Job] = []
            for job in jobs:
                n = len(job.texts[job.pending[-1]])
                if batch and used + n > self.max_batch_tokens:
                    continue     # too long for what is left; shorter texts of other jobs may fit
                index = job.pending.pop()
                job.pending_tokens -= n
                self.pending_tokens -= n
                job.started = True
                used += n
                batch.append(Item(job, index))
                if job.pending:
                    still.append(job)
            jobs = still if used < self.max_batch_tokens else []
            if still and all(used + len(j.texts[j.pending[-1]]) > self.max_batch_tokens for j in still):
                break
        for job in [j for j in self.jobs if not j.pending]:
            self.jobs.remove(job)
        if self.jobs and urgent_tokens is None:
            self.jobs.rotate(-1)   # the next batch starts with the next job
        return batch

    def check(self) -> None:
        assert self.pending_tokens == sum(len(j.texts[i]) for j in self.jobs for i in j.pending), "pending tokens drifted"
        assert all(j.pending and not j.cancelled for j in self.jobs), "a finished or cancelled job is queued"
        assert all(j.pending_tokens == sum(len(j.texts[i]) for i in j.pending) for j in self.jobs)
