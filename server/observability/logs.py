"""Log lines as JSON or text, each carrying the context of the call or task it belongs to.

`bind(...)` puts fields (request_id, method, token, challenge_id) into a context
variable for the current call; a filter copies them onto every record written
while they are bound, and both formats print them. Handlers run a call from
start to end on one thread, so a context variable is exactly a call's scope.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TextIO

CONTEXT_FIELDS = ("request_id", "method", "token", "challenge_id")

_context: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar("log_context", default={})  # noqa: B039 - never mutated


def bound() -> Mapping[str, str]:
    """The fields bound for the current call or task."""
    return _context.get()


@contextmanager
def bind(**fields: str) -> Iterator[None]:
    """Add fields to every log line written inside the block (nested blocks add to the outer ones)."""
    token = _context.set({**_context.get(), **fields})
    try:
        yield
    finally:
        _context.reset(token)


def bind_more(**fields: str) -> None:
    """Add fields to the block already bound (the caller's token name, known after authentication)."""
    _context.set({**_context.get(), **fields})


class ContextFilter(logging.Filter):
    """Copies the bound fields onto each record, so formatters (and tests) can read them."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in _context.get().items():
            setattr(record, name, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the bound fields, and any traceback."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The classic line, with the bound fields appended as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = " ".join(
            f"{name}={getattr(record, name)}" for name in CONTEXT_FIELDS if getattr(record, name, None)
        )
        if not extra:
            return text
        first, newline, rest = text.partition("\n")  # keep a traceback below the line
        return f"{first} [{extra}]{newline}{rest}"


class EveryMinute:
    """Counts events that need no token to cause (refused streams, refused Watches) and says how
    many when at most one line a minute may be written: `count()` returns the events since the
    last line when this one should be written, else 0."""

    def __init__(self, seconds: float = 60.0) -> None:
        self._seconds = seconds
        self._lock = threading.Lock()
        self._count = 0
        self._written_at = -float("inf")

    def count(self) -> int:
        with self._lock:
            self._count += 1
            now = time.monotonic()
            if now - self._written_at < self._seconds:
                return 0
            count, self._count, self._written_at = self._count, 0, now
            return count


def said(error: BaseException) -> str:
    """What an exception says, on one line of at most 200 characters ("no detail" when nothing):
    a third party's message (Redis's reply, a socket's reason) inside one of our log lines."""
    return " ".join(str(error).split())[:200] or "no detail"


def default_format(stream: TextIO) -> str:
    """text for a person at a terminal, json for a log collector."""
    return "text" if stream.isatty() else "json"


_SECRETS_AT_DEBUG = ("botocore", "boto3")
# HTTP clients an operator's SMS class may use log each request's URL (urllib3 at DEBUG, httpx at
# INFO): a gateway that takes the text in its query string would put the code in the log.
_URLS_BELOW_WARNING = ("urllib3", "httpx", "httpcore")


def configure_logging(level: str, log_format: str, stream: TextIO | None = None) -> logging.Handler:
    """Send every log record to `stream` (default stderr) in `log_format`; returns the handler."""
    stream = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # At DEBUG, botocore logs each request's parameters (the phone number and the text with its
    # code) and its signing steps (the session token): never below INFO.
    for chatty in _SECRETS_AT_DEBUG:
        logging.getLogger(chatty).setLevel(max(logging.INFO, root.level))
    for chatty in _URLS_BELOW_WARNING:
        logging.getLogger(chatty).setLevel(max(logging.WARNING, root.level))
    logging.captureWarnings(True)  # warnings become records, in the same format
    return handler
