"""The embeddings batcher (pure policy) and the packed encoder's attention groups: budgets,
round-robin fairness, urgent passes, cancellation, and the invariants at every step."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from headway.runtime.embed.batcher import Batcher, Job
from headway.runtime.embed.encoder import GROUP_WASTE, attention_groups


def job(*lengths: int) -> Job:
    return Job([[1] * n for n in lengths])


def drain(b: Batcher) -> list[list[tuple[Job, int]]]:
    out = []
    while b.jobs:
        batch = b.next_batch()
        b.check()
        out.append([(it.job, it.index) for it in batch])
    return out


def test_a_batch_stays_within_the_token_budget_and_every_text_runs_once() -> None:
    b = Batcher(100)
    jobs = [job(*[random.Random(i).randint(5, 60) for _ in range(20)]) for i in range(5)]
    for j in jobs:
        b.add(j)
    b.check()
    batches = drain(b)
    for batch in batches:
        assert sum(len(j.texts[i]) for j, i in batch) <= 100
    handed = [(id(j), i) for batch in batches for j, i in batch]
    assert len(handed) == len(set(handed)) == 100
    assert b.pending_tokens == 0


def test_a_one_text_request_rides_in_the_next_batch_behind_a_2000_text_job() -> None:
    b = Batcher(512)
    bulk = job(*[50] * 2000)
    b.add(bulk)
    b.next_batch()
    small = job(8)
    b.add(small)
    nxt = b.next_batch()
    assert any(it.job is small for it in nxt)
    assert sum(len(it.ids) for it in nxt) <= 512


def test_round_robin_interleaves_large_jobs() -> None:
    b = Batcher(40)
    a, c = job(*[10] * 40), job(*[10] * 40)
    b.add(a)
    b.add(c)
    for batch in drain(b)[:10]:
        owners = [j for j, _ in batch]
        assert owners.count(a) == owners.count(c) == 2


def test_a_text_longer_than_the_budget_still_runs_alone() -> None:
    b = Batcher(16)
    b.add(job(30, 4))
    first = b.next_batch()
    assert [len(it.ids) for it in first] == [30]
    assert [len(it.ids) for it in b.next_batch()] == [4]


def test_texts_of_a_job_come_longest_first() -> None:
    b = Batcher(10_000)
    b.add(job(3, 9, 1, 7))
    assert [len(it.ids) for it in b.next_batch()] == [9, 7, 3, 1]


def test_cancel_drops_pending_texts() -> None:
    b = Batcher(20)
    a, c = job(*[10] * 10), job(5)
    b.add(a)
    b.add(c)
    b.next_batch()
    b.cancel(a)
    b.check()
    rest = drain(b)
    assert all(j is not a for batch in rest for j, _ in batch)
    assert b.pending_tokens == 0
    b.cancel(a)   # twice is harmless
    b.check()


def test_urgent_batch_takes_only_small_unstarted_jobs() -> None:
    b = Batcher(1000)
    bulk = job(*[100] * 50)
    b.add(bulk)
    b.next_batch()
    assert not b.has_urgent(64)
    small, big = job(12), job(200)
    b.add(small)
    b.add(big)
    assert b.has_urgent(64) and b.queued_jobs == 2
    urgent = b.next_batch(urgent_tokens=64)
    assert [it.job for it in urgent] == [small]
    b.check()
    assert not b.has_urgent(64)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(1, 300), min_size=1, max_size=30), min_size=1, max_size=8),
       st.integers(16, 1024), st.data())
def test_invariants_hold_under_random_arrivals_and_cancels(jobs: list[list[int]], budget: int, data: st.DataObject) -> None:
    b = Batcher(budget)
    live = []
    for lengths in jobs:
        j = job(*lengths)
        b.add(j)
        live.append(j)
        b.check()
        if data.draw(st.booleans()):
            batch = b.next_batch(urgent_tokens=data.draw(st.sampled_from([None, 64])))
            assert len(batch) <= 1 or sum(len(it.ids) for it in batch) <= budget
            b.check()
        if data.draw(st.booleans()):
            b.cancel(data.draw(st.sampled_from(live)))
            b.check()
    drain(b)
    assert b.pending_tokens == 0 and not b.jobs


@given(st.lists(st.integers(1, 512), min_size=1, max_size=200))
def test_attention_groups_cover_everything_with_bounded_padding(lengths: list[int]) -> None:
    lengths = sorted(lengths, reverse=True)
    groups = attention_groups(lengths)
    assert groups[0][0] == 0 and groups[-1][1] == len(lengths)
    assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
    for i, j in groups:
        real = sum(lengths[i:j])
        assert j - i == 1 or (j - i) * lengths[i] <= (1 + GROUP_WASTE) * real
