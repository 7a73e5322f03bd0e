"""The server's side of coordination (``Kind.COORD``): the core of :mod:`zproc._coord`
between the server loop and the wire, and the watch on the holders' processes.

The loop hands every COORD request to :meth:`CoordService.handle`, which answers now or
later; the answers due later (grants, ended waits) are frames in :meth:`CoordService.take`.
:meth:`CoordService.tick`, called on every wake-up, ends the waits whose deadline passed,
takes away what silent sessions hold, and twice a second looks at the processes of the
sessions on this host: one that is gone (or a zombie, or a new process with the same pid)
loses what it holds at once, without waiting for its lease.
"""

from __future__ import annotations

import time

import psutil

from . import _coordwire as W
from . import _protocol as P
from . import _serialization as S
from ._coord import Coordinator
from ._coordqueue import Journal
from ._transport import host_id

__all__ = ["CoordService"]

_POST, _ACK = int(W.CoordOp.POST), int(W.CoordOp.ACK)
#: How often the processes of the sessions on this host are looked at, in seconds.
PID_CHECK = 0.5
#: How often silent sessions are looked for, in seconds (leases end this much late at most).
LEASE_CHECK = 0.1
#: Longest sleep of the server loop, in ms (it wakes up for signals and idle work).
IDLE_WAKE_MS = 200


