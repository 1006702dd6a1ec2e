"""Discovery over a live federation: two replicas agree; every filter and order works."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest

from control_plane.adapters.store import EtcdStore
from gpufed.client import Client, InvalidArgument, NotFound
from gpufed.errors import error_reason
from gpufed.v1 import admin_pb2, common_pb2, discovery_pb2, discovery_pb2_grpc
from tests.harness import ADMIN_TOKEN, EtcdCluster, metadata, replica_process, unique_prefix, wait_until
from tests.integration.federation import Federation

pytestmark = pytest.mark.integration


@pytest.fixture
def client(fed: Federation) -> Iterator[Client]:
    with fed.client(0) as c:
        yield c


def nodes_of(offers: list[discovery_pb2.Offer]) -> list[str]:
    return [o.node_id for o in offers]


def search(c: Client, **kw: object) -> list[discovery_pb2.Offer]:
    return list(c.search_offers(**kw))  # type: ignore[arg-type]


def test_both_replicas_return_the_same_offers_at_the_same_revision(fed: Federation) -> None:
    with fed.client(0) as a, fed.client(1) as b:
        req = discovery_pb2.SearchOffersRequest(page_size=100)
        for _ in range(20):
            ra = a.call(a.discovery.SearchOffers, req)
            rb = b.call(b.discovery.SearchOffers, req)
            if ra.revision == rb.revision:
                break
        assert ra.revision == rb.revision
        assert list(ra.offers) == list(rb.offers)
        assert len(ra.offers) == 5


def test_default_order_is_cheapest_first_and_degraded_gpus_are_left_out(client: Client) -> None:
    offers = search(client)
    assert nodes_of(offers) == ["ams-1", "par-1", "hel-1", "fra-1", "nyc-1"]
    hel = next(o for o in offers if o.node_id == "hel-1")
    assert hel.free_gpus == 7  # GPU 0 is thermally throttled: DEGRADED
    assert hel.health == common_pb2.GPU_HEALTH_HEALTHY


def test_include_degraded_offers_throttled_gpus_with_their_health(client: Client) -> None:
    hel = next(o for o in search(client, include_degraded=True) if o.node_id == "hel-1")
    assert hel.free_gpus == 8
    assert hel.health == common_pb2.GPU_HEALTH_DEGRADED


def test_model_family_and_exact_model(client: Client) -> None:
    assert sorted(nodes_of(search(client, gpu_model="H100"))) == ["fra-1", "hel-1"]
    assert nodes_of(search(client, gpu_model="NVIDIA L40S")) == ["ams-1"]
    assert nodes_of(search(client, gpu_model="a100 80gb")) == ["par-1"]
    assert search(client, gpu_model="B200") == []


def test_min_gpu_memory_and_min_free_gpus(client: Client) -> None:
    assert nodes_of(search(client, min_gpu_memory_gb=100)) == ["nyc-1"]
    assert "ams-1" not in nodes_of(search(client, min_free_gpus=5))
    assert "hel-1" not in nodes_of(search(client, min_free_gpus=8))


def test_countries_allow_and_deny_are_hard_filters(client: Client) -> None:
    assert sorted(nodes_of(search(client, countries=["DE", "FR"]))) == ["fra-1", "par-1"]
    assert "nyc-1" not in nodes_of(search(client, exclude_countries=["US"]))
    assert nodes_of(search(client, countries=["DE"], exclude_countries=["DE"])) == []
    for offer in search(client, countries=["NL"]):
        assert offer.location.country_code == "NL"


def test_regions_providers_labels_and_max_price(client: Client) -> None:
    assert sorted(nodes_of(search(client, regions=["eu-west"]))) == ["ams-1", "par-1"]
    assert sorted(nodes_of(search(client, providers=["acme"]))) == ["ams-1", "nyc-1"]
    assert sorted(nodes_of(search(client, labels={"tier": "premium"}))) == ["fra-1", "nyc-1"]
    assert nodes_of(search(client, max_price=1.0)) == ["ams-1"]


def test_radius_search_returns_distance_and_orders_by_it(client: Client) -> None:
    # 600 km around Brussels: Amsterdam (~175 km), Paris (~265 km), Frankfurt (~315 km).
    near = (50.85, 4.35, 600.0)
    offers = search(client, near=near, order_by=discovery_pb2.OFFER_ORDER_DISTANCE)
    assert nodes_of(offers) == ["ams-1", "par-1", "fra-1"]
    assert 150 < offers[0].distance_km < 200
    assert all(o.HasField("distance_km") for o in offers)
    assert all(not o.HasField("distance_km") for o in search(client))


def test_order_by_free_gpus(client: Client) -> None:
    offers = search(client, order_by=discovery_pb2.OFFER_ORDER_FREE_GPUS)
    assert [o.free_gpus for o in offers] == sorted((o.free_gpus for o in offers), reverse=True)
    assert offers[-1].node_id == "ams-1"


def test_pagination_walks_every_offer_once_with_opaque_tokens(client: Client) -> None:
    req = discovery_pb2.SearchOffersRequest(page_size=2)
    seen: list[str] = []
    pages = 0
    while True:
        resp = client.call(client.discovery.SearchOffers, req)
        seen += [o.node_id for o in resp.offers]
        pages += 1
        if not resp.next_page_token:
            break
        req.page_token = resp.next_page_token
    assert pages == 3
    assert seen == ["ams-1", "par-1", "hel-1", "fra-1", "nyc-1"]


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (
            discovery_pb2.SearchOffersRequest(filter=common_pb2.GpuFilter(countries=["XX"])),
            "INVALID_COUNTRY_CODE",
        ),
        (
            discovery_pb2.SearchOffersRequest(filter=common_pb2.GpuFilter(exclude_countries=["Germany"])),
            "INVALID_COUNTRY_CODE",
        ),
        (
            discovery_pb2.SearchOffersRequest(
                filter=common_pb2.GpuFilter(near=common_pb2.GeoCircle(latitude=95, longitude=0, radius_km=10))
            ),
            "INVALID_COORDINATES",
        ),
        (
            discovery_pb2.SearchOffersRequest(
                filter=common_pb2.GpuFilter(near=common_pb2.GeoCircle(latitude=0, longitude=0, radius_km=-1))
            ),
            "INVALID_RADIUS",
        ),
        (
            discovery_pb2.SearchOffersRequest(filter=common_pb2.GpuFilter(max_price_per_gpu_hour=-1)),
            "INVALID_PRICE",
        ),
        (discovery_pb2.SearchOffersRequest(order_by=discovery_pb2.OFFER_ORDER_DISTANCE), "NEAR_REQUIRED"),
        (discovery_pb2.SearchOffersRequest(page_token="garbage!"), "INVALID_PAGE_TOKEN"),
        (discovery_pb2.SearchOffersRequest(page_size=-5), "INVALID_PAGE_SIZE"),
    ],
)
def test_bad_searches_are_invalid_argument_with_a_reason(
    fed: Federation, request_: discovery_pb2.SearchOffersRequest, reason: str
) -> None:
    with grpc.insecure_channel(fed.replicas[0].address) as ch:
        stub = discovery_pb2_grpc.DiscoveryServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.SearchOffers(request_, metadata=metadata(fed.tenant_token))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(e.value) == reason


def test_page_token_of_another_query_is_rejected(client: Client) -> None:
    first = client.call(client.discovery.SearchOffers, discovery_pb2.SearchOffersRequest(page_size=1))
    other = discovery_pb2.SearchOffersRequest(
        page_size=1, page_token=first.next_page_token, filter=common_pb2.GpuFilter(gpu_model="H100")
    )
    with pytest.raises(InvalidArgument) as e:
        client.call(client.discovery.SearchOffers, other)
    assert e.value.reason == "INVALID_PAGE_TOKEN"


def test_get_node_list_nodes_and_list_providers(client: Client) -> None:
    node = client.get_node("providers/neo/nodes/fra-1")
    assert node.state == common_pb2.NODE_STATE_READY and node.free_gpu_count == 8 and node.replica
    with pytest.raises(NotFound):
        client.get_node("providers/neo/nodes/nope")
    with pytest.raises(InvalidArgument):
        client.get_node("nodes/fra-1")
    assert [n.node_id for n in client.list_nodes(provider="acme")] == ["ams-1", "nyc-1"]
    assert len(client.list_nodes(state=common_pb2.NODE_STATE_READY)) == 5
    assert client.list_nodes(state=common_pb2.NODE_STATE_OFFLINE) == []
    providers = {p.provider: p for p in client.list_providers()}
    assert sorted(providers) == ["acme", "blue", "neo"]
    assert providers["neo"].gpu_count == 16 and providers["neo"].country_codes == ["DE", "FR"]


def test_summarize_capacity_by_model_country_and_health(client: Client) -> None:
    resp = client.summarize_capacity()
    buckets = {(b.gpu_model, b.country_code, b.health): (b.total_gpus, b.free_gpus) for b in resp.buckets}
    assert buckets[("NVIDIA H100 80GB HBM3", "FI", common_pb2.GPU_HEALTH_DEGRADED)] == (1, 1)
    assert buckets[("NVIDIA H100 80GB HBM3", "FI", common_pb2.GPU_HEALTH_HEALTHY)] == (7, 7)
    assert buckets[("NVIDIA L40S", "NL", common_pb2.GPU_HEALTH_HEALTHY)] == (4, 4)
    assert resp.total_gpus == 36
    de = client.summarize_capacity(countries=["DE"])
    assert de.total_gpus == 8


def test_watch_capacity_sends_a_snapshot_then_changes(fed: Federation) -> None:
    with grpc.insecure_channel(fed.replicas[1].address) as ch:
        stub = discovery_pb2_grpc.DiscoveryServiceStub(ch)
        stream = stub.WatchCapacity(
            discovery_pb2.WatchCapacityRequest(provider="acme"),
            metadata=metadata(fed.tenant_token),
            timeout=20,
        )
        E = discovery_pb2.WatchCapacityResponse
        snapshot = []
        for ev in stream:
            if ev.type == E.EVENT_TYPE_SNAPSHOT_END:
                break
            snapshot.append(ev.node.node_id)
        assert snapshot == ["ams-1", "nyc-1"]
        with fed.admin(0) as admin:
            admin.call(
                admin.admin.CordonNode,
                admin_pb2.CordonNodeRequest(name="providers/acme/nodes/ams-1", reason="maintenance"),
            )
            try:
                for ev in stream:
                    if (
                        ev.type == E.EVENT_TYPE_NODE_CHANGED
                        and ev.node.state == common_pb2.NODE_STATE_CORDONED
                    ):
                        assert ev.node.node_id == "ams-1"
                        break
            finally:
                admin.call(
                    admin.admin.UncordonNode, admin_pb2.UncordonNodeRequest(name="providers/acme/nodes/ams-1")
                )
        stream.cancel()
    with fed.client(0) as c:
        wait_until(lambda: "ams-1" in nodes_of(search(c)))


def test_telemetry_is_forwarded_from_the_replica_holding_the_stream(fed: Federation) -> None:
    # fra-1 streams to replica 0; ask replica 1 (as an operator, who sees every GPU).
    with fed.admin(1) as c:
        resp = c.node_telemetry("providers/neo/nodes/fra-1", 5)
    assert resp.replica == fed.replicas[0].replica.id  # type: ignore[union-attr]
    assert 1 <= len(resp.recent) <= 5
    assert len(resp.latest.gpus) == 8
    with fed.admin(0) as c:
        local = c.node_telemetry("providers/neo/nodes/fra-1", 1)
    assert local.replica == fed.replicas[0].replica.id  # type: ignore[union-attr]


def test_a_tenant_sees_telemetry_only_of_the_gpus_it_holds(fed: Federation) -> None:
    node = "providers/neo/nodes/fra-1"
    with fed.client(1) as tenant:
        with pytest.raises(NotFound):  # holds nothing there: the node looks missing
            tenant.node_telemetry(node)
        lease = tenant.create_lease(2, providers=["neo"], countries=["DE"])
        try:
            held = {g.uuid for g in lease.gpus}
            assert {g.node for g in lease.gpus} == {node}
            wait_until(lambda: bool(tenant.node_telemetry(node).recent))
            resp = tenant.node_telemetry(node)
            assert {g.uuid for g in resp.latest.gpus} == held
            assert all({g.uuid for g in r.gpus} == held for r in resp.recent)
            view = tenant.get_node(node)
            assert {g.lease for g in view.gpus if g.lease} == {lease.name}  # its own lease only
        finally:
            tenant.release_lease(lease.name)


def test_pages_from_replicas_with_different_hash_seeds_add_up_to_the_unpaged_answer(
    etcd: EtcdCluster,
) -> None:
    """Behind a load balancer each page may come from another replica: a page token must mean
    the same on every replica, whatever its PYTHONHASHSEED (sets of countries, regions and
    providers once went into the token's query in hash order)."""
    prefix = unique_prefix()
    countries = ["DE", "FR", "SE", "FI", "US", "CA", "NL", "PL"]

    async def seed() -> None:
        store = EtcdStore(etcd.endpoints, prefix)
        try:
            for i, cc in enumerate(countries * 2):
                node = common_pb2.Node(
                    provider=f"p{i % 3}",
                    node_id=f"n{i}",
                    location=common_pb2.Location(country_code=cc, region=f"r{i % 4}"),
                    price_per_gpu_hour=1.0 + i / 10,
                )
                node.gpus.add(
                    uuid=f"n{i}-g0", model="NVIDIA H100 80GB HBM3", health=common_pb2.GPU_HEALTH_HEALTHY
                )
                await store.put(store.keys.node(node.provider, node.node_id), node.SerializeToString())
                await store.put(store.keys.alive(node.provider, node.node_id), b"test/session")
        finally:
            await store.close()

    asyncio.run(seed())
    flt = common_pb2.GpuFilter(
        countries=countries, regions=["r0", "r1", "r2", "r3"], providers=["p0", "p1", "p2"]
    )
    with (
        replica_process(etcd.endpoints, prefix, env={"PYTHONHASHSEED": "1"}) as (_, a),
        replica_process(etcd.endpoints, prefix, env={"PYTHONHASHSEED": "2"}) as (_, b),
        grpc.insecure_channel(a) as ch_a,
        grpc.insecure_channel(b) as ch_b,
    ):
        stubs = [discovery_pb2_grpc.DiscoveryServiceStub(ch) for ch in (ch_a, ch_b)]
        md = metadata(ADMIN_TOKEN)

        def page(i: int, token: str = "", size: int = 3) -> discovery_pb2.SearchOffersResponse:
            req = discovery_pb2.SearchOffersRequest(filter=flt, page_size=size, page_token=token)
            resp: discovery_pb2.SearchOffersResponse = stubs[i % 2].SearchOffers(req, metadata=md, timeout=10)
            return resp

        wait_until(lambda: all(len(page(i, size=100).offers) == len(countries) * 2 for i in (0, 1)), 30)
        whole = [o.node for o in page(0, size=100).offers]
        paged: list[str] = []
        resp = page(0)
        for i in range(1, 100):
            paged += [o.node for o in resp.offers]
            if not resp.next_page_token:
                break
            resp = page(i, resp.next_page_token)  # the next page from the other replica
    assert paged == whole and len(whole) == len(countries) * 2
