"""Context.call_when_*: a process calls the handler once per qualifying change."""

from __future__ import annotations

import time
from typing import Any

import pytest

import zproc


def wait_for(state: zproc.State, key: str, value: Any, timeout: float = 10) -> Any:
    return state.get_when(lambda s: s.get(key) == value, timeout=timeout)


def warm_up(ctx: zproc.Context, key: str, reacted: Any) -> None:
    """Write ``key`` until the handler process has reacted once (it is up and watching)."""
    deadline = time.monotonic() + 20
    i = 0
    while not reacted(ctx.state.copy()):
        assert time.monotonic() < deadline, "the handler process never reacted"
        ctx.state[key] = i
        i += 1
        time.sleep(0.05)
    time.sleep(0.3)  # let the warm-up changes drain


def test_call_when_change_without_keys_fires_on_any_change(ctx: zproc.Context) -> None:
    ctx.state["calls"] = 0

    @ctx.call_when_change(live=False)
    def count(state: zproc.State) -> None:
        zproc.increase(state, "calls")  # its own write does not retrigger it

    warm_up(ctx, "warm", lambda s: s["calls"] > 0)
    base = ctx.state["calls"]
    for i in range(5):
        ctx.state["x"] = i
    wait_for(ctx.state, "calls", base + 5)
    time.sleep(0.3)
    assert ctx.state["calls"] == base + 5  # once per change, never spinning
    count.stop()


def test_call_when_change_exclude_is_a_keyword(ctx: zproc.Context) -> None:
    """B5: exclude reaches the watcher as a flag, not as an extra key."""
    ctx.state["seen"] = []

    @ctx.call_when_change("a", exclude=True, live=False, pass_value=True)
    def record(snapshot: dict[str, Any], state: zproc.State) -> None:
        zproc.append(state, "seen", sorted(str(k) for k in snapshot if k != "seen"))

    warm_up(ctx, "warm", lambda s: len(s["seen"]) > 0)
    base = len(ctx.state["seen"])
    ctx.state["a"] = 1  # excluded: no call
    ctx.state["b"] = 1  # qualifies
    ctx.state.get_when(lambda s: len(s["seen"]) == base + 1, timeout=10)
    assert ctx.state["seen"][-1] == ["a", "b", "warm"]
    ctx.state[False] = 1  # the key False is an ordinary key here
    ctx.state.get_when(lambda s: len(s["seen"]) == base + 2, timeout=10)
    time.sleep(0.3)
    assert len(ctx.state["seen"]) == base + 2
    record.stop()


def test_call_when_equal_runs_once_per_change_not_in_a_loop(ctx: zproc.Context) -> None:
    """B6: while the condition merely stays true the handler is not called again."""
    ctx.state.update(a=5, calls=0)

    @ctx.call_when_equal("a", 5, live=False)
    def handler(state: zproc.State) -> None:
        zproc.increase(state, "calls")

    wait_for(ctx.state, "calls", 1)  # the initial check fires once
    time.sleep(0.5)
    assert ctx.state["calls"] == 1
    ctx.state["a"] = 6
    ctx.state["a"] = 5
    wait_for(ctx.state, "calls", 2)
    ctx.state["other"] = 1  # a = 5 still holds: this change qualifies too
    wait_for(ctx.state, "calls", 3)
    time.sleep(0.3)
    assert ctx.state["calls"] == 3
    handler.stop()


def test_pass_value_args_and_stateless_handlers(ctx: zproc.Context) -> None:
    ctx.state["out"] = None

    @ctx.call_when_not_none("job", pass_value=True, stateful=False,
                            args=(ctx.server_address,), kwargs={"suffix": "!"})
    def handler(value: Any, address: Any, suffix: str) -> None:
        with zproc.State(address) as st:
            st["out"] = f"{value}{suffix}"

    ctx.state["job"] = "done"  # the initial check sees it even if the process starts late
    assert wait_for(ctx.state, "out", "done!")["out"] == "done!"
    assert "handler" in repr(handler)
    handler.stop()


def test_buffered_handler_sees_every_change(ctx: zproc.Context) -> None:
    ctx.state.update(seen=[], n=0)

    @ctx.call_when(lambda s: "n" in s, live=False, pass_value=True)
    def collect(snapshot: dict[str, Any], state: zproc.State) -> None:
        time.sleep(0.05)  # slower than the writer: changes queue up, none is lost
        zproc.append(state, "seen", snapshot["n"])

    wait_for(ctx.state, "seen", [0])  # the initial check: the process is up
    for i in range(1, 6):
        ctx.state["n"] = i
    ctx.state.get_when(lambda s: len(s["seen"]) == 6, timeout=10)
    assert ctx.state["seen"] == [0, 1, 2, 3, 4, 5]
    collect.stop()


def test_process_exit_ends_the_loop(ctx: zproc.Context) -> None:
    @ctx.call_when_available("stop")
    def stopper(state: zproc.State) -> None:
        raise zproc.ProcessExit(0)

    ctx.state["stop"] = True
    assert stopper.wait(timeout=10) is None
    assert stopper.exitcode == 0


def test_timeout_is_rejected(ctx: zproc.Context) -> None:
    with pytest.raises(TypeError):
        ctx.call_when_change("a", timeout=1)

