"""Closed-loop unary gRPC calls over plain HTTP/2, from one thread: the bench's cheap client (issue 13).

grpcio's client costs 160-250 µs of CPU per unary call on these machines, whichever
shape it takes (blocking threads, futures, grpc.aio; bench/README.md): on 2 shared
cores it takes the CPU the server would use, and the throughput measured is the
client's as much as the server's. This client speaks the protocol itself, as a
load generator such as ghz or h2load does: `connections` TCP connections to the
server, one call in flight on each (the shape of loadgen's threads, one channel
each, as the server sees it), driven by one thread with epoll. A call is a HEADERS
frame (a header block built once: nothing in it changes between calls) and a DATA
frame with the serialized request; its reply is the DATA frame's message.

What it does not do, on purpose: it never decodes the server's header blocks (HPACK),
so it cannot read grpc-status. It needs not: a unary call whose stream ends with
a message is answered by the server's handler, and the caller judges that message
(Verify: result ACCEPTED); a stream that ends without a message is an error
(`NO_MESSAGE`: the server answered with a status alone), as is RST_STREAM; GOAWAY
ends the phase with ConnectionError.
It sends no more than the server's connection window allows, answers SETTINGS and
PING, and keeps its own receive window open. Plain text only (`h2c`), as the bench's
server listens.

    result = run_closed_loop(target, metadata, connections, next_call, retry_at, kind, start, end)

bench/loadgen.py runs its Health/Check and Verify phases with it when its clients are
made with client="h2" (the bench scripts' `--client h2`).
"""

from __future__ import annotations

import math
import selectors
import socket
import struct
import time
from collections.abc import Callable, Sequence

from loadgen import PhaseResult

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PING, _GOAWAY, _WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
_END_STREAM, _ACK, _PADDED = 0x1, 0x1, 0x8
_MAX_WINDOW = 2**31 - 1
_DEFAULT_WINDOW = 65_535
_SETTING_ENABLE_PUSH, _SETTING_INITIAL_WINDOW_SIZE = 0x2, 0x4

# What a phase asks for each call: (path, serialized request, judge), or None when there is
# nothing fresh to send until retry_at() (time.time()). judge(reply message) gives the call's
# outcome: "ok" (the answer expected), "rejected" (counted as PhaseResult.rejected) or an
# error name (counted in PhaseResult.errors).
Judge = Callable[[bytes], str]
NextCall = Callable[[float], "tuple[str, bytes, Judge] | None"]


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big") + payload


def _literal(name: bytes, value: bytes) -> bytes:
    """An HPACK literal header field without indexing, new name, no Huffman (RFC 7541 §6.2.2):
    it changes no table on either side."""
    return b"\x00" + _length(name) + name + _length(value) + value


def _length(text: bytes) -> bytes:
    """An HPACK string length, 7-bit prefix (RFC 7541 §5.1), Huffman bit clear."""
    size = len(text)
    if size < 127:
        return bytes((size,))
    encoded, size = bytearray((127,)), size - 127
    while size >= 128:
        encoded.append(size & 0x7F | 0x80)
        size >>= 7
    encoded.append(size)
    return bytes(encoded)


def header_block(authority: str, path: str, metadata: Sequence[tuple[str, str]]) -> bytes:
    """The request's header block, the same for every call to `path` (RFC 7540 §8.1.2, gRPC's
    PROTOCOL-HTTP2): :method POST and :scheme http from HPACK's static table (indices 3 and 6)."""
    block = b"\x83\x86" + _literal(b":path", path.encode()) + _literal(b":authority", authority.encode())
    block += _literal(b"content-type", b"application/grpc") + _literal(b"te", b"trailers")
    for name, value in metadata:
        block += _literal(name.encode(), value.encode())
    return block


class _Stream:
    __slots__ = ("began", "judge", "message")

    def __init__(self, judge: Judge, began: float) -> None:
        self.judge = judge
        self.message = bytearray()
        self.began = began


