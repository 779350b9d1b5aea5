"""The scheduler alone (host only: no model, no torch): arrival order, the batch bound, which
chunk prefills, the token budget while others decode, cancellation, explicit statuses."""

from __future__ import annotations

from chatglm3.engine.rows import RowAllocator
from chatglm3.engine.scheduler import Request, Scheduler, Status


def make(max_batch: int = 2, chunk: int = 100, budget: int | None = None) -> Scheduler:
    rows = RowAllocator(max_batch, lambda: 10_000, lambda: max_batch, prefix_cache=False)
    return Scheduler(rows, max_batch, chunk, budget)


def prefill_all(s: Scheduler) -> list[tuple[int, int, int]]:
    """Runs every plan's chunk to the end, admitting each request; (id, begin, end) each step."""
    seen = []
    while s.waiting or s.prefilling:
        plan = s.schedule()
        if not plan.prefills:
            break
        [c] = plan.prefills  # one at a time without packing
        seen.append((c.request.prompt[0], c.begin, c.end))
        s.prefilled(c)
        if c.last:
            s.end_prefill(c.request, admit=True)
    return seen


def test_first_in_first_out_and_the_batch_bound() -> None:
    s = make(max_batch=2)
    reqs = [Request([i] * 150) for i in range(3)]
    for r in reqs:
        s.add(r)
    assert [r.status for r in reqs] == [Status.WAITING] * 3
    steps = prefill_all(s)
    assert steps == [(0, 0, 100), (0, 100, 150), (1, 0, 100), (1, 100, 150)]
    assert s.running == reqs[:2] and reqs[2].status is Status.WAITING  # no row for it
    assert s.schedule().prefills == []
    s.finished(0)
    assert reqs[0].status is Status.FINISHED and s.running == [reqs[1]]
    assert prefill_all(s) == [(2, 0, 100), (2, 100, 150)]


def test_budget_caps_chunks_only_while_others_decode() -> None:
    s = make(max_batch=2, chunk=100, budget=30)
    s.add(Request([1] * 150))
    s.add(Request([2] * 90))
    steps = prefill_all(s)
    # The first runs alone: whole chunks; the second beside a running one: 30 at a time.
    assert steps == [(1, 0, 100), (1, 100, 150), (2, 0, 30), (2, 30, 60), (2, 60, 90)]


def test_cancelled_requests_leave_at_the_next_step() -> None:
    s = make(max_batch=1)
    a, b, c = Request([1] * 10), Request([2] * 10), Request([3] * 10)
    for r in (a, b, c):
        s.add(r)
    plan = s.schedule()
    [chunk] = plan.prefills
    assert chunk.request is a and a.status is Status.PREFILLING
    b.cancelled.set()
    s.prefilled(chunk)
    s.end_prefill(a, admit=True)
    plan = s.schedule()
    assert plan.cancelled == [b] and b.status is Status.FINISHED and list(s.waiting) == [c]
    a.cancelled.set()
    gone, _ = s.release_cancelled()
    assert gone == [a] and s.running == [] and a.status is Status.FINISHED
    assert [c.request for c in s.schedule().prefills] == [c]


def test_no_start_while_a_job_waits_and_drain() -> None:
    s = make()
    r = Request([1] * 10)
    s.add(r)
    assert s.schedule(start=False).prefills == [] and not s.busy()
    assert [c.request for c in s.schedule().prefills] == [r] and s.busy()
    assert s.drain() == [r] and r.status is Status.FINISHED and not s.has_work()


def test_scheduler_and_rows_import_no_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, chatglm3.engine.scheduler, chatglm3.engine.rows; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
