"""Storage engines: the memory engine passes the conformance suite, the suite catches an
engine that hands out a gap, and a hub takes publications numbered elsewhere (`deliver`)."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest

from pyrt.conflict import Timestamp
from pyrt.hub.broker import DurableHistory, MemoryBroker, StorageEngine
from pyrt.hub.deliverer import MemoryDeliverer
from pyrt.hub.history import Publication, Recovery, StreamPosition
from pyrt.hub.hub import Hub, HubConfig
from pyrt.testing import check_broker


def test_the_memory_engine_passes_the_conformance_suite() -> None:
    check_broker(MemoryBroker)


def test_the_memory_engine_is_every_part_and_keeps_a_durable_log() -> None:
    engine: StorageEngine = MemoryBroker()
    assert isinstance(engine, DurableHistory)


class ForgetfulRecovery(MemoryBroker):
    """An engine with a classic bug: it recovers from a forgotten position by returning what
    it still has, a silent gap."""

    def history(self, channel: str, now: float, since: StreamPosition | None = None) -> Recovery:
        recovery = super().history(channel, now, since)
        if since is not None and not recovery.recovered and since.offset < recovery.position.offset:
            kept = super().history(channel, now)
            return Recovery(True, kept.publications, recovery.position)
        return recovery


class SharedOffsets(MemoryBroker):
    """An engine whose offsets are not per channel."""

    counter = itertools.count(1)

    def publish(self, channel: str, data: Any, now: float, **kwargs: Any) -> Publication:
        publication = super().publish(channel, data, now, **kwargs)
        return Publication(
            channel, next(self.counter), publication.epoch, data, now, *_rest(publication)
        )


def _rest(publication: Publication) -> tuple[Any, ...]:
    return (publication.publisher, publication.key, publication.hlc, publication.change)


@pytest.mark.parametrize("engine", [ForgetfulRecovery, SharedOffsets])
def test_the_suite_fails_a_wrong_engine(engine: Any) -> None:
    with pytest.raises(AssertionError):
        check_broker(engine)


def test_a_hub_reaches_storage_only_through_its_engine() -> None:
    engine = MemoryBroker(HubConfig(history_size=2), new_epoch=lambda: "e1")
    hub = Hub(HubConfig(history_size=2), broker=engine, deliverer=MemoryDeliverer)
    assert hub.broker is engine
    hub.publish("a", 1, 0.0)
    assert engine.position("a", 0.0) == StreamPosition(1, "e1")
    assert hub.history_budget is engine.budget


# -- publications numbered elsewhere ---------------------------------------------------------


def hub_pair() -> tuple[Hub, Hub]:
    epochs = itertools.count(1)
    make = lambda name: Hub(  # noqa: E731
        HubConfig(history_size=10),
        replica=name,
        new_epoch=lambda: f"e{next(epochs)}",
        deliverer=MemoryDeliverer,
    )
    return make("n1"), make("n2")


def frames(hub: Hub, conn_id: str) -> list[dict[str, Any]]:
    return [orjson.loads(f) for f in hub.connection(conn_id).outbox.pop(max_bytes=1 << 30)]


def join(hub: Hub, **command: Any) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """A new connection joins: its id, the join's reply and what followed it (a replay)."""
    conn = hub.open(0.0)
    hub.receive(conn.id, orjson.dumps({"id": 1, "cmd": "join", **command}), 0.0)
    reply, *rest = frames(hub, conn.id)
    return conn.id, reply["ok"], rest


def test_a_publication_from_another_node_reaches_subscribers_with_its_offset() -> None:
    origin, here = hub_pair()
    watcher, _, _ = join(here, channel="a")
    published = [origin.publish("a", {"n": n}, 0.0, key="k") for n in range(1, 4)]
    for publication in published:
        assert here.deliver(publication, 5.0) is not None
    pubs = frames(here, watcher)
    assert [(f["offset"], f["epoch"], f["data"]) for f in pubs] == [
        (p.offset, p.epoch, p.data) for p in published
    ]
    assert here.history_position("a", 5.0) == published[-1].position
    assert here.stats.publications == 3


def test_a_duplicate_is_not_sent_twice() -> None:
    origin, here = hub_pair()
    watcher, _, _ = join(here, channel="a")
    publication = origin.publish("a", 1, 0.0)
    assert here.deliver(publication, 0.0) is not None
    assert here.deliver(publication, 0.0) is None
    assert len(frames(here, watcher)) == 1


def test_a_client_resuming_across_a_gap_is_told_it_was_not_recovered() -> None:
    origin, here = hub_pair()
    published = [origin.publish("a", n, 0.0) for n in range(1, 5)]
    here.deliver(published[0], 0.0)
    here.deliver(published[2], 0.0)  # the second never arrived
    _, reply, replay = join(here, channel="a", since={"offset": 1, "epoch": published[0].epoch})
    assert reply["recovered"] is False
    assert replay == []
    assert (reply["offset"], reply["epoch"]) == (3, published[0].epoch)
    _, reply, replay = join(here, channel="a", since={"offset": 2, "epoch": published[0].epoch})
    assert reply["recovered"] is True
    assert [f["offset"] for f in replay] == [3]


def test_the_hub_clock_moves_past_a_delivered_publication() -> None:
    origin, here = hub_pair()
    ahead = Timestamp(int(4e12), 7, "n1")
    publication = origin.publish("a", 1, 0.0)
    here.deliver(Publication("a", 1, publication.epoch, 1, 0.0, hlc=ahead), 0.0)
    assert here.publish("a", 2, 0.0).hlc > ahead  # type: ignore[operator]


def test_deliver_refuses_records_and_row_events() -> None:
    hub = Hub(HubConfig(record_policies={"todos": "lww"}), deliverer=MemoryDeliverer)
    with pytest.raises(ValueError, match="plain publications"):
        hub.deliver(Publication("todos", 1, "e", {}, 0.0), 0.0)
    with pytest.raises(ValueError, match="plain publications"):
        hub.deliver(Publication("pg:public:t", 1, "e", {}, 0.0, change=("TRUNCATE", "a", "b")), 0.0)