class CoordService:
    def __init__(self, token_base: int) -> None:
        self.core = Coordinator(token_base)
        self.host = host_id()
        self._pid_due = self._due = 0.0
        self._deadline: float | None = None  # the earliest deadline of a waiting acquire
        #: the first error of a handle's pipelined puts (POST), raised by its next request
        self.errors: dict[tuple[bytes, int], Exception] = {}

    def restore(
        self,
        declared: list[tuple[str, str, str, int, bool]],
        items: list[tuple[str, str, int, bytes]],
    ) -> None:
        """With a persist file: start from what it kept (see ``Coordinator.restore``) and
        journal the queues and events from now on (:attr:`journal`)."""
        self.core.restore(Journal(), declared, items)

    @property
    def journal(self) -> Journal | None:
        """What the next commit of the persist file writes (None: no persist file)."""
        return self.core.journal

    @property
    def active(self) -> bool:
        return bool(self.core.owners) or bool(self.core.out) or bool(self.core.dirty)

    def handle(self, identity: bytes, request: P.Request, body: bytes) -> bytes | None:
        """The reply body to a COORD request, or None when it is answered later."""
        op, core, ns, now = request.method, self.core, request.namespace, time.monotonic()
        if op == _POST:  # the hot path: a pipelined put, no reply
            post = W.parse_post(body)
            try:
                core.post(ns, post.name, post.item)
            except Exception as exc:
                self.errors.setdefault((post.session, post.handle), exc)
            return None
        if op == _ACK:  # no reply either
            post = W.parse_post(body)
            seq = int.from_bytes(post.item, "little")
            core.ack(ns, post.name, (post.session, post.handle, seq), now)
            return None
        if op == W.CoordOp.ACQUIRE:
            req = W.parse(W.AcquireRequest, body)
            result = core.acquire(ns, req, (identity, request.request_id), now)
            return self._timed(req.timeout, now, None if result is None else S.dumps(result))
        if op == W.CoordOp.GET:
            req = W.parse(W.GetRequest, body)
            self._raise_kept(req.who.session, req.handle)
            items = core.get(ns, req, (identity, request.request_id), now)
            return self._timed(req.timeout, now, None if items is None else S.dumps(items))
        if op == W.CoordOp.PUT:
            req = W.parse(W.PutRequest, body)
            self._raise_kept(req.who.session, req.handle)
            done = core.put(ns, req, (identity, request.request_id), now)
            return self._timed(req.timeout, now, None if done is None else S.dumps(done))
        if op == W.CoordOp.QSIZE:
            size = W.parse(W.SizeRequest, body)
            self._raise_kept(size.session, size.handle)
            return S.dumps(core.qsize(ns, size.name, size.maxsize))
        if op == W.CoordOp.QCANCEL:
            core.qcancel(ns, W.parse(W.ReleaseRequest, body), now)
            return S.dumps(None)
        if op == W.CoordOp.RELEASE or op == W.CoordOp.CANCEL:
            core.release(ns, W.parse(W.ReleaseRequest, body), now, op == W.CoordOp.CANCEL)
            return S.dumps(None)
        if op == W.CoordOp.HEARTBEAT:
            return S.dumps(core.heartbeat(bytes(S.loads(body)), now))
        if op == W.CoordOp.DECLARE:
            req = W.parse(W.DeclareRequest, body)
            core.declare(ns, req.name, req.kind, req.value)
            return S.dumps(None)
        if op == W.CoordOp.BYE:
            core.bye(W.parse(W.ByeRequest, body))
            return S.dumps(None)
        if op == W.CoordOp.SET or op == W.CoordOp.CLEAR:
            core.set_event(ns, W.parse(W.DeclareRequest, body).name, op == W.CoordOp.SET)
            return S.dumps(None)
        if op == W.CoordOp.IS_SET:
            return S.dumps(core.is_set(ns, W.parse(W.DeclareRequest, body).name))
        if op == W.CoordOp.ABORT:
            req = W.parse(W.DeclareRequest, body)
            core.abort(core.declare(ns, req.name, W.BARRIER, req.value))
            return S.dumps(None)
        if op == W.CoordOp.BARRIER:
            req = W.parse(W.DeclareRequest, body)
            return S.dumps(core.barrier_info(ns, req.name, req.value))
        if op == W.CoordOp.LOCKED:
            return S.dumps(core.locked(ns, W.parse(str, body)))
        raise ValueError(f"unknown coordination operation {op}")

    def _timed(self, timeout: float | None, now: float, reply: bytes | None) -> bytes | None:
        """``reply``; when it is None (the request waits), mind its deadline."""
        if reply is None and timeout is not None:
            self._due = min(self._due, now + timeout)
            if self._deadline is None or now + timeout < self._deadline:
                self._deadline = now + timeout
        return reply

    def _raise_kept(self, session: bytes, handle: int) -> None:
        error = self.errors.pop((session, handle), None)
        if error is not None:
            raise error

    def take(self) -> list[list[bytes]]:
        """The frames of the replies due now."""
        if self.core.dirty:
            self.core.flush()
        out, self.core.out = self.core.out, []
        ok = P.OK
        return [P.reply(identity, ok, rid, S.dumps(value)) for (identity, rid), value in out]

    def tick(self) -> int:
        """Time and death (see the module docstring); return how long the loop may sleep,
        in ms."""
        now = time.monotonic()
        if now < self._due:
            return self._wait(now)
        if now >= self._pid_due:
            self._pid_due = now + PID_CHECK
            for session, owner in list(self.core.owners.items()):
                if owner.places and owner.who.host == self.host and not _alive(owner.who):
                    self.core.drop(session)
        self.core.tick(now)
        self._deadline = self.core.next_deadline()
        self._due = now + LEASE_CHECK
        if self._deadline is not None:
            self._due = min(self._due, self._deadline)
        return self._wait(now)

    def _wait(self, now: float) -> int:
        """The loop's next sleep: until the next deadline of a wait, or the idle wake-up
        (the socket option changes only while timed waits are pending)."""
        deadline = self._deadline
        if deadline is None or deadline - now >= IDLE_WAKE_MS / 1000:
            return IDLE_WAKE_MS
        return max(1, int((deadline - now) * 1000) + 1)


def _alive(who: W.Session) -> bool:
    """Whether the process of a session on this host still runs (not a zombie, and not
    another process that got the same pid)."""
    try:
        process = psutil.Process(who.pid)
        if abs(process.create_time() - who.started) > 0.5:
            return False
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True  # cannot tell (access denied): leave it to the lease
