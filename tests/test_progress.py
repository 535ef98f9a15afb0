"""Progress of long commands where no terminal shows a bar: throttled log lines with rate and ETA."""

from __future__ import annotations

import logging

import pytest

from audit.progress import Progress


def test_without_a_terminal_progress_goes_to_the_log_with_rate_and_eta(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="audit.progress")
    with Progress("kNN join", "query", 300, tasks=3, every_s=0) as progress:
        assert progress.bar is not None and progress.bar.disable  # pytest captures output: no TTY
        for _ in range(3):
            progress.update(100)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert lines[-1].startswith("kNN join: 3/3 shards, 300/300 query, ") and "query/s, ETA 0 s" in lines[-1]


def test_log_lines_are_throttled_but_the_last_one_always_comes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="audit.progress")
    with Progress("index shards", "vector", 1000, every_s=3600) as progress:
        for _ in range(10):
            progress.update(100)
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["index shards: 1000/1000 vector"]