class _Connection:
    """One HTTP/2 connection with at most one call in flight."""

    def __init__(self, host: str, port: int, authority: str, metadata: Sequence[tuple[str, str]]) -> None:
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self._authority = authority
        self._metadata = metadata
        self._blocks: dict[str, bytes] = {}
        self.next_stream = 1
        self.send_window = _DEFAULT_WINDOW  # the server's connection window for our DATA
        self.received = 0  # DATA bytes received since we last opened our window
        self.inbound = bytearray()
        self.outbound = bytearray(
            _PREFACE
            + _frame(
                _SETTINGS,
                0,
                0,
                struct.pack(">HI", _SETTING_ENABLE_PUSH, 0)
                + struct.pack(">HI", _SETTING_INITIAL_WINDOW_SIZE, _MAX_WINDOW),
            )
            + _frame(_WINDOW_UPDATE, 0, 0, (_MAX_WINDOW - _DEFAULT_WINDOW).to_bytes(4, "big"))
        )
        self.stream: _Stream | None = None  # the call in flight
        self.waiting: tuple[str, bytes, Judge] | None = None  # a call the send window holds back

    def start(self, path: str, request: bytes, judge: Judge) -> bool:
        """Queue a call; False when the server's window holds it back until a WINDOW_UPDATE."""
        message = b"\x00" + len(request).to_bytes(4, "big") + request
        if len(message) > self.send_window:
            self.waiting = (path, request, judge)
            return False
        block = self._blocks.get(path)
        if block is None:
            block = self._blocks[path] = header_block(self._authority, path, self._metadata)
        stream = self.next_stream
        self.next_stream += 2
        self.send_window -= len(message)
        self.outbound += _frame(_HEADERS, 0x4, stream, block)  # END_HEADERS
        self.outbound += _frame(_DATA, _END_STREAM, stream, message)
        self.stream = _Stream(judge, time.perf_counter())
        return True

    def flush(self) -> None:
        while self.outbound:
            try:
                sent = self.sock.send(self.outbound)
            except BlockingIOError:
                # Tiny frames on a local socket: the buffer is never full for long.
                selectors.DefaultSelector().select(0.01)
                continue
            del self.outbound[:sent]

    def read(self) -> list[tuple[_Stream, str]]:
        """Take what arrived; returns the calls that ended: (stream, "ok"|"rejected"|error name)."""
        chunk = self.sock.recv(262_144)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        buffer = self.inbound
        buffer += chunk
        ended: list[tuple[_Stream, str]] = []
        position = 0
        size = len(buffer)
        while size - position >= 9:
            length = int.from_bytes(buffer[position : position + 3], "big")
            end = position + 9 + length
            if end > size:
                break
            kind, flags = buffer[position + 3], buffer[position + 4]
            stream_id = int.from_bytes(buffer[position + 5 : position + 9], "big") & 0x7FFFFFFF
            payload = bytes(buffer[position + 9 : end])
            position = end
            if kind == _DATA:
                self.received += length
                if flags & _PADDED:
                    payload = payload[1 : len(payload) - payload[0]]
                if self.stream is not None:
                    self.stream.message += payload
                if flags & _END_STREAM:
                    ended.append(self._end(stream_id))
            elif kind == _HEADERS:
                if flags & _END_STREAM:  # the trailers (or a status alone)
                    ended.append(self._end(stream_id))
            elif kind == _SETTINGS:
                if not flags & _ACK:
                    self.outbound += _frame(_SETTINGS, _ACK, 0)
            elif kind == _PING:
                if not flags & _ACK:
                    self.outbound += _frame(_PING, _ACK, 0, payload)
            elif kind == _WINDOW_UPDATE:
                if stream_id == 0:
                    self.send_window += int.from_bytes(payload, "big") & 0x7FFFFFFF
            elif kind == _RST_STREAM:
                ended.append(self._end(stream_id, "RST_STREAM"))
            elif kind == _GOAWAY:
                raise ConnectionError(
                    f"the server sent GOAWAY (error code {int.from_bytes(payload[4:8], 'big')})"
                )
            # CONTINUATION frames carry only header fields, which this client does not read.
        del buffer[:position]
        if self.received > _MAX_WINDOW // 2:
            self.outbound += _frame(_WINDOW_UPDATE, 0, 0, self.received.to_bytes(4, "big"))
            self.received = 0
        return ended

    def _end(self, stream_id: int, error: str = "") -> tuple[_Stream, str]:
        stream = self.stream
        if stream is None or stream_id != self.next_stream - 2:
            raise ConnectionError(f"stream {stream_id} ended, which this client has not in flight")
        self.stream = None
        if error:
            return stream, error
        message = bytes(stream.message)
        if len(message) < 5 or message[0] or int.from_bytes(message[1:5], "big") != len(message) - 5:
            return stream, "NO_MESSAGE"  # a status alone: the server refused the call
        return stream, stream.judge(message[5:])

    def close(self) -> None:
        self.sock.close()


