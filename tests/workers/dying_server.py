"""A server whose dispatcher kills its own process with SIGKILL: the challenge is committed, and
the process dies before publishing it (fault injection for the outbox recovery tests).

Run as a script; configured by TWOFACTOR_* variables like `twofactor serve`. Prints its port.
"""

from __future__ import annotations

import os
import signal

from twofactor_server.app import create_server
from twofactor_server.settings import Settings


class DiesBeforePublishing:
    def dispatch(self, challenge_id: str, *, method: str = "") -> None:
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    server, port = create_server(Settings.from_env(), dispatcher=DiesBeforePublishing())
    server.start()
    print(port, flush=True)
    server.wait()
