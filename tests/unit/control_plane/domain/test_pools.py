"""Private pools: who sees a pool node, and which capacity each pool choice tries in order."""

from __future__ import annotations

import dataclasses

import pytest

from control_plane.domain import pools
from control_plane.domain.errors import DomainError
from control_plane.domain.filters import Filter, visible
from gpufed.v1 import common_pb2

ACME_NODE = common_pb2.Node(provider="acme-own", node_id="p1", pool_tenant="acme")
PUBLIC_NODE = common_pb2.Node(provider="neo", node_id="n1")


def test_a_pool_node_is_visible_to_its_tenant_and_operators_only() -> None:
    assert visible(ACME_NODE, "acme") and visible(ACME_NODE, None)
    assert not visible(ACME_NODE, "eve") and not visible(ACME_NODE, "")
    assert visible(PUBLIC_NODE, "eve") and visible(PUBLIC_NODE, "")


def test_a_filter_that_does_not_say_who_asks_sees_no_pool() -> None:
    assert Filter().node_matches(ACME_NODE)[0] is False
    assert Filter(viewer="acme").node_matches(ACME_NODE)[0] is True


@pytest.mark.parametrize(
    ("scope", "acme", "public"),
    [("any", True, True), ("own", True, False), ("federation", False, True)],
)
def test_the_pool_scope_narrows_what_the_viewer_sees(scope: str, acme: bool, public: bool) -> None:
    f = dataclasses.replace(Filter(viewer="acme"), pool=scope)
    assert f.node_matches(ACME_NODE)[0] is acme
    assert f.node_matches(PUBLIC_NODE)[0] is public
    assert Filter(viewer="acme", pool=scope).key() != Filter(viewer="eve", pool=scope).key()


def test_the_choices_try_the_pool_first_and_mix_only_when_allowed() -> None:
    assert pools.stages(0, has_pool=True) == ["own", "federation"]
    assert pools.stages(pools.OWN_FIRST, has_pool=True, mixed=True) == ["own", "federation", "any"]
    assert pools.stages(pools.OWN_ONLY, has_pool=True) == ["own"]
    assert pools.stages(pools.FEDERATION_ONLY, has_pool=True) == ["federation"]
    assert pools.stages(0, has_pool=False) == ["federation"]
    assert pools.stages(pools.OWN_ONLY, has_pool=False) == ["own"]  # finds nothing
    with pytest.raises(DomainError) as e:
        pools.validate_choice(9)
    assert e.value.reason == "INVALID_POOL"
