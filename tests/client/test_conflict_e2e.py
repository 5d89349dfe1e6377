"""Records channels end to end: a real Node, Python clients over real sockets."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from httpkit import base_url
from nodekit import StartNode, until

from pyrt.client import Records, connect
from pyrt.conflict import CustomResolver, Mutation, Outcome, Record, Rejection
from pyrt.hub.hub import Connection, Hub, HubConfig
from pyrt.hub.protocol import CloseCode, Command, Mutate
from pyrt.node.node import Node

POLICIES = {"todo:>": "reject", "doc:>": "merge", "pos:>": "lww", "count:>": "adder"}


def add(current: Record, mutation: Mutation) -> dict[str, Any] | Rejection:
    assert mutation.value is not None
    step = mutation.value.get("add")
    if not isinstance(step, int) or step < 0:
        return Rejection("add a non-negative integer")
    return {"n": (current.value or {}).get("n", 0) + step}


class LossyHub(Hub):
    """Loses the answer to every `lose_every`-th mutation it applies, as a connection cut
    right after the hub processed it would: the frames queued for that connection are
    dropped and the connection is closed."""

    lose_every = 0

    def handle(
        self, conn: Connection, command: Command, now: float, verdict: bool | None = None
    ) -> None:
        before = self.stats.mutations  # processed for the first time (not a duplicate)
        super().handle(conn, command, now, verdict)
        applied = isinstance(command, Mutate) and self.stats.mutations > before
        if applied and self.lose_every and self.stats.mutations % self.lose_every == 0:
            conn.outbox.pop()
            self._close(conn, CloseCode.GOING_AWAY, "lost on the way")


def lossy_hub(**config: Any) -> LossyHub:
    """The hub of these tests' nodes: POLICIES, the `adder` resolver, answers lost on demand."""
    return LossyHub(HubConfig(record_policies=POLICIES, **config), resolvers={"adder": add})


def server_view(node: Node, channel: str) -> dict[str, Any]:
    return {r.key: r.value for r in node.hub.records(channel) if r.value is not None}


async def test_two_clients_edit_the_same_record_one_is_rejected_and_rolled_back(
    start_node: StartNode,
) -> None:
    node = await start_node(hub=lossy_hub())
    url = base_url(node)
    async with connect(url) as ann, connect(url) as bob:
        a = await ann.records("todo:1")
        b = await bob.records("todo:1")
        # Re-sends stop well before the hub may forget a write's key (mutation_ttl: 3600 s).
        assert a.store.resend_window == 1800
        created = await a.set("t", {"title": "milk", "done": False})
        assert created.outcome is Outcome.APPLIED
        await until(lambda: "t" in b.view)
        changes: list[frozenset[str]] = []
        a.on_change.append(lambda _records, keys: changes.append(keys))
        # Both edit the version they see, at the same time.
        ann_write = a.patch("t", {"done": True})
        bob_write = b.patch("t", {"title": "oat milk"})
        assert a.view["t"] == {"title": "milk", "done": True}  # at once, before any answer
        assert b.view["t"] == {"title": "oat milk", "done": False}
        results = {"ann": await ann_write, "bob": await bob_write}
        outcomes = sorted(r.outcome.value for r in results.values())
        assert outcomes == ["applied", "rejected"]
        loser = next(r for r in results.values() if r.outcome is Outcome.REJECTED)
        winner = next(r for r in results.values() if r.outcome is Outcome.APPLIED)
        assert loser.code == 412
        assert loser.record == winner.record  # the rejection carries the current record
        await until(lambda: a.view == b.view == server_view(node, "todo:1"))
        assert a.pending == b.pending == ()
        assert changes  # ann's view changed: at least at once, and again if rolled back
        # The loser retries on the current version and wins.
        retry = (
            a.patch("t", {"done": True})
            if results["ann"] is loser
            else b.patch("t", {"title": "oat milk"})
        )
        assert (await retry).outcome is Outcome.APPLIED
        await until(lambda: a.view == b.view == server_view(node, "todo:1"))
        assert server_view(node, "todo:1") == {"t": {"title": "oat milk", "done": True}}


async def test_two_clients_edit_different_fields_both_win(start_node: StartNode) -> None:
    node = await start_node(hub=lossy_hub())
    url = base_url(node)
    async with connect(url) as ann, connect(url) as bob:
        a = await ann.records("doc:1")
        b = await bob.records("doc:1")
        await a.set("d", {"title": "draft", "body": "", "tags": []})
        await until(lambda: "d" in b.view)
        writes = [a.patch("d", {"title": "Final"}), b.patch("d", {"body": "Hello"})]
        assert [(await w).outcome for w in writes] == [Outcome.APPLIED, Outcome.APPLIED]
        expected = {"d": {"title": "Final", "body": "Hello", "tags": []}}
        await until(lambda: a.view == b.view == expected)
        assert server_view(node, "doc:1") == expected


