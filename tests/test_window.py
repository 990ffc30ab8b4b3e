"""Read windows: bounded in number, exact at the file's end."""

from __future__ import annotations

from vdifs.fs.window import AHEAD, SMALL, WINDOW, ReadWindow, Windows


def test_windows_keep_at_most_their_limit_least_recent_first() -> None:
    windows = Windows(limit=3)
    first = windows.get(1, 100)
    for fh in (2, 3, 1, 4):
        windows.get(fh, 100)
    assert windows.get(1, 100) is first  # used again before 4 came: kept
    assert len(windows._windows) == 3 and 2 not in windows._windows


def test_a_window_answers_only_what_it_holds() -> None:
    window = ReadWindow(file_size=1000)
    assert window.wants(0, 100) and not window.wants(0, SMALL)
    data = bytearray(range(256)) * 4  # 1024 bytes: past the file's end
    assert window.fill(0, 10, data) == data[:10]
    assert window.wants(10, 100)  # the first piece moved the reader on
    assert window.piece(990, 100) == data[990:1000]  # short at the end
    assert window.wants(1000, 10)
    assert window.fill(1000, 10, bytearray()) == b""  # at the end: nothing, not None
    window.fill(500, 10, bytearray(100))
    assert window.piece(499, 2) is None and window.piece(550, 100) is None
    assert window.piece(500, 100) == bytes(100)


def test_a_window_spans_a_few_requests_at_most_a_megabyte() -> None:
    # Readers that evict each other's windows then read at most AHEAD times
    # what they asked for, not a megabyte per 4 KiB.
    assert ReadWindow.span(4096) == AHEAD * 4096
    assert ReadWindow.span(SMALL - 1) == WINDOW
