"""add_session_cell.lua: every line of its Returns block, and the state it leaves."""

from __future__ import annotations

# Returns: 1


async def test_add_session_cell_new_to_the_set_is_1(scheduler, redis, keys):
    assert await scheduler.add_session_cell("s1", "b") is True

    assert await redis.smembers(keys.session_cells("s1")) == {b"b"}
    ttl = await redis.pttl(keys.session_cells("s1"))
    assert 0 < ttl <= scheduler.session_ttl_ms()
    assert await scheduler.session_cells("s1") == ("b",)


# Returns: 0


async def test_add_session_cell_already_there_is_0_and_renews_the_ttl(scheduler, redis, keys):
    await scheduler.add_session_cell("s1", "b")
    await redis.pexpire(keys.session_cells("s1"), 1000)

    assert await scheduler.add_session_cell("s1", "b") is False
    assert await scheduler.add_session_cell("s1", "c") is True

    assert await scheduler.session_cells("s1") == ("b", "c")
    assert await redis.pttl(keys.session_cells("s1")) > 1000
    assert await scheduler.session_cells("s2") == ()  # another session: nothing
