"""zproc: multi-process programs around one shared state, over ZeroMQ.

A state server process holds a ``dict``; :class:`State` objects in any process read and
change it with atomic requests and block until it changes (watchers); :class:`Context`
starts the server and the processes and cleans everything up.
"""

from __future__ import annotations

__version__ = "1.0.0.dev0"

from ._server import start_server
from ._transport import ServerAddress, create_ipc_address
from .context import Context, TaskDetail
from .exceptions import (
    AddressInUseError,
    AuthenticationError,
    ProcessError,
    ProcessExit,
    ProcessWaitError,
    ProtocolError,
    RemoteTraceback,
    ServerError,
    ServerUnavailableError,
    SignalException,
    TimeoutError,
    ZProcError,
)
from .process import (
    Process,
    clean_process_tree,
    exception_to_signal,
    send_signal,
    signal_to_exception,
)
from .state import (
    State,
    StateUpdate,
    StateWatcher,
    append,
    atomic,
    decrease,
    increase,
    ping,
)

__all__ = [
    "AddressInUseError",
    "AuthenticationError",
    "Context",
    "Process",
    "ProcessError",
    "ProcessExit",
    "ProcessWaitError",
    "ProtocolError",
    "RemoteTraceback",
    "ServerAddress",
    "ServerError",
    "ServerUnavailableError",
    "SignalException",
    "State",
    "StateUpdate",
    "StateWatcher",
    "TaskDetail",
    "TimeoutError",
    "ZProcError",
    "__version__",
    "append",
    "atomic",
    "clean_process_tree",
    "create_ipc_address",
    "decrease",
    "exception_to_signal",
    "increase",
    "ping",
    "send_signal",
    "signal_to_exception",
    "start_server",
]
