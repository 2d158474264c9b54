"""Coverage-guided fuzzing of a server-role Connection with atheris (optional).

Run from the repository root, with actorpool and its ``test`` extra installed
and atheris too (``pip install atheris``; wheels exist for CPython 3.11 on
Linux x86-64), or with ``tox -e atheris``::

    python tests/fuzz/atheris_decoder.py -atheris_runs=100000

Other libFuzzer flags work too (``-max_len=8192``, ``-seed=1``, ...). With no
corpus directory on the command line, the run starts from a temporary one
seeded with valid conversations (removed afterwards); name a directory to
keep what the run finds.

An input is laid out as::

    byte 0     bits 0-2: the frame limit (an index into LIMITS)
               bit 3: the hello comes first; bit 4: the peer then closes
    byte 1     n = byte % 7: how many read sizes follow
    n bytes    read sizes, each 1 + byte % 64, cycled over the stream
    the rest   the byte stream the client sends

The check is the one the Hypothesis tests make (:func:`wire_strategies.feed`):
only messages, ``NEED_DATA``, ``PEER_CLOSED`` or RemoteProtocolError come
out, buffering stays under one frame, and the connection is inert after an
error. A violation raises, and atheris reports the input that caused it.

Not collected by pytest (the name does not start with ``test_``).
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

import atheris

# Instrument actorpool's own code, so coverage guides the search through the
# framing, decode() and the state machine (msgpack itself is C code).
with atheris.instrument_imports(include=["actorpool"]):
    from actorpool.messages import (
        PROTOCOL_VERSION,
        CloseSession,
        Get,
        GetStatistics,
        RestartApp,
        SetMaxIdleTime,
        SetMaxPoolSize,
        Welcome,
        encode,
    )
    from actorpool.protocol import MAX_FRAME_SIZE, Connection, Role

# The checks and the helpers are imported after, and not instrumented: they
# are not what is being explored.
from wire_strategies import cut, feed, frame, hello_frame

from actorpool.protocol import MAX_REQUEST_FRAME

LIMITS = (8, 16, 64, 300, MAX_REQUEST_FRAME, MAX_FRAME_SIZE, 16, 300)
"""Frame limits an input can choose (bits 0-2 of its first byte)."""

HANDSHAKE, EOF = 0x08, 0x10


def test_one_input(data: bytes) -> None:
    """Feed one input's stream to a fresh server-role Connection and check it."""
    if len(data) < 2:
        return
    flags, count = data[0], data[1] % 7
    limit = LIMITS[flags & 0x07]
    sizes = [1 + size % 64 for size in data[2 : 2 + count]]
    stream = data[2 + count :]

    conn = Connection(Role.SERVER, max_frame_size=limit)
    if flags & HANDSHAKE and limit >= 16:
        conn.receive_data(hello_frame())
        conn.next_event()
        conn.send(Welcome(PROTOCOL_VERSION, 1, 1))
    feed(conn, cut(stream, sizes), eof=bool(flags & EOF))


def seeds() -> list[bytes]:
    """Valid conversations to start from: the mutations then reach decode()."""
    requests = [
        Get(1, "/srv/app", None),
        Get(2, "/srv/app", 2.5),
        GetStatistics(3),
        SetMaxPoolSize(4, 8),
        SetMaxIdleTime(5, 0.5),
        RestartApp(6, "/srv/app"),
        CloseSession(7),
    ]
    stream = b"".join(frame(encode(message)) for message in requests)
    return [
        bytes([HANDSHAKE | 4, 0]) + stream,  # after the hello, one read
        bytes([HANDSHAKE | EOF | 4, 2, 3, 10]) + stream,  # cut, then closed
        bytes([4, 0]) + hello_frame() + stream,  # the hello in the stream
        bytes([HANDSHAKE | 3, 1, 0]) + stream,  # a small limit, byte by byte
    ]


def main() -> None:
    argv = list(sys.argv)
    if not any(os.path.isdir(arg) for arg in argv[1:] if not arg.startswith("-")):
        corpus = tempfile.mkdtemp(prefix="actorpool-atheris-")
        atexit.register(shutil.rmtree, corpus, ignore_errors=True)
        for number, seed in enumerate(seeds()):
            with open(os.path.join(corpus, f"seed-{number}"), "wb") as file:
                file.write(seed)
        argv.append(corpus)
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
