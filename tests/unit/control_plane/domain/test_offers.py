"""Searches and capacity summaries over an inventory."""

from __future__ import annotations

import dataclasses

from control_plane.adapters.index import Inventory
from control_plane.adapters.keyspace import Keyspace
from control_plane.adapters.store import KeyValue
from control_plane.domain import offers
from control_plane.domain.filters import compile_filter
from gpufed.v1 import common_pb2, discovery_pb2
from tests.unit.control_plane.inventory import P, add_node


def search(inv: Inventory, order: int = 0, stop: int = 100, **kw: object) -> list[str]:
    found, _ = offers.search(inv, compile_filter(common_pb2.GpuFilter(**kw)), 1, order, stop)  # type: ignore[arg-type]
    return [c.name.rsplit("/", 1)[1] for c in found]


def test_price_order_country_lists_and_max_price_stop() -> None:
    inv = Inventory(Keyspace(P))
    for i, (country, price) in enumerate([("DE", 3.0), ("FR", 1.0), ("DE", 2.0), ("US", 0.5)]):
        add_node(inv, "p", f"n{i}", country, price, rev=10 * i + 1)
    assert search(inv) == ["n3", "n1", "n2", "n0"]
    assert search(inv, countries=["DE", "FR"]) == ["n1", "n2", "n0"]
    assert search(inv, max_price_per_gpu_hour=2.0) == ["n3", "n1", "n2"]
    # a price change moves the node in every ordered list
    add_node(inv, "p", "n0", "DE", 0.1, rev=100)
    assert search(inv, countries=["DE"]) == ["n0", "n2"]


def test_nearest_first_and_radius() -> None:
    inv = Inventory(Keyspace(P))
    add_node(inv, "p", "paris", "FR", 2.0, lat=48.86, lon=2.35, rev=1)
    add_node(inv, "p", "berlin", "DE", 1.0, lat=52.52, lon=13.40, rev=3)
    add_node(inv, "p", "nyc", "US", 0.5, lat=40.71, lon=-74.0, rev=5)
    near = common_pb2.GeoCircle(latitude=50.85, longitude=4.35, radius_km=1000)  # Brussels
    assert search(inv, discovery_pb2.OFFER_ORDER_DISTANCE, near=near) == ["paris", "berlin"]
    assert search(inv, discovery_pb2.OFFER_ORDER_DISTANCE, stop=1, near=near) == ["paris"]


def test_allocated_and_unhealthy_gpus_are_not_offered_and_cordoned_nodes_vanish() -> None:
    inv = Inventory(Keyspace(P))
    add_node(inv, "p", "a", "DE", 2.0, gpus=2)
    inv.apply(f"{P}/alloc/p/a/a-g0".encode(), b"l1", 5)
    found, _ = offers.search(inv, compile_filter(common_pb2.GpuFilter()), 1, 0, 10)
    assert [g.uuid for g in found[0].gpus] == ["a-g1"]
    node = inv.nodes["providers/p/nodes/a"].node
    node.gpus[1].health = common_pb2.GPU_HEALTH_UNHEALTHY
    inv.apply(f"{P}/nodes/p/a".encode(), node.SerializeToString(), 6)
    assert search(inv) == []
    inv.apply(f"{P}/alloc/p/a/a-g0".encode(), None, 7)
    node.state = common_pb2.NODE_STATE_CORDONED
    inv.apply(f"{P}/nodes/p/a".encode(), node.SerializeToString(), 8)
    assert search(inv) == []


def test_summaries_by_model_country_and_health() -> None:
    inv = Inventory(Keyspace(P))
    add_node(inv, "p", "a", "DE", 2.0, gpus=2)
    inv.apply(f"{P}/alloc/p/a/a-g0".encode(), b"l1", 5)
    buckets = offers.summarize(inv, compile_filter(common_pb2.GpuFilter()))
    assert [(b.country_code, b.total_gpus, b.free_gpus) for b in buckets] == [("DE", 2, 1)]


