"""``python -m zproc``: the ``zproc`` command line (see :mod:`zproc._cli`)."""

from __future__ import annotations

from ._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
