"""The version skew policy at the node stream: a daemon outside it is refused, saying why, and
writes nothing (docs/operations.md, "Version skew policy")."""

from __future__ import annotations

import grpc
import pytest

from gpufed import __version__
from gpufed.client import Client
from gpufed.errors import error_reason
from gpufed.v1 import common_pb2, node_pb2, node_pb2_grpc
from tests.harness import ADMIN_TOKEN, ReplicaThread, channel, metadata


def _hello(version: str) -> node_pb2.NodeMessage:
    hello = node_pb2.NodeHello(
        provider="neo", node_id="n1", location=common_pb2.Location(country_code="DE"), daemon_version=version
    )
    hello.gpus.add(uuid="GPU-skew-0", index=0, model="NVIDIA L40S", memory_total_bytes=48 << 30)
    return node_pb2.NodeMessage(hello=hello)


@pytest.mark.parametrize(
    ("version", "says"),
    [("99.0.0", "newer"), ("0.99.0", "newer"), ("", "not a release"), ("nightly", "not a release")],
)
def test_a_daemon_outside_the_skew_policy_is_refused_with_the_reason_and_writes_nothing(
    replica: ReplicaThread, version: str, says: str
) -> None:
    with Client(replica.address, ADMIN_TOKEN) as admin:
        provider = admin.create_token("provider", "neo").secret
    with channel(replica.address) as ch:
        stub = node_pb2_grpc.NodeServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            for _ in stub.Connect(iter([_hello(version)]), metadata=metadata(provider), timeout=5):
                pass
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(e.value) == "DAEMON_VERSION_UNSUPPORTED"
    assert says in (e.value.details() or "") and "accepts daemons" in (e.value.details() or "")
    with Client(replica.address, ADMIN_TOKEN) as admin:
        assert admin.list_nodes() == []


def test_a_daemon_of_this_release_is_accepted(replica: ReplicaThread) -> None:
    with Client(replica.address, ADMIN_TOKEN) as admin:
        provider = admin.create_token("provider", "neo").secret
    with channel(replica.address) as ch:
        stub = node_pb2_grpc.NodeServiceStub(ch)
        stream = stub.Connect(iter([_hello(__version__)]), metadata=metadata(provider), timeout=5)
        first = next(stream)
        stream.cancel()
    assert first.WhichOneof("message") == "welcome"


def test_the_cli_says_its_own_release_and_the_replicas(
    replica: ReplicaThread, capsys: pytest.CaptureFixture[str]
) -> None:
    from gpufed import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"gpufed {__version__}"
    assert cli.main(["--endpoint", replica.address, "--token", ADMIN_TOKEN, "version"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"client: {__version__}", f"server: {__version__}"]