def run_closed_loop(
    target: str,
    metadata: Sequence[tuple[str, str]],
    connections: int,
    next_call: NextCall,
    retry_at: Callable[[], float],
    kind: str,
    start: float,
    end: float,
) -> PhaseResult:
    """Calls from `connections` connections, one in flight on each, each next one sent as the
    last one's reply arrives, from `start` to `end` (time.time()); a call that ends after `end`
    is not counted. `next_call(now)` gives each call, or None when nothing is fresh until
    `retry_at()`: the connection then waits, counted as starved. A `retry_at()` of infinity
    says no call will come again: the phase ends as soon as every call sent is answered (a
    test's fixed set of calls, `end` then only its bound)."""
    host, _, port = target.rpartition(":")
    result = PhaseResult(kind, end - start)
    slots = [_Connection(host, int(port), target, metadata) for _ in range(connections)]
    selector = selectors.DefaultSelector()
    for slot in slots:
        selector.register(slot.sock, selectors.EVENT_READ, slot)
    idle: dict[_Connection, float] = {}  # connections waiting for a fresh call (starved), since when
    try:
        for slot in slots:
            slot.flush()
        delay = start - time.time()
        if delay > 0:
            time.sleep(delay)

        def launch(slot: _Connection, now: float) -> None:
            call = next_call(now)
            if call is None:
                idle[slot] = now
            else:
                slot.start(*call)

        now = time.time()
        for slot in slots:
            launch(slot, now)
        for slot in slots:
            slot.flush()
        latencies = result.latencies_ms
        while True:
            now = time.time()
            busy = any(slot.stream is not None or slot.waiting is not None for slot in slots)
            if not busy and len(idle) == len(slots) and retry_at() == math.inf:
                break  # nothing sent is unanswered, and nothing more will be sent
            if now >= end and not busy:
                result.starved_seconds += sum(max(0.0, end - since) for since in idle.values())
                break
            if idle and now >= min(end, retry_at()):
                waking = list(idle.items())
                idle.clear()
                for slot, since in waking:
                    result.starved_seconds += max(0.0, min(now, end) - since)
                    if now < end:
                        launch(slot, now)
                    slot.flush()
                continue
            timeout = max(0.0, (min(end, retry_at()) if idle else end) - now) if now < end else 1.0
            events = selector.select(timeout)
            if not events and now >= end:
                if busy and time.time() > end + 10:
                    result.errors["UNANSWERED"] += sum(1 for slot in slots if slot.stream is not None)
                    break
                continue
            for key, _ in events:
                slot = key.data
                for stream, outcome in slot.read():
                    finished = time.perf_counter()
                    if outcome == "ok":
                        if time.time() <= end:
                            latencies.append((finished - stream.began) * 1000)
                    elif outcome == "rejected":
                        result.rejected += 1
                    else:
                        result.errors[outcome] += 1
                    if time.time() < end:
                        launch(slot, time.time())
                if slot.waiting is not None and slot.stream is None:
                    waiting, slot.waiting = slot.waiting, None
                    slot.start(*waiting)
                slot.flush()
    finally:
        selector.close()
        for slot in slots:
            slot.close()
    return result