async def test_last_writer_wins_and_a_resolver(start_node: StartNode) -> None:
    node = await start_node(hub=lossy_hub())
    url = base_url(node)
    async with connect(url) as ann, connect(url) as bob:
        a = await ann.records("pos:1")
        b = await bob.records("pos:1")
        await a.set("p", {"x": 1})
        await until(lambda: "p" in b.view)
        await b.set("p", {"x": 2})  # later: it wins the whole record
        await until(lambda: a.view == b.view == {"p": {"x": 2}})
        # The clients can run the server's resolver to predict their views exactly.
        counter_a = await ann.records("count:1", policy=CustomResolver(add))
        counter_b = await bob.records("count:1")
        steps = [counter_a.patch("c", {"add": 2}) for _ in range(5)]
        assert counter_a.view == {"c": {"n": 10}}  # at once
        steps += [counter_b.patch("c", {"add": 3}) for _ in range(5)]
        assert {(await s).outcome for s in steps} == {Outcome.APPLIED}
        refused = await counter_a.patch("c", {"add": -1})
        assert refused.outcome is Outcome.REJECTED
        assert refused.message == "add a non-negative integer"
        await until(lambda: counter_a.view == counter_b.view == {"c": {"n": 25}})
        assert node.hub.record("count:1", "c").value == {"n": 25}


@pytest.mark.parametrize("transport", ["websocket", "sse", "longpoll"])
async def test_writes_survive_dropped_connections_and_apply_once(
    start_node: StartNode, transport: str
) -> None:
    """Writes made while the connection drops again and again (some sent, some not, some
    applied by the hub with the answer lost) are all applied, each once, and every view
    converges. Without history, a resume gets a snapshot, which does not say which writes it
    includes: the unanswered ones are sent again, and the hub answers them from memory."""
    node = await start_node(hub=lossy_hub(history_size=0))
    url = base_url(node)
    assert isinstance(node.hub, LossyHub)
    node.hub.lose_every = 7
    published: list[tuple[str, int]] = []
    async with (
        connect(url) as observer_client,
        connect(
            url,
            transports=(transport,),
            min_backoff=0.005,
            max_backoff=0.02,
            probe_interval=None,
        ) as writer,
    ):
        observer = await observer_client.join("doc:2", iterate=False)
        observer.on_message.append(
            lambda m: published.append((m.data.get("writer"), m.data.get("seq")))
        )
        doc = await writer.records("doc:2")
        assert isinstance(doc, Records)
        writes = []
        for n in range(60):
            writes.append(doc.patch(f"k{n % 5}", {f"f{n}": n}))
            if n % 11 == 0:
                writer.drop_connection()
            await trio.sleep(0.002)  # the writer's pace: writes land between the drops
        with trio.fail_after(30):
            await doc.settled()
        assert [w.result.outcome for w in writes if w.result] == [Outcome.APPLIED] * 60
        await until(lambda: len(published) == 60)
        assert len(set(published)) == 60  # no write applied twice
        assert writer.connects > 2
        # Writes whose answer was lost were sent again and answered from memory.
        assert node.hub.stats.duplicate_mutations > 0
        expected = {f"k{k}": {f"f{n}": n for n in range(k, 60, 5)} for k in range(5)}
        assert doc.view == expected
        assert server_view(node, "doc:2") == expected


async def test_late_joiners_get_a_snapshot_and_database_changes_reach_everyone(
    start_node: StartNode,
) -> None:
    node = await start_node(hub=lossy_hub(history_size=2))
    url = base_url(node)
    async with connect(url, min_backoff=0.3) as ann:
        a = await ann.records("todo:9")
        for n in range(5):
            node.hub.apply_record_change("todo:9", f"t{n}", {"n": n}, node.now)
        node.pump()
        await until(lambda: len(a.view) == 5)
        # A server-side publication that is not a record (the REST API, say) is delivered
        # and skipped by the stores.
        messages: list[Any] = []
        a.on_message.append(lambda m: messages.append(m.data))
        node.publish("todo:9", "not a record")
        await until(lambda: messages == ["not a record"])
        async with connect(url) as bob:
            b = await bob.records("todo:9")
            assert b.view == a.view  # the join reply's snapshot
            # A row changes in the database: the source hands it to the hub.
            node.hub.apply_record_change("todo:9", "t0", {"n": 100}, node.now, source_version=2)
            node.hub.apply_record_change("todo:9", "t1", None, node.now)
            node.pump()
            await until(lambda: a.view == b.view and b.view.get("t0") == {"n": 100})
            assert "t1" not in b.view
            # ann misses more changes than history holds: she resumes with a snapshot.
            ann.drop_connection()
            await until(lambda: not ann.connected)
            for n in range(5, 9):
                node.hub.apply_record_change("todo:9", f"t{n}", {"n": n}, node.now)
            node.pump()
            await until(lambda: a.recovered is False and a.view == b.view, "a resync", timeout=15)
            assert a.view == server_view(node, "todo:9")
