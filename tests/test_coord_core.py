"""The coordination core (zproc/_coord.py): grants, FIFO waits, tokens, deadlines,
leases and dead sessions. No processes, no sockets."""

from __future__ import annotations

import pytest

from zproc import LockLostError
from zproc import _coordwire as W
from zproc import _serialization as S
from zproc.exceptions import ProtocolError
from zproc._coord import Coordinator


def who(n: int) -> W.Session:
    return W.Session(bytes([n]) * 16, 1000 + n, 1.0, "host")


def acq(core: Coordinator, n: int, name: str = "l", *, timeout: float | None = None,
        seq: int = 1, now: float = 0.0, kind: str = W.LOCK, value: int = 1,
        lease: float = 10.0) -> tuple[bool, int] | None:
    req = W.AcquireRequest(name, kind, value, n, seq, timeout, lease, who(n))
    return core.acquire("ns", req, ("reply", n, seq), now)


def rel(core: Coordinator, n: int, name: str = "l", *, seq: int = 1, now: float = 0.0,
        cancel: bool = False) -> None:
    core.release("ns", W.ReleaseRequest(name, n, seq, who(n).session), now, cancel)


def test_uncontended_grants_carry_growing_tokens() -> None:
    core = Coordinator(token_base=100)
    assert acq(core, 1) == (True, 101)
    assert core.locked("ns", "l")
    rel(core, 1)
    assert not core.locked("ns", "l")
    assert acq(core, 1, seq=2) == (True, 102)


def test_waiters_are_granted_in_arrival_order_one_per_release() -> None:
    core = Coordinator()
    assert acq(core, 1) == (True, 1)
    for n in (2, 3, 4):
        assert acq(core, n) is None  # answered later
    assert core.out == []
    rel(core, 1)
    assert core.out == [(("reply", 2, 1), (True, 2))]
    core.out.clear()
    rel(core, 2)
    assert core.out == [(("reply", 3, 1), (True, 3))]


def test_non_blocking_and_timed_waits() -> None:
    core = Coordinator()
    acq(core, 1)
    assert acq(core, 2, timeout=0) == (False, 0)
    assert acq(core, 3, timeout=1.0, now=0.0) is None
    assert core.next_deadline() == 1.0
    core.tick(0.5)
    assert core.out == []
    core.tick(1.0)
    assert core.out == [(("reply", 3, 1), (False, 0))]
    core.out.clear()
    rel(core, 1, now=1.1)
    assert core.out == [] and not core.locked("ns", "l")  # the timed-out waiter is gone


def test_semaphore_permits_and_kind_checks() -> None:
    core = Coordinator()
    assert acq(core, 1, "s", kind=W.SEMAPHORE, value=2)[0]  # type: ignore[index]
    assert acq(core, 2, "s", kind=W.SEMAPHORE, value=2)[0]  # type: ignore[index]
    assert acq(core, 3, "s", kind=W.SEMAPHORE, value=2, timeout=0) == (False, 0)
    with pytest.raises(ValueError, match="value 2, not 3"):
        acq(core, 3, "s", kind=W.SEMAPHORE, value=3)
    with pytest.raises(ValueError, match="is a semaphore"):
        acq(core, 3, "s")
    with pytest.raises(ValueError, match="is a lock"):
        core.declare("ns", "l0", W.LOCK, 1) and core.declare("ns", "l0", W.SEMAPHORE, 1)
    assert core.tables["ns"]["s"].value == 2 and len(core.tables["ns"]["s"].grants) == 2


def test_release_of_a_lost_grant_raises_lock_lost() -> None:
    core = Coordinator()
    acq(core, 1, lease=1.0, now=0.0)
    acq(core, 2, lease=5.0, now=0.5)
    core.tick(0.9)
    assert core.out == []
    core.tick(1.2)  # session 1 silent for 1.2 s > its lease: session 2 gets the lock
    assert core.out == [(("reply", 2, 1), (True, 2))]
    with pytest.raises(LockLostError, match="lease"):
        rel(core, 1, now=1.3)


def test_heartbeats_keep_a_holder() -> None:
    core = Coordinator()
    acq(core, 1, lease=1.0, now=0.0)
    for t in (0.5, 1.0, 1.5, 2.0):
        assert core.heartbeat(who(1).session, t)
        core.tick(t + 0.1)
    assert core.locked("ns", "l")
    assert not core.heartbeat(b"x" * 16, 0.0)


def test_a_dead_session_loses_everything_and_its_waits() -> None:
    core = Coordinator()
    acq(core, 1)
    acq(core, 1, "m")
    acq(core, 2)
    acq(core, 3, "m")
    core.drop(who(1).session)
    assert sorted(reply for reply, _ in core.out) == [("reply", 2, 1), ("reply", 3, 1)]
    assert sorted(token for (_, (granted, token)) in core.out if granted) == [3, 4]
    assert who(1).session not in core.owners


