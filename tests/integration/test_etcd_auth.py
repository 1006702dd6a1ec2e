"""A replica against an etcd with user authentication on: it authenticates with its user and
password, and without them it is refused at start rather than half-working."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest
from etcd3.etcdrpc import rpc_pb2 as rpc
from etcd3.etcdrpc import rpc_pb2_grpc as rpc_grpc

from gpufed.client import Client
from gpufed.v1 import admin_pb2
from tests.harness import ADMIN_TOKEN, EtcdCluster, ReplicaThread, replica_config, unique_prefix

pytestmark = pytest.mark.integration
PASSWORD = "etcd-root-password-for-the-test"


@pytest.fixture(scope="module")
def auth_etcd() -> Iterator[EtcdCluster]:
    """An etcd of its own (the shared one must stay open), with root/PASSWORD and auth on."""
    cluster = EtcdCluster.start(1)

    async def enable() -> None:
        async with grpc.aio.insecure_channel(cluster.endpoints[0]) as ch:
            auth = rpc_grpc.AuthStub(ch)
            await auth.UserAdd(rpc.AuthUserAddRequest(name="root", password=PASSWORD))
            await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"))
            await auth.AuthEnable(rpc.AuthEnableRequest())

    asyncio.run(enable())
    yield cluster
    cluster.stop()


def test_a_replica_authenticates_as_its_etcd_user(auth_etcd: EtcdCluster) -> None:
    cfg = replica_config(auth_etcd.endpoints, unique_prefix(), etcd_user="root", etcd_password=PASSWORD)
    rt = ReplicaThread(cfg).start()
    try:
        with Client(rt.address, ADMIN_TOKEN) as admin:
            created = admin.create_token("tenant", "behind-auth")
            listed = admin.call(admin.admin.ListTokens, admin_pb2.ListTokensRequest()).tokens
            assert [t.name for t in listed] == [created.token.name]
    finally:
        rt.stop()


def test_a_wrong_password_or_none_is_refused_at_start(auth_etcd: EtcdCluster) -> None:
    from control_plane.adapters.store import StoreRefused

    with pytest.raises(StoreRefused, match="refused user 'root'"):
        ReplicaThread(
            replica_config(auth_etcd.endpoints, unique_prefix(), etcd_user="root", etcd_password="wrong")
        ).start()
    with pytest.raises(StoreRefused, match="user name is empty"):
        ReplicaThread(replica_config(auth_etcd.endpoints, unique_prefix())).start()
