"""MIG instances as leasable units: searched by profile, leased, and never held together with
their parent GPU, also under contention between whole-GPU and instance leases."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Iterator

import grpc
import pytest

from control_plane.adapters.store import EtcdStore
from gpufed.client import Client, GpufedError
from node_daemon.fake_nvml import FakeNvml
from tests.harness import (
    ADMIN_TOKEN,
    DaemonThread,
    EtcdCluster,
    ReplicaThread,
    daemon_config,
    replica_config,
    unique_prefix,
    wait_until,
)

pytestmark = pytest.mark.integration
A100 = "providers/neo/nodes/a100"


@pytest.fixture(scope="module")
def fed(etcd: EtcdCluster) -> Iterator[tuple[list[str], Client, str]]:
    """Two replicas; node a100 (one A100 split 3g.40gb + 2g.20gb + 2 x 1g.10gb) and node h100
    (two H100s split into seven 1g.10gb each, six whole H100s), both at 2.10 per GPU-hour."""
    prefix = unique_prefix()
    replicas = [ReplicaThread(replica_config(etcd.endpoints, prefix)).start() for _ in range(2)]
    addresses = [r.address for r in replicas]
    admin = Client(addresses[0], ADMIN_TOKEN)
    provider = admin.create_token("provider", "neo").secret
    daemons = [
        DaemonThread(
            daemon_config(addresses, provider, "neo", node, price_per_gpu_hour=2.1),
            FakeNvml(profile, host=node),
        ).start()
        for node, profile in (("a100", "a100-mig"), ("h100", "h100-mig"))
    ]
    try:
        wait_until(lambda: len(list(admin.search_offers(mig_profile="1g.10gb"))) == 2, timeout=20)
        yield addresses, admin, prefix
    finally:
        for d in daemons:
            d.stop()
        admin.close()
        for r in replicas:
            r.stop()


@pytest.fixture
def tenant(fed: tuple[list[str], Client, str]) -> Iterator[Client]:
    addresses, admin, _ = fed
    with Client(addresses, admin.create_token("tenant", f"t{random.randrange(10**9)}").secret) as c:
        yield c


def free(c: Client, node: str, **flt: object) -> list[str]:
    return [u for o in c.search_offers(**flt) if o.node == node for u in o.gpu_uuids]  # type: ignore[arg-type]


def test_a_search_by_profile_offers_instances_priced_by_their_share(tenant: Client) -> None:
    offers = [o for o in tenant.search_offers(mig_profile="3g.40gb") if o.node == A100]
    assert len(offers) == 1
    o = offers[0]
    assert (o.mig_profile, o.free_gpus, o.gpu_model) == ("3g.40gb", 1, "NVIDIA A100-SXM4-80GB")
    assert o.gpu_uuids[0].startswith("MIG-") and 39 * 1024**3 < o.gpu_memory_bytes < 40 * 1024**3
    assert o.price_per_gpu_hour == pytest.approx(2.1 * 3 / 7)
    # Without a profile a search offers whole GPUs only.
    assert all(not u.startswith("MIG-") for o in tenant.search_offers() for u in o.gpu_uuids)


def test_leasing_an_instance_takes_its_parent_out_of_whole_gpu_offers(tenant: Client) -> None:
    assert len(free(tenant, A100, gpu_model="A100")) == 1
    lease = tenant.create_lease(1, mig_profile="1g.10gb", providers=["neo"], gpu_model="A100")
    try:
        g = lease.gpus[0]
        assert g.uuid.startswith("MIG-") and g.mig_profile == "1g.10gb" and g.parent_uuid.startswith("GPU-")
        assert g.price_per_gpu_hour == pytest.approx(2.1 / 7, abs=1e-6)
        wait_until(lambda: free(tenant, A100, gpu_model="A100") == [])
        # The other instances stay on offer.
        assert len(free(tenant, A100, mig_profile="1g.10gb")) == 1
        assert len(free(tenant, A100, mig_profile="3g.40gb")) == 1
    finally:
        tenant.release_lease(lease.name)
    wait_until(lambda: len(free(tenant, A100, gpu_model="A100")) == 1)


def test_leasing_the_whole_gpu_takes_all_its_instances(tenant: Client) -> None:
    lease = tenant.create_lease(1, gpu_model="A100")
    try:
        assert lease.gpus[0].uuid.startswith("GPU-") and not lease.gpus[0].mig_profile
        for profile in ("1g.10gb", "2g.20gb", "3g.40gb"):
            wait_until(lambda p=profile: free(tenant, A100, mig_profile=p) == [])
        with pytest.raises(GpufedError) as e:
            tenant.create_lease(1, mig_profile="2g.20gb", gpu_model="A100")
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        tenant.release_lease(lease.name)
    wait_until(lambda: len(free(tenant, A100, mig_profile="1g.10gb")) == 2)


@pytest.mark.parametrize("profile", ["10gb", "1g", "8g.10gb", "1g.10gb; drop", "x" * 40])
def test_a_malformed_profile_is_invalid_argument(tenant: Client, profile: str) -> None:
    with pytest.raises(GpufedError) as e:
        list(tenant.search_offers(mig_profile=profile))
    assert (e.value.code, e.value.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_MIG_PROFILE")


def test_contention_of_whole_gpu_and_instance_leases_never_holds_a_gpu_and_its_instance(
    fed: tuple[list[str], Client, str], etcd: EtcdCluster
) -> None:
    addresses, admin, prefix = fed
    start = asyncio.run(_revision(etcd, prefix))
    stop = threading.Event()
    granted = [0, 0]  # whole, instance
    errors: list[BaseException] = []

    def client(i: int) -> None:
        rng = random.Random(i)
        tok = admin.create_token("tenant", f"mix{i}").secret
        with Client(addresses[i % 2], tok) as c:
            while not stop.is_set():
                whole = rng.random() < 0.5
                try:
                    if whole:
                        lease = c.create_lease(rng.choice((1, 2)), gpu_model="H100", ttl_s=10)
                    else:
                        lease = c.create_lease(
                            rng.choice((1, 2, 3)), mig_profile="1g.10gb", gpu_model="H100", ttl_s=10
                        )
                except GpufedError as e:
                    if e.code not in (
                        grpc.StatusCode.FAILED_PRECONDITION,
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                    ):
                        errors.append(e)
                    continue
                granted[0 if whole else 1] += 1
                c.release_lease(lease.name)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    threading.Event().wait(6.0)
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors[:3]
    assert granted[0] > 5 and granted[1] > 5, granted
    asyncio.run(_replay(etcd, prefix, start))


async def _revision(etcd: EtcdCluster, prefix: str) -> int:
    store = EtcdStore(etcd.endpoints, prefix)
    try:
        return await store.put(store.keys.root + "mig-start", b"")
    finally:
        await store.close()


async def _replay(etcd: EtcdCluster, prefix: str, start: int) -> None:
    """Every allocation since `start`, in etcd's order: no key held twice, and never a GPU's key
    while one of its instances' keys is held (or the other way round)."""
    store = EtcdStore(etcd.endpoints, prefix)
    try:
        end = await store.put(store.keys.root + "mig-end", b"")
        held: dict[str, bytes] = {}
        alloc = store.keys.dir("alloc")
        async for revision, events in store.watch_prefix(store.keys.root, start + 1):
            for ev in events:
                key = ev.key.decode()
                if not key.startswith(alloc):
                    continue
                if ev.value is None:
                    held.pop(key, None)
                    continue
                assert key not in held, f"{key} granted while held"
                rel = store.keys.relative(key)
                if len(rel) == 5:  # an instance's: its parent must be free
                    parent = key.rsplit("/", 1)[0]
                    assert parent not in held, f"{key} granted while its GPU {parent} is held"
                else:
                    inside = [k for k in held if k.startswith(key + "/")]
                    assert not inside, f"{key} granted while its instances {inside} are held"
                held[key] = ev.value
            if revision >= end:
                break
    finally:
        await store.close()
