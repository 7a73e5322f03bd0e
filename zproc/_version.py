"""The version of zproc, in one place (read by the package, the server and the build)."""

from __future__ import annotations

__version__ = "1.0.0.dev0"