def test_summaries_of_nodes_without_allocations_count_as_the_per_gpu_path_does() -> None:
    """A node nothing is held on is counted from its cached per-record tallies: the same
    buckets as counting its GPUs one by one, filters and MIG profiles included."""
    inv = Inventory(Keyspace(P))
    n = common_pb2.Node(provider="p", node_id="a", location=common_pb2.Location(country_code="DE"))
    n.gpus.add(
        uuid="GPU-0", index=0, model="NVIDIA A100", memory_total_bytes=80 << 30, health=1, mig_enabled=True
    )
    for i in range(2):
        n.gpus.add(uuid=f"MIG-{i}", index=0, model="NVIDIA A100", memory_total_bytes=10 << 30, health=1,
                   parent_uuid="GPU-0", mig_profile="1g.10gb")  # fmt: skip
    n.gpus.add(uuid="GPU-1", index=1, model="NVIDIA A100", memory_total_bytes=80 << 30, health=3)
    n.gpus.add(uuid="GPU-2", index=2, model="NVIDIA L40S", memory_total_bytes=48 << 30, health=1)
    inv.apply(f"{P}/alive/p/a".encode(), b"r/s", 1)
    inv.apply(f"{P}/nodes/p/a".encode(), n.SerializeToString(), 2)

    def rows(**kw: object) -> list[tuple[str, int, int, int]]:
        got = offers.summarize(inv, compile_filter(common_pb2.GpuFilter(**kw)))  # type: ignore[arg-type]
        return [(b.gpu_model, b.health, b.total_gpus, b.free_gpus) for b in got]

    cached = [
        rows(),
        rows(gpu_model="A100"),
        rows(mig_profile="1g.10gb"),
        rows(min_gpu_memory_bytes=50 << 30),
    ]
    assert cached[0] == [("NVIDIA A100", 1, 1, 1), ("NVIDIA A100", 3, 1, 1), ("NVIDIA L40S", 1, 1, 1)]
    assert cached[2] == [("NVIDIA A100", 1, 2, 2)]
    # One instance held: the per-GPU path, which takes its parent out too.
    inv.apply(f"{P}/alloc/p/a/GPU-0/MIG-0".encode(), b"l1", 3)
    assert rows(mig_profile="1g.10gb") == [("NVIDIA A100", 1, 2, 1)]
    assert rows()[0] == ("NVIDIA A100", 1, 1, 0)
    inv.apply(f"{P}/alloc/p/a/GPU-0/MIG-0".encode(), None, 4)
    assert [
        rows(),
        rows(gpu_model="A100"),
        rows(mig_profile="1g.10gb"),
        rows(min_gpu_memory_bytes=50 << 30),
    ] == cached


def test_gpu_health_memory_and_model_decide_which_gpus_are_offered() -> None:
    inv = Inventory(Keyspace(P))
    n = common_pb2.Node(provider="p", node_id="a", location=common_pb2.Location(country_code="DE"))
    for i, (health, model, mem) in enumerate(
        [
            (common_pb2.GPU_HEALTH_HEALTHY, "NVIDIA H100 80GB HBM3", 80),
            (common_pb2.GPU_HEALTH_DEGRADED, "NVIDIA H100 80GB HBM3", 80),
            (common_pb2.GPU_HEALTH_UNHEALTHY, "NVIDIA H100 80GB HBM3", 80),
            (common_pb2.GPU_HEALTH_HEALTHY, "NVIDIA A100-SXM4-40GB", 40),
        ]
    ):
        n.gpus.add(uuid=f"g{i}", index=i, model=model, memory_total_bytes=mem << 30, health=health)
    inv.apply(f"{P}/nodes/p/a".encode(), n.SerializeToString(), 1)
    inv.apply(f"{P}/alive/p/a".encode(), b"r1/s1", 2)

    def offered(**kw: object) -> list[str]:
        flt = compile_filter(common_pb2.GpuFilter(**kw))  # type: ignore[arg-type]
        return sorted(g.uuid for c in offers.candidates(inv, flt) for g in c.gpus)

    assert offered(gpu_model="H100", min_gpu_memory_bytes=60 << 30) == ["g0"]
    assert offered(gpu_model="H100", min_gpu_memory_bytes=60 << 30, include_degraded=True) == ["g0", "g1"]
    assert offered() == ["g0", "g3"]  # never the UNHEALTHY one
    assert offered(min_gpu_memory_bytes=100 << 30) == [] and offered(gpu_model="B200") == []


def test_a_search_for_a_model_nobody_has_walks_no_node_and_model_counts_follow_records() -> None:
    inv = Inventory(Keyspace(P))
    add_node(inv, "p", "a", "DE", 2.0, gpus=2)
    add_node(inv, "p", "b", "FR", 1.0, gpus=2)
    (model,) = inv.models
    assert inv.models[model] == 2
    walked: list[str] = []
    real = inv.summaries

    class Spy(dict[str, object]):
        def get(self, name: str, default: object = None) -> object:
            walked.append(name)
            return real.get(name, default)

    inv.summaries = Spy()  # type: ignore[assignment]
    assert search(inv, gpu_model="B300") == [] and walked == []
    inv.summaries = real
    inv.apply(f"{P}/nodes/p/a".encode(), None, 50)
    assert inv.models == {model: 1}
    inv.apply(f"{P}/nodes/p/b".encode(), None, 51)
    assert inv.models == {}


def test_a_provider_region_or_label_nobody_has_is_known_impossible_and_one_that_exists_is_not() -> None:
    inv = Inventory(Keyspace(P))
    n = common_pb2.Node(
        provider="neo", node_id="a", location=common_pb2.Location(country_code="DE", region="eu")
    )
    n.labels["tier"] = "premium"
    n.gpus.add(uuid="g0", index=0, model="NVIDIA L40S", memory_total_bytes=48 << 30, health=1)
    inv.apply(f"{P}/alive/neo/a".encode(), b"r/s", 1)
    inv.apply(f"{P}/nodes/neo/a".encode(), n.SerializeToString(), 2)
    for kw in ({"providers": ["other"]}, {"regions": ["us"]}, {"labels": {"tier": "standard"}}):
        assert offers.impossible(inv, compile_filter(common_pb2.GpuFilter(**kw)))
        assert search(inv, **kw) == []
    for kw in ({"providers": ["other", "neo"]}, {"regions": ["eu"]}, {"labels": {"tier": "premium"}}, {}):
        assert not offers.impossible(inv, compile_filter(common_pb2.GpuFilter(**kw)))
        assert search(inv, **kw) == ["a"]
    n.labels["tier"] = "standard"  # a changed record moves its counts
    inv.apply(f"{P}/nodes/neo/a".encode(), n.SerializeToString(), 3)
    assert search(inv, labels={"tier": "standard"}) == ["a"] and search(inv, labels={"tier": "premium"}) == []
    inv.apply(f"{P}/nodes/neo/a".encode(), None, 4)
    assert inv.facets == {} and inv.models == {}


