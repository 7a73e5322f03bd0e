"""zproc: multi-process programs around one shared state, over ZeroMQ.

A state server process holds a ``dict``; :class:`State` objects in any process read and
change it with atomic requests and block until it changes (watchers); :class:`Context`
starts the server and the processes and cleans everything up.
"""

from __future__ import annotations

import logging as _logging

from ._version import __version__

from ._async import AsyncState, AsyncStateWatcher
from ._launch import start_server
from ._mapping import TaskDetail
from ._pipeline import AsyncPipeline
from ._transport import ServerAddress, create_ipc_address
from ._utils import consume
from .context import Context
from .coordination import (
    AsyncBarrier,
    AsyncEvent,
    AsyncLock,
    AsyncQueue,
    AsyncSemaphore,
    Barrier,
    Event,
    Lock,
    Queue,
    Semaphore,
)
from .exceptions import (
    AddressInUseError,
    AuthenticationError,
    LockLostError,
    ProcessError,
    ProcessExit,
    ProcessWaitError,
    ProtocolError,
    RemoteTraceback,
    ServerError,
    ServerUnavailableError,
    SignalException,
    TaskError,
    TimeoutError,
    UnknownFunctionError,
    ZProcError,
)
from .executor import Executor
from .process import (
    Process,
    clean_process_tree,
    exception_to_signal,
    send_signal,
    signal_to_exception,
)
from .state import (
    Pipeline,
    State,
    StateUpdate,
    StateWatcher,
    append,
    atomic,
    decrease,
    increase,
    ping,
    stats,
)
from .swarm import SequenceTaskResult, SimpleTaskResult, Swarm

__all__ = [
    "AddressInUseError",
    "AsyncBarrier",
    "AsyncEvent",
    "AsyncLock",
    "AsyncPipeline",
    "AsyncQueue",
    "AsyncSemaphore",
    "AsyncState",
    "AsyncStateWatcher",
    "AuthenticationError",
    "Barrier",
    "Context",
    "Event",
    "Executor",
    "Lock",
    "LockLostError",
    "Pipeline",
    "Process",
    "ProcessError",
    "ProcessExit",
    "ProcessWaitError",
    "ProtocolError",
    "Queue",
    "RemoteTraceback",
    "Semaphore",
    "SequenceTaskResult",
    "ServerAddress",
    "ServerError",
    "ServerUnavailableError",
    "SignalException",
    "SimpleTaskResult",
    "State",
    "StateUpdate",
    "StateWatcher",
    "Swarm",
    "TaskDetail",
    "TaskError",
    "TimeoutError",
    "UnknownFunctionError",
    "ZProcError",
    "__version__",
    "append",
    "atomic",
    "clean_process_tree",
    "consume",
    "create_ipc_address",
    "decrease",
    "exception_to_signal",
    "increase",
    "ping",
    "send_signal",
    "signal_to_exception",
    "start_server",
    "stats",
]

# Silent by default: server events, rejected peers and retries go to the "zproc" logger;
# an application that configures logging sees them.
_logging.getLogger("zproc").addHandler(_logging.NullHandler())