def test_cancel_drops_a_wait_or_a_grant_and_bye_frees_handles() -> None:
    core = Coordinator()
    acq(core, 1)
    acq(core, 2)
    rel(core, 2, cancel=True)  # gave up its wait
    rel(core, 9, cancel=True)  # unknown: nothing happens
    rel(core, 1)
    assert core.out == [] and not core.locked("ns", "l")
    acq(core, 1, seq=2)
    core.bye(W.ByeRequest(who(1).session, [1]))
    assert not core.locked("ns", "l")
    assert who(1).session in core.owners  # still known: it may hold elsewhere
    core.bye(W.ByeRequest(who(1).session, None))
    assert who(1).session not in core.owners


def test_the_same_acquire_twice_is_one_grant() -> None:
    core = Coordinator()
    assert acq(core, 1) == (True, 1)
    assert acq(core, 1) == (True, 1)
    assert len(core.tables["ns"]["l"].grants) == 1


def test_malformed_bodies_are_rejected() -> None:
    with pytest.raises(ProtocolError):
        W.parse(W.AcquireRequest, S.dumps((1, 2)))
    bad = W.AcquireRequest("", W.LOCK, 1, 1, 1, None, 10.0, tuple(who(1)))
    with pytest.raises(ValueError, match="empty"):
        W.parse(W.AcquireRequest, S.dumps(tuple(bad)))
    with pytest.raises(ValueError, match=">= 0"):
        W.parse(W.AcquireRequest, S.dumps(tuple(bad._replace(name="a", timeout=-2))))


def test_an_event_wakes_every_waiter_and_stays_set() -> None:
    core = Coordinator()
    assert acq(core, 1, "e", kind=W.EVENT, timeout=0) == (False, 0)
    assert acq(core, 1, "e", kind=W.EVENT) is None
    assert acq(core, 2, "e", kind=W.EVENT, timeout=5.0) is None
    assert not core.is_set("ns", "e")
    core.set_event("ns", "e", True)
    assert sorted(core.out) == [(("reply", 1, 1), (True, 0)), (("reply", 2, 1), (True, 0))]
    assert core.is_set("ns", "e") and acq(core, 3, "e", kind=W.EVENT) == (True, 0)
    core.set_event("ns", "e", False)
    assert not core.is_set("ns", "e")
    core.out.clear()
    assert acq(core, 3, "e", kind=W.EVENT, timeout=1.0, seq=2) is None
    core.tick(2.0)
    assert core.out == [(("reply", 3, 2), (False, 0))]
    with pytest.raises(ValueError, match="is an event"):
        acq(core, 1, "e")


def test_a_barrier_round_gives_distinct_indices_and_a_dead_party_breaks_it() -> None:
    core = Coordinator()
    assert acq(core, 1, "b", kind=W.BARRIER, value=3) is None
    assert acq(core, 2, "b", kind=W.BARRIER, value=3) is None
    assert core.barrier_info("ns", "b", 3) == (2, False)
    assert acq(core, 3, "b", kind=W.BARRIER, value=3) == (True, 2)
    assert sorted(core.out) == [(("reply", 1, 1), (True, 0)), (("reply", 2, 1), (True, 1))]
    core.out.clear()
    acq(core, 1, "b", kind=W.BARRIER, value=3, seq=2)
    acq(core, 2, "b", kind=W.BARRIER, value=3, seq=2)
    core.drop(who(2).session)  # a waiting party died
    assert core.out == [(("reply", 1, 2), (False, -1))]
    assert core.barrier_info("ns", "b", 3) == (0, True)
    assert acq(core, 3, "b", kind=W.BARRIER, value=3, seq=2) == (False, -1)  # stays broken
    with pytest.raises(ValueError, match="parties 3, not 4"):
        acq(core, 4, "b", kind=W.BARRIER, value=4)


def test_a_barrier_wait_that_times_out_or_is_cancelled_breaks_it() -> None:
    core = Coordinator()
    acq(core, 1, "t", kind=W.BARRIER, value=3)
    acq(core, 2, "t", kind=W.BARRIER, value=3, timeout=1.0)
    core.tick(1.5)
    assert sorted(core.out) == [(("reply", 1, 1), (False, -1)), (("reply", 2, 1), (False, 0))]
    core.out.clear()
    acq(core, 1, "c", kind=W.BARRIER, value=2)
    rel(core, 1, "c", cancel=True)
    assert core.barrier_info("ns", "c", 2) == (0, True)
    assert acq(core, 1, "z", kind=W.BARRIER, value=2, timeout=0) == (False, -1)
