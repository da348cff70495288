"""Progress bars for fastrank's long steps (encoding, index builds, searches, training).

On a terminal they are tqdm's bars. Anywhere else (a CI log, ``2> file``, a pipe) a redrawn bar would
flood the log with carriage-return frames, so the bar is written as a plain line at most every
:data:`LOG_INTERVAL_S` seconds and at its end, and only for steps that run that long: a quick step prints
nothing. ``progress=False`` silences a bar everywhere.
"""
from __future__ import annotations

import io
import sys
import time

LOG_INTERVAL_S = 30.0


class _LogLines(io.TextIOBase):
    """tqdm's output as log lines: each redraw ("\\r" + status) becomes one line, once the bar has lived
    :data:`LOG_INTERVAL_S` seconds."""

    def __init__(self, stream):
        self._stream, self._born, self._last = stream, time.monotonic(), None

    def write(self, s: str) -> int:
        line = s.replace("\r", "").replace("\x1b[A", "").rstrip()
        if line and line != self._last and time.monotonic() - self._born >= LOG_INTERVAL_S:
            self._stream.write(line + "\n")
            self._stream.flush()
            self._last = line
        return len(s)

    def flush(self) -> None:
        self._stream.flush()


def is_terminal(stream=None) -> bool:
    """Whether ``stream`` (default stderr, where bars go) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(iterable=None, *, enabled: bool = True, **kw):
    """``tqdm(iterable, **kw)`` on a terminal; sparse log lines elsewhere (see the module docstring)."""
    from tqdm.auto import tqdm

    if not enabled:
        return tqdm(iterable, disable=True, **kw)
    stream = kw.pop("file", None) or sys.stderr
    if is_terminal(stream):
        return tqdm(iterable, file=stream, **kw)
    return tqdm(iterable, file=_LogLines(stream), mininterval=LOG_INTERVAL_S, ascii=True, ncols=100, **kw)
