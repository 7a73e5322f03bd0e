"""Progress reports: process_map(progress=True) with tqdm and without it."""

from __future__ import annotations

import io
import sys

import pytest

import zproc
from zproc._progress import Progress, track


def square(x: int) -> int:
    return x * x


def test_plain_text_report_ends_with_the_final_count() -> None:
    out = io.StringIO()
    with Progress(10, "work", stream=out) as progress:
        for _ in range(10):
            progress.update(1)
    progress.close()  # a second close writes nothing more
    lines = out.getvalue().splitlines()
    assert lines[-1] == "work: 10/10 (100%)"
    assert lines.count("work: 10/10 (100%)") == 1


def test_plain_text_report_of_an_empty_total() -> None:
    out = io.StringIO()
    Progress(0, "nothing", stream=out).close()
    assert out.getvalue() == "nothing: 0/0 (100%)\n"


def test_track_counts_parts_and_closes_the_source() -> None:
    closed: list[bool] = []

    def parts() -> object:
        try:
            yield [1, 2, 3]
            yield [4, 5]
            yield [6]
        finally:
            closed.append(True)

    out = io.StringIO()
    tracked = track(parts(), 6, "parts", stream=out)  # type: ignore[arg-type]
    assert next(tracked) == [1, 2, 3]
    tracked.close()
    assert closed == [True]
    assert out.getvalue().splitlines()[-1] == "parts: 3/6 (50%)"


def test_process_map_progress_with_tqdm(
    ctx: zproc.Context, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("tqdm")
    results = list(ctx.process_map(square, range(2000), count=2, progress=True))
    assert results == [x * x for x in range(2000)]
    err = capsys.readouterr().err
    assert "process_map" in err
    assert "2000/2000" in err


def test_process_map_progress_without_tqdm(
    ctx: zproc.Context, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    results = list(ctx.process_map(square, range(2000), count=2, progress=True))
    assert results == [x * x for x in range(2000)]
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == "process_map: 2000/2000 (100%)"


def test_process_map_without_progress_prints_nothing(
    ctx: zproc.Context, capsys: pytest.CaptureFixture[str]
) -> None:
    assert list(ctx.process_map(square, range(100), count=2)) == [x * x for x in range(100)]
    assert capsys.readouterr().err == ""
