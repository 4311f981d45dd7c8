"""Messages handed to the hub from ``data_received`` (hub/wsconn.py).

Whole messages skip websockets' assembler; fragmented ones go through it, in
order with the others; bad UTF-8 closes the connection with 1007.
"""

from __future__ import annotations

import orjson
from websockets.asyncio.client import ClientConnection

from hub.app import Hub
from hub.wsconn import HubConnection
from tests.hubtools import Connect, expect, expect_closed, open_node, open_session, submit


def job_text(ref: str) -> str:
    return orjson.dumps({"type": "job", "ref": ref, "src_lang": "en", "tgt_lang": "fr"}).decode()


async def test_fragmented_job_is_handled_in_order_with_whole_ones(
    hub: Hub, connect: Connect
) -> None:
    await open_node(connect, hub, "gpu-1", max_jobs=4)
    session: ClientConnection = await open_session(connect, hub)
    link = next(iter(hub.registry.sessions.values()))
    assert isinstance(link.ws, HubConnection) and link.ws.on_message is not None

    text = job_text("fragmented")
    await session.send([text[:10], text[10:25], text[25:]])  # three frames, one message
    await submit(session, "whole")

    await expect(session, "accepted", ref="fragmented")
    await expect(session, "accepted", ref="whole")


async def test_text_frame_with_bad_utf8_closes_1007_and_harms_no_one_else(
    hub: Hub, connect: Connect
) -> None:
    await open_node(connect, hub, "gpu-1")
    bad = await open_session(connect, hub)
    good = await open_session(connect, hub)

    await bad.send(b'{"type": "job", "ref": "\xff"}', text=True)

    await expect_closed(bad, 1007)
    await submit(good, "c-1")
    await expect(good, "accepted", ref="c-1")
