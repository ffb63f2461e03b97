"""`exchange`, the server's send-and-receive: replies are collected as they arrive (not every 3 s,
as Flower's HttpGrid polls), and whatever came in by the timeout is what the round gets."""

from __future__ import annotations

import time

import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from server.server_app import exchange

pytestmark = pytest.mark.usefixtures("task_identity")


class _SlowGrid:
    """Push/pull as Flower's grids do them: node n answers `delays[n]` s after the push (None: never)."""

    def __init__(self, delays: dict[int, float | None]) -> None:
        self.delays, self.asked, self.pushed_at, self.pulls = delays, [], 0.0, 0

    def push_messages(self, messages: list[Message]) -> list[str]:
        self.asked, self.pushed_at = list(messages), time.time()
        for msg in self.asked:
            msg.metadata.__dict__["_message_id"] = msg.object_id
        return [msg.metadata.message_id for msg in self.asked]

    def pull_messages(self, message_ids: set[str]) -> list[Message]:
        self.pulls += 1
        waited = time.time() - self.pushed_at
        return [Message(RecordDict({"metrics": MetricRecord({"node": ask.metadata.dst_node_id})}), reply_to=ask)
                for ask in self.asked if ask.metadata.message_id in message_ids
                and self.delays[ask.metadata.dst_node_id] is not None and waited >= self.delays[ask.metadata.dst_node_id]]


def _asks(*nodes: int) -> list[Message]:
    return [Message(RecordDict({"config": ConfigRecord({"n": n})}), dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]


def test_every_reply_is_collected_soon_after_it_arrives():
    grid, asks = _SlowGrid({1: 0.0, 2: 0.3}), _asks(1, 2)
    started = time.time()
    replies = exchange(grid, asks, timeout=10)
    assert time.time() - started < 1.0  # HttpGrid.send_and_receive would take 3 s here
    assert sorted(int(r.content["metrics"]["node"]) for r in replies) == [1, 2]
    assert {r.metadata.reply_to_message_id for r in replies} == {a.metadata.message_id for a in asks}  # ids set in place


def test_a_silent_site_costs_the_timeout_and_the_others_replies_are_kept():
    grid = _SlowGrid({1: 0.0, 2: None})
    started = time.time()
    replies = exchange(grid, _asks(1, 2), timeout=0.5)
    assert 0.5 <= time.time() - started < 1.5
    assert [int(r.content["metrics"]["node"]) for r in replies] == [1]
    assert exchange(_SlowGrid({}), [], timeout=5) == []  # nothing sent: nothing to wait for
