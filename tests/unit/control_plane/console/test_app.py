"""The console's pure helpers: sparklines, the capacity map's colours, form bounds."""

from __future__ import annotations

import pytest

from control_plane.console import app
from gpufed.v1 import discovery_pb2


def test_a_sparkline_scales_to_its_top_and_carries_the_last_value_over_a_gap() -> None:
    points = app.sparkline([0.0, None, 100.0, 250.0], 100.0).split()
    ys = [float(p.split(",")[1]) for p in points]
    assert len(points) == 4 and ys[0] == ys[1]  # the gap repeats the value before it
    assert ys[2] == ys[3] == 1.0  # the top, clamped
    assert app.sparkline([None, None], 100.0) == ""


def test_the_map_colours_a_country_by_its_share_free_and_sums_its_models() -> None:
    resp = discovery_pb2.SummarizeCapacityResponse()
    resp.buckets.add(gpu_model="H100", country_code="DE", health=1, total_gpus=8, free_gpus=1)
    resp.buckets.add(gpu_model="H100", country_code="DE", health=2, total_gpus=8, free_gpus=0)
    resp.buckets.add(gpu_model="L40S", country_code="NL", total_gpus=4, free_gpus=4)
    resp.buckets.add(gpu_model="A100", country_code="FR", total_gpus=8, free_gpus=0)
    m = app.capacity_map(resp)
    assert (m["DE"]["total"], m["DE"]["free"], m["DE"]["models"]) == (16, 1, [("H100", [1, 16])])
    assert (m["DE"]["class"], m["NL"]["class"], m["FR"]["class"]) == ("cap-1", "cap-4", "cap-0")


def test_form_values_are_bounded_before_any_call() -> None:
    with pytest.raises(app.BadInput):
        app._bounded({"model": "x" * 300})
    with pytest.raises(app.BadInput):
        app._int("2000", "count", 1, 1024)
    with pytest.raises(app.BadInput):
        app._filter_kwargs({"near": "50,8"})
    with pytest.raises(app.BadInput):
        app._offers_request({"order_by": "random"})
    assert app._filter_kwargs({"countries": "de, fr"})["countries"] == ["DE", "FR"]


def test_a_queued_request_shows_its_place_and_an_ended_lease_its_reason() -> None:
    from gpufed.v1 import lease_pb2

    queued = app._lease_row(
        lease_pb2.Lease(name="leases/ab12", state=lease_pb2.LEASE_STATE_QUEUED, gpu_count=4, queue_position=3)
    )
    assert (queued["state"], queued["end"], queued["gpus"], queued["live"]) == ("QUEUED", "#3", 4, True)
    ended = app._lease_row(
        lease_pb2.Lease(
            name="leases/cd34",
            state=lease_pb2.LEASE_STATE_ENDED,
            end_reason=lease_pb2.LEASE_END_REASON_RELEASED,
        )
    )
    assert (ended["state"], ended["end"], ended["live"]) == ("ENDED", "RELEASED", False)
