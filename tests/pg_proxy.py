"""A TCP proxy to PostgreSQL for tests that shape the server's answers on their way to the client."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from urllib.parse import urlsplit, urlunsplit


class PostgresProxy:
    """Relays every connection made to `url` to the PostgreSQL server of `postgres_url`.
    Subclasses override `from_server` to change what the client gets."""

    def __init__(self, postgres_url: str) -> None:
        parts = urlsplit(postgres_url)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = urlunsplit(
            parts._replace(netloc=f"{parts.username}@127.0.0.1:{self._listener.getsockname()[1]}")
        )
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def from_server(self, data: bytes, *, first: bool) -> tuple[bytes, bool]:
        """What the client gets of the server's `data` (`first`: the connection's first answer),
        and whether the session ends there. As it is, by default."""
        return data, False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept() (close alone would not)
        self._listener.close()
        for end in self._sockets:
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=5)
        for end in self._sockets:
            end.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self._upstream)
            self._sockets += (client, server)
            self._threads.append(threading.Thread(target=self._pump, args=(client, server), daemon=True))
            self._threads[-1].start()

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        first = True
        with contextlib.suppress(OSError):
            while True:
                for ready in select.select([client, server], [], [], 30)[0]:
                    data = ready.recv(65536)
                    if not data:
                        return
                    if ready is client:
                        server.sendall(data)
                        continue
                    data, ends = self.from_server(data, first=first)
                    first = False
                    client.sendall(data)
                    if ends:  # both ends, as a terminated backend's session ends
                        for end in (client, server):
                            end.shutdown(socket.SHUT_RDWR)
                        return
