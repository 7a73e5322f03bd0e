"""Progress reports for long operations: a tqdm bar when tqdm is installed, plain text else.

tqdm is optional (``pip install "zproc[progress]"``). Without it, a :class:`Progress`
writes ``"<what>: done/total (percent)"`` to stderr: redrawn in place on a terminal, one
line per second otherwise (logs and CI output stay short), and always once at the end.
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Iterator, Sized
from typing import Any, TextIO

__all__ = ["Progress", "track"]

#: Seconds between two plain-text reports when stderr is not a terminal.
LINE_INTERVAL = 1.0
#: Seconds between two redraws on a terminal.
TTY_INTERVAL = 0.1


class Progress:
    """Counts finished items out of ``total`` and shows it.

    Parameters
    ----------
    total
        How many items there are.
    what
        A short label, e.g. ``"process_map"``.
    stream
        Where the plain-text report goes (default: ``sys.stderr``); with ``stream`` given,
        tqdm is not used.
    """

    def __init__(self, total: int, what: str, stream: TextIO | None = None) -> None:
        self.total = total
        self.done = 0
        self.what = what
        self._bar: Any = None
        self._stream = stream
        if stream is None:
            try:
                tqdm = importlib.import_module("tqdm").tqdm
            except ImportError:
                self._stream = sys.stderr
            else:
                self._bar = tqdm(total=total, desc=what, unit="item", dynamic_ncols=True)
        self._tty = self._stream is not None and _isatty(self._stream)
        self._interval = TTY_INTERVAL if self._tty else LINE_INTERVAL
        self._last = time.monotonic()
        self._closed = False

    def update(self, count: int) -> None:
        """Record ``count`` more finished items."""
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
            return
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            self._report()

    def close(self) -> None:
        """Show the final count (once) and release the bar."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
            return
        self._report()
        if self._tty:
            self._write("\n")

    def _report(self) -> None:
        percent = 100 * self.done // self.total if self.total else 100
        text = f"{self.what}: {self.done}/{self.total} ({percent}%)"
        self._write(f"\r{text}" if self._tty else f"{text}\n")

    def _write(self, text: str) -> None:
        assert self._stream is not None
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):  # a closed or broken stream never fails the work
            pass

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def track(
    parts: Iterator[Sized], total: int, what: str, stream: TextIO | None = None
) -> Iterator[Any]:
    """Yield ``parts`` (lists of results) unchanged, counting their items as they pass.

    Closing the returned generator closes ``parts`` too.
    """
    progress = Progress(total, what, stream)
    try:
        for part in parts:
            progress.update(len(part))
            yield part
    finally:
        progress.close()
        close = getattr(parts, "close", None)
        if close is not None:
            close()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