def test_summaries_from_the_index_tallies_equal_walking_every_node_through_any_churn() -> None:
    """SummarizeCapacity reads the index's per-pool tallies when its filter allows; after any
    sequence of node, liveness, allocation and pool changes they say what a walk says."""
    import random

    rng = random.Random(7)
    inv = Inventory(Keyspace(P))
    names = [f"n{i}" for i in range(30)]
    for step in range(600):
        node_id = rng.choice(names)
        op = rng.random()
        if op < 0.3:
            add_node(inv, "p", node_id, rng.choice(["DE", "FR", "US"]), 2.0, gpus=rng.randint(1, 4),
                     alive=rng.random() < 0.8, rev=10 + 3 * step)  # fmt: skip
            if rng.random() < 0.3:  # into a tenant's private pool
                entry = inv.nodes[f"providers/p/nodes/{node_id}"]
                n = common_pb2.Node()
                n.CopyFrom(entry.node)
                n.pool_tenant = rng.choice(["acme", "globex"])
                inv.apply(f"{P}/nodes/p/{node_id}".encode(), n.SerializeToString(), 11 + 3 * step)
        elif op < 0.7:
            gpu = f"{node_id}-g{rng.randint(0, 3)}"
            inv.apply(
                f"{P}/alloc/p/{node_id}/{gpu}".encode(), b"l" if rng.random() < 0.6 else None, 10 + 3 * step
            )
        elif op < 0.85:
            inv.apply(f"{P}/alive/p/{node_id}".encode(), None, 10 + 3 * step)
        else:
            inv.apply(f"{P}/nodes/p/{node_id}".encode(), None, 10 + 3 * step)
    for viewer in ("", "acme", None):
        for pool in ("any", "own", "federation"):
            for kw in ({}, {"countries": ["DE", "US"]}, {"exclude_countries": ["FR"]}, {"gpu_model": "H100"}):
                flt = compile_filter(common_pb2.GpuFilter(**kw))
                flt = dataclasses.replace(flt, viewer=viewer, pool=pool)
                walked = offers.summarize(inv, dataclasses.replace(flt, max_price=1e9))  # forces the walk
                assert offers._from_tallies(inv, flt) is not None
                assert offers.summarize(inv, flt) == walked, (viewer, pool, kw)
    # A replica that lists the same keys at start (a bulk load) tallies them alike.
    listed = Inventory(Keyspace(P))
    listed.load(
        [KeyValue(k.encode(), v, 1, 1, 0) for k, v in _keys_of(inv)],
        revision=inv.revision,
    )
    assert listed.capacity == inv.capacity


def _keys_of(inv: Inventory) -> list[tuple[str, bytes]]:
    out = [(f"{P}/nodes/{n.removeprefix('providers/').replace('/nodes/', '/')}", e.node.SerializeToString())
           for n, e in inv.nodes.items()]  # fmt: skip
    out += [
        (f"{P}/alive/{n.removeprefix('providers/').replace('/nodes/', '/')}", v.encode())
        for n, v in inv.alive.items()
    ]
    for n, held in inv.allocs.items():
        node = n.removeprefix("providers/").replace("/nodes/", "/")
        out += [(f"{P}/alloc/{node}/{gpu}", lease.encode()) for gpu, lease in held.items()]
    return out


def test_could_fit_counts_held_gpus_and_asks_one_node_for_single_node_requests() -> None:
    inv = Inventory(Keyspace(P))
    add_node(inv, "p", "a", "DE", 2.0, gpus=4, rev=1)
    add_node(inv, "p", "b", "FR", 2.0, gpus=4, rev=3)
    for i in range(4):  # every GPU of a is held: it could still serve a request that waits
        inv.apply(f"{P}/alloc/p/a/a-g{i}".encode(), b"l1", 5 + i)
    every = compile_filter(common_pb2.GpuFilter())
    assert offers.could_fit(inv, every, 4, single_node=True)
    assert not offers.could_fit(inv, every, 5, single_node=True)
    assert offers.could_fit(inv, every, 8, single_node=False)
    assert not offers.could_fit(inv, every, 9, single_node=False)
    german = compile_filter(common_pb2.GpuFilter(countries=["DE"]))
    assert not offers.could_fit(inv, german, 5, single_node=False)
    assert not offers.could_fit(inv, compile_filter(common_pb2.GpuFilter(gpu_model="A100")), 1, True)
