"""hub/redisconn.py: hiredis packing, the same bytes as redis-py, on every URL scheme."""

from __future__ import annotations

import asyncio
import enum
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from redis import exceptions as redis_errors
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from hub.embedded import EmbeddedRedis
from hub.redisconn import (
    HiredisConnection,
    HiredisSSLConnection,
    HiredisUnixDomainSocketConnection,
    client_from_url,
)
from loadtest.procs import RedisProcess
from tests.helpers import MS


class Code(enum.IntEnum):
    LOST = -4


COMMANDS: list[tuple[Any, ...]] = [
    ("PING",),
    # redis-py splits a command name of several words (the handshake sends these).
    ("CLIENT SETINFO", "LIB-NAME", "redis-py"),
    (b"CONFIG GET", b"maxmemory"),
    (
        "EVALSHA",
        "0" * 40,
        2,
        "hub:v1:{c}:job:1",
        "hub:v1:{c}:node:n1",
        b'{"text":"\xc3\xa9"}',
        b"\x00\xff" * 20_000,  # audio: larger than redis-py's buffer cutoff
        memoryview(b"view"),
        "été",
        -3,
        2**70,
        1.5,
        0.1,
        float("inf"),
        "",
    ),
    # Types hiredis does not take: redis-py's packer decides.
    ("SET", bytearray(b"k"), Code.LOST),
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: str(c[0]))
def test_connection_packs_the_bytes_redis_py_packs(command):
    expected = b"".join(Connection().pack_command(*command))

    assert b"".join(HiredisConnection().pack_command(*command)) == expected


def test_connection_packs_a_pipeline_one_bytes_per_command():
    expected = b"".join(Connection().pack_commands(COMMANDS))

    packed = HiredisConnection().pack_commands(COMMANDS)

    assert b"".join(packed) == expected
    assert len(packed) == len(COMMANDS)


@pytest.mark.parametrize("value", [True, None, [1]], ids=repr)
def test_connection_refuses_what_redis_py_refuses(value):
    with pytest.raises(redis_errors.DataError) as raised:
        HiredisConnection().pack_command("SET", "k", value)

    assert str(raised.value).startswith("Invalid input of type")


def test_connection_with_another_encoding_packs_with_redis_py():
    command = ("SET", "k", "é")
    expected = b"".join(Connection(encoding="latin-1").pack_command(*command))

    packed = HiredisConnection(encoding="latin-1").pack_command(*command)

    assert b"".join(packed) == expected
    assert b"\xe9" in expected


def test_connection_with_another_encoding_packs_a_pipeline_with_redis_py():
    commands = [("SET", "k", "é"), ("GET", "k")]
    expected = Connection(encoding="latin-1").pack_commands(commands)

    assert HiredisConnection(encoding="latin-1").pack_commands(commands) == expected


@pytest.mark.parametrize("packed", [b"*1\r\n$4\r\nPING\r\n", "*1\r\n$4\r\nPING\r\n"], ids=type)
async def test_connection_sends_an_already_packed_command(redis_server: RedisProcess, packed):
    client = client_from_url(redis_server.url, socket_timeout=5, retry=Retry(NoBackoff(), 0))
    try:
        conn = await client.connection_pool.get_connection()
        try:
            await conn.send_packed_command(packed)
            assert await conn.read_response() == b"PONG"
        finally:
            await client.connection_pool.release(conn)
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("url", "connection_class"),
    [
        ("redis://127.0.0.1:6379/0", HiredisConnection),
        ("rediss://127.0.0.1:6379/0", HiredisSSLConnection),
        ("unix:///tmp/redis.sock?db=1", HiredisUnixDomainSocketConnection),
    ],
)
async def test_client_from_url_uses_hiredis_connections(url, connection_class):
    client = client_from_url(url, socket_timeout=1.5, db=3)
    try:
        pool = client.connection_pool
        assert pool.connection_class is connection_class
        assert pool.connection_kwargs["socket_timeout"] == 1.5
        # As in redis-py, the URL wins over keyword arguments.
        assert pool.connection_kwargs["db"] == (1 if url.startswith("unix") else 0)
    finally:
        await client.aclose()


def test_client_from_url_refuses_other_schemes():
    with pytest.raises(ValueError, match="Redis URL must specify"):
        client_from_url("http://127.0.0.1:6379")


async def check_round_trips(url: str) -> None:
    client = client_from_url(url, socket_timeout=5, retry=Retry(NoBackoff(), 0))
    try:
        audio = os.urandom(100_000)
        await client.set("redisconn:audio", audio)
        pipe = client.pipeline(transaction=False)
        pipe.get("redisconn:audio")
        pipe.incr("redisconn:audio")  # an error reply in the middle
        pipe.strlen("redisconn:audio")
        got, error, length = await pipe.execute(raise_on_error=False)
        assert got == audio
        assert isinstance(error, redis_errors.ResponseError)
        assert length == len(audio)
        # The handshake's CLIENT SETINFO went out as two words.
        info = await client.client_info()
        assert info["lib-name"] == "redis-py"
        await client.delete("redisconn:audio")
    finally:
        await client.aclose()


async def test_client_talks_to_redis_over_tcp(redis_server: RedisProcess):
    await check_round_trips(redis_server.url)


async def test_client_talks_to_redis_over_a_unix_socket(redis_binary: str, tmp_path: Path):
    server = EmbeddedRedis(tmp_path / "data", binary=redis_binary, appendonly=False)
    await asyncio.to_thread(server.start)
    try:
        await check_round_trips(server.url)
    finally:
        await asyncio.to_thread(server.stop)


async def test_write_timeout_closes_the_connection(
    spawn_redis: Callable[..., RedisProcess],
):
    server = spawn_redis()
    client = client_from_url(server.url, socket_timeout=200 * MS, retry=Retry(NoBackoff(), 0))
    try:
        await client.ping()
        server.freeze()  # reads nothing: the socket buffers fill up
        try:
            with pytest.raises(redis_errors.TimeoutError, match="Timeout writing to socket"):
                await client.set("big", b"x" * 64_000_000)
        finally:
            server.thaw()
        (conn,) = client.connection_pool._available_connections
        assert not conn.is_connected
        assert await client.ping() is True
    finally:
        await client.aclose()
