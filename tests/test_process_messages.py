"""read_message: what a child process says on its ready pipe, checked."""

from __future__ import annotations

import contextlib
import math
import os
import resource
import threading
import time
from collections.abc import Iterator

import msgpack
import pytest

from actorpool.errors import SpawnError
from actorpool.spawners._process import MAX_MESSAGE, read_message


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_end, write_end = os.pipe()
    yield read_end, write_end
    for fd in (read_end, write_end):
        with contextlib.suppress(OSError):  # closed by the test
            os.close(fd)


def test_a_message_is_read_and_end_of_file_is_none(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    os.write(write_end, msgpack.packb(["ready", 42]))
    assert read_message(read_end, math.inf) == ["ready", 42]
    os.close(write_end)
    assert read_message(read_end, math.inf) is None


def test_silence_past_the_deadline_is_a_timeout(pipe: tuple[int, int]) -> None:
    with pytest.raises(TimeoutError):
        read_message(pipe[0], time.monotonic() + 0.05)


@pytest.mark.parametrize(
    "data",
    [
        b"\xc1",  # a byte msgpack never uses
        b"\x91" * 10_000 + b"\xc0",  # nested deeper than the unpacker allows
        msgpack.packb({"ready": 1}),  # msgpack, but not a list
        msgpack.packb([]),
    ],
    ids=["not-msgpack", "too-deep", "not-a-list", "empty-list"],
)
def test_garbage_is_a_spawn_error(pipe: tuple[int, int], data: bytes) -> None:
    read_end, write_end = pipe
    writer = threading.Thread(target=os.write, args=(write_end, data))
    writer.start()
    with pytest.raises(SpawnError, match="bad message"):
        read_message(read_end, math.inf)
    writer.join(5)


def test_an_oversized_message_is_a_spawn_error(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    # A string header that promises more than the limit, then as much data.
    data = b"\xdb" + (MAX_MESSAGE + 1).to_bytes(4, "big") + b"x" * (MAX_MESSAGE + 1)
    writer = threading.Thread(target=lambda: _write_all(write_end, data), daemon=True)
    writer.start()
    with pytest.raises(SpawnError, match="oversized"):
        read_message(read_end, math.inf)
    os.close(read_end)  # lets the writer give up


def _write_all(fd: int, data: bytes) -> None:
    with contextlib.suppress(OSError):  # the reader has given up
        while data:
            data = data[os.write(fd, data) :]


@pytest.fixture
def high_fd(pipe: tuple[int, int]) -> Iterator[tuple[int, int]]:
    """The pipe's read end again, as descriptor 1500: past select()'s 1024,
    where a server with many clients finds itself."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip("cannot open descriptor 1500 here")
    with contextlib.suppress(OSError):
        os.fstat(1500)
        pytest.skip("descriptor 1500 is in use")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    high = os.dup2(pipe[0], 1500)
    yield high, pipe[1]
    os.close(high)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_descriptor_past_1024_is_read(high_fd: tuple[int, int]) -> None:
    read_end, write_end = high_fd
    os.write(write_end, msgpack.packb(["ready", 7]))
    assert read_message(read_end, time.monotonic() + 5) == ["ready", 7]
