"""Log lines as `twofactor serve` and `twofactor worker` write them at TWOFACTOR_LOG_LEVEL=DEBUG,
captured in a string, for tests that look for secrets in them."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from twofactor_server.observability import logs

# The loggers configure_logging holds above DEBUG, put back after as the rest of the setup is.
_HELD = ("botocore", "boto3", "urllib3", "httpx", "httpcore")


@contextmanager
def debug_logs() -> Iterator[io.StringIO]:
    """JSON lines at DEBUG into the stream yielded (which starts with one DEBUG line of its own, so
    a test can tell DEBUG was on); the process's logging setup is restored after the block."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    saved_levels = {name: logging.getLogger(name).level for name in _HELD}
    stream = io.StringIO()
    try:
        logs.configure_logging("DEBUG", "json", stream)
        logging.getLogger("twofactor_server.test").debug("DEBUG is on")
        yield stream
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved_handlers:
            root.addHandler(handler)
        root.setLevel(saved_level)
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)
