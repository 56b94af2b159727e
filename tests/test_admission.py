"""The shared queue ledger and admission: all or none, exact across processes, Retry-After from the drain rate."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterator

import pytest
import torch

from service.errors import Overloaded
from service.http.errors import error_headers, status_of
from service.inference.admission import AUTO_QUEUE_MAX, Admission, DrainRate, QueueLedger, Ticket
from service.inference.worker import ClassifierAPI, LowestIdleFirst, WorkerConfig


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_request_is_admitted_whole_or_refused_whole() -> None:
    ledger = QueueLedger(workers=2)
    admission = Admission(ledger, bound=5, floor=1)
    first = admission.admit(3)
    with pytest.raises(Overloaded) as refused:
        admission.admit(3)  # 3 + 3 > 5: none of the three is admitted
    assert ledger.depth() == 3
    assert status_of(refused.value) == 503 and error_headers(refused.value) == {"Retry-After": "1"}
    assert str(refused.value).startswith("overloaded: 3 images are waiting, the bound is 5")
    second = admission.admit(2)
    assert ledger.depth() == 5
    first.close()
    second.close()
    assert ledger.depth() == 0


def test_handed_images_leave_the_count_when_a_worker_takes_them_the_rest_at_close() -> None:
    ledger = QueueLedger(workers=1)
    with Admission(ledger, bound=0, floor=1).admit(4) as ticket:  # 0: unbounded
        ticket.handed()
        ticket.handed()  # two queued; the other two failed to decode
    assert ledger.depth() == 2  # the queued two wait for a worker
    ledger.take(2)
    assert ledger.depth() == 0 and ledger.taken() == 2


def test_an_image_queued_after_its_request_closed_is_still_counted_until_taken() -> None:
    ledger = QueueLedger(workers=1)
    ticket = Admission(ledger, bound=0, floor=1).admit(2)
    ticket.handed()
    ticket.close()  # the request ended (an error) while one image was still on its way
    assert ledger.depth() == 1
    ticket.handed()  # ... and it was queued after all
    assert ledger.depth() == 2
    ledger.take(2)
    assert ledger.depth() == 0


def test_auto_bounds_the_images_in_the_server_until_their_answers_are_in() -> None:
    """auto counts an image from admission to its request's answer, running or not: a worker that
    took a full queue off it does not make room until it has answered."""
    ledger = QueueLedger(workers=1)
    admission = Admission(ledger, bound=None, floor=4)  # no rate measured: the floor
    running = admission.admit(3)
    for _ in range(3):
        running.handed()
    ledger.take(3)  # a worker runs the three: nothing waits
    assert ledger.depth() == 0 and ledger.held() == 3
    assert admission.refusal(1) is None and admission.refusal(2) is not None
    with pytest.raises(Overloaded) as refused:
        admission.admit(2)  # 3 running + 2 > 4
    assert str(refused.value).startswith("overloaded: 3 images are in the server (waiting or running), the bound is 4 "
                                         "(--max-queue auto)")
    waiting = admission.admit(1)
    assert ledger.held() == 4 and ledger.depth() == 1
    running.close()  # answered
    assert ledger.held() == 1
    admission.admit(2).close()
    waiting.close()
    running.close()  # closing twice gives nothing back twice
    assert ledger.held() == 0 and ledger.depth() == 0


def test_a_numeric_bound_counts_only_the_waiting_images() -> None:
    ledger = QueueLedger(workers=1)
    admission = Admission(ledger, bound=4, floor=1)
    running = admission.admit(4)
    for _ in range(4):
        running.handed()
    ledger.take(4)
    waiting = admission.admit(4)  # the four running leave room for four more
    assert ledger.held() == 8 and ledger.depth() == 4
    assert admission.refusal(1) is not None
    running.close()
    waiting.close()
    assert ledger.held() == 0


def _admit_many(ledger: QueueLedger, tries: int, results: mp.Queue) -> None:
    admission = Admission(ledger, bound=50, floor=1)
    admitted = 0
    for _ in range(tries):
        try:
            admission.admit(1)  # never closed: held until the parent checks
            admitted += 1
        except Overloaded:
            pass
    results.put(admitted)


def test_the_bound_holds_summed_over_processes() -> None:
    ledger = QueueLedger(workers=1)
    results: mp.Queue = mp.get_context("fork").Queue()
    procs = [mp.get_context("fork").Process(target=_admit_many, args=(ledger, 40, results)) for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(30)
    counts = [results.get(timeout=5) for _ in procs]
    assert sum(counts) == 50 and ledger.depth() == 50  # 160 tries by 4 processes, exactly the bound admitted


def _take_in_spawned(ledger: QueueLedger) -> None:
    ledger.take(3)


def test_a_spawned_process_shares_the_ledger_as_a_worker_does() -> None:
    ledger = QueueLedger(workers=1)
    Admission(ledger, bound=0, floor=1).admit(5)
    proc = mp.get_context("spawn").Process(target=_take_in_spawned, args=(ledger,))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    assert ledger.depth() == 2 and ledger.taken() == 3


def test_retry_after_is_the_time_to_drain_the_queue_at_the_measured_rate() -> None:
    ledger, clock = QueueLedger(workers=1), Clock()
    admission = Admission(ledger, bound=100, floor=1, clock=clock)
    admission.admit(100)
    assert admission.retry_after() == 1  # nothing measured yet
    for _ in range(8):  # 10 images taken every 0.5 s: 20 images/s
        clock.now += 0.5
        ledger.take(10)
        admission.rate()
    # 20 left after 80 taken; new arrivals refill it to 90
    admission.admit(70)
    assert ledger.depth() == 90
    assert admission.retry_after() == 5  # ceil(90 / 20)


def test_auto_bound_is_a_second_of_work_at_least_the_floor_at_most_the_cap() -> None:
    ledger, clock = QueueLedger(workers=1), Clock()
    admission = Admission(ledger, bound=None, floor=64, clock=clock)
    assert admission.bound() == 64  # no rate measured yet: the floor
    for _ in range(4):
        clock.now += 0.5
        ledger.take(50)  # 100 images/s
        admission.rate()
    assert admission.bound() == 100
    for _ in range(10):
        clock.now += 0.5
        ledger.take(5000)
        admission.rate()
    assert admission.bound() == AUTO_QUEUE_MAX


def test_drain_rate_needs_half_a_second_of_history() -> None:
    clock, taken = Clock(), [0]
    rate = DrainRate(lambda: taken[0], clock)
    assert rate() == 0.0
    clock.now += 0.1
    taken[0] = 10
    assert rate() == 0.0  # 0.1 s is too short to say
    clock.now += 0.9
    taken[0] = 30
    assert rate() == pytest.approx(30.0)


def test_begin_batch_counts_the_other_busy_workers() -> None:
    ledger = QueueLedger(workers=3)
    assert ledger.begin_batch(0) == 0
    assert ledger.begin_batch(2) == 1
    ledger.set_busy(0, False)
    assert ledger.begin_batch(1) == 1


class Waits:
    """A clock that advances only by the sleeps of the code under test, which can act at each one."""

    def __init__(self, at_sleep: dict[int, object] | None = None) -> None:
        self.now, self.sleeps, self.at_sleep = 0.0, 0, at_sleep or {}

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.now += seconds
        if self.sleeps in self.at_sleep:
            self.at_sleep[self.sleeps]()


def turn(ledger: QueueLedger, index: int, waits: Waits, wait_s: float = 0.05) -> bool:
    return LowestIdleFirst(ledger, index, batch=4, poll_s=0.001, poll_idle_s=0.001, stall_s=0.02,
                           clock=waits.clock, sleep=waits.sleep).turn(wait_s)


def queue_up(ledger: QueueLedger, n: int) -> Ticket:
    """``n`` images admitted and put on the request queue, as an API server does."""
    ticket = Admission(ledger, bound=0, floor=1).admit(n)
    for _ in range(n):
        ticket.handed()
    return ticket


def test_a_worker_leaves_to_the_lowest_idle_worker_what_it_will_take() -> None:
    ledger = QueueLedger(workers=3)
    for worker in range(3):
        ledger.set_idle(worker, True)
    assert not turn(ledger, 1, Waits())  # nothing queued: waited the whole 50 ms, not let in
    queue_up(ledger, 1)
    waits = Waits({5: lambda: ledger.take(1)})  # worker 0 takes it within 5 ms, as an idle worker does
    assert not turn(ledger, 1, waits) and not turn(ledger, 2, Waits())
    queue_up(ledger, 2)
    ledger.set_idle(0, False)  # worker 0 took an item and runs it: the queued work is worker 1's
    assert turn(ledger, 1, Waits())
    assert not turn(ledger, 2, Waits({10: lambda: ledger.take(2)}))  # worker 1 is idle below it and takes them
    queue_up(ledger, 5)  # more than one batch (4) for the one idle worker below: worker 2 goes too
    assert turn(ledger, 2, Waits())
    ledger.take(5)
    waits = Waits({3: lambda: ledger.set_idle(0, False)})  # worker 0 wakes busy 3 ms into the wait
    queue_up(ledger, 1)
    ledger.set_idle(0, True)
    assert turn(ledger, 1, waits) and waits.sleeps == 3
    assert ledger.queued() == 1 and ledger.depth() == 1


def test_images_still_being_decoded_are_no_ones_work_yet() -> None:
    """Admitted, not yet on the queue (a large image decodes for longer than the stall limit): a
    worker above an idle one stays away, so the idle one takes it once it is queued."""
    ledger = QueueLedger(workers=2)
    ledger.set_idle(0, True)
    ticket = Admission(ledger, bound=0, floor=1).admit(1)
    assert ledger.depth() == 1 and ledger.queued() == 0
    assert not turn(ledger, 1, Waits())
    ticket.handed()
    assert ledger.queued() == 1


def test_a_lower_worker_that_says_idle_but_takes_nothing_holds_work_up_only_briefly() -> None:
    ledger = QueueLedger(workers=2)
    ledger.set_idle(0, True)  # and it died there
    queue_up(ledger, 1)
    waits = Waits()
    assert turn(ledger, 1, waits)
    assert 0.02 <= waits.now < 0.03  # the stall limit, not the whole wait
    taking = {i: (lambda: (ledger.take(1), queue_up(ledger, 1))) for i in range(5, 60, 5)}  # each taken in 5 ms
    assert not turn(ledger, 1, Waits(taking))  # the lower worker keeps taking: never stalled, never let in


@pytest.fixture()
def restore_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_a_batch_alone_takes_every_core_and_busy_workers_their_share(restore_threads: None) -> None:
    ledger = QueueLedger(workers=2)
    config = WorkerConfig(state_dir="", device="cpu", precision="fp32", threads=1, max_batch_size=4,
                          batch_timeout_s=0.0, timeout_s=1.0, solo_threads=2)
    worker = ClassifierAPI(config, ledger)  # worker 0
    worker.begin_batch()
    assert torch.get_num_threads() == 2  # a lone request: no other worker busy, nothing queued
    worker.end_batch()
    ledger.begin_batch(1)  # worker 1 is running a batch
    worker.begin_batch()
    assert torch.get_num_threads() == 1
    worker.end_batch()
    ledger.set_busy(1, False)
    ticket = Admission(ledger, bound=0, floor=1).admit(1)  # an image waits: another worker takes it soon
    worker.begin_batch()
    assert torch.get_num_threads() == 1
    worker.end_batch()
    ticket.close()
    worker.begin_batch()
    assert torch.get_num_threads() == 2


def test_one_worker_or_a_gpu_keeps_its_threads(restore_threads: None) -> None:
    config = WorkerConfig(state_dir="", device="cpu", precision="fp32", threads=2, max_batch_size=4,
                          batch_timeout_s=0.0, timeout_s=1.0)  # solo_threads 0: no adapting
    torch.set_num_threads(2)
    worker = ClassifierAPI(config, QueueLedger(workers=1))
    worker.begin_batch()
    assert torch.get_num_threads() == 2
