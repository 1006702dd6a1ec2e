"""MIG instances as leasable units: their profile names, their share of a GPU, and which units
exclude which.

A MIG-enabled GPU is listed in its node's inventory together with its instances (each an
entry with `parent_uuid` and `mig_profile`). Searches and leases ask either for whole GPUs (no
profile) or for instances of one profile. A GPU and its instances are never held together: an
instance held takes its parent out of whole-GPU offers, the parent held takes all its
instances. The index applies that to what it offers; the grant's compare-and-swap enforces it
(control_plane/app/lease_txns.py).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping

from gpufed.v1 import common_pb2

MAX_PROFILE = 32
# "1g.10gb", "1c.2g.20gb" (compute instance of a larger GPU instance), "1g.10gb+me" (with media
# extensions), as nvidia-smi names them.
_PROFILE = re.compile(r"^(?:([1-7])c\.)?([1-7])g\.([0-9]{1,3})gb(?:\+[a-z]{1,8})?$")
# A100 and H100 split into seven GPU slices: an instance's share of the GPU's price.
GPU_SLICES = 7
MAX_INSTANCES_PER_GPU = 7


def valid_profile(profile: str) -> bool:
    return len(profile) <= MAX_PROFILE and _PROFILE.fullmatch(profile) is not None


def slices(profile: str) -> int:
    """The GPU slices of a profile ("3g.40gb" -> 3); 0 for a whole GPU (no profile)."""
    m = _PROFILE.fullmatch(profile)
    return int(m[2]) if m else 0


def unit_price(node_price: float, gpu: common_pb2.Gpu) -> float:
    """The price of one unit: the node's per-GPU price, pro rata for an instance."""
    if not gpu.mig_profile:
        return node_price
    return round(node_price * slices(gpu.mig_profile) / GPU_SLICES, 6)


def held_parents(gpus: Collection[common_pb2.Gpu], held: Mapping[str, str]) -> set[str]:
    """Parents of the held instances: no longer free as whole GPUs."""
    return {g.parent_uuid for g in gpus if g.parent_uuid and g.uuid in held}


def is_free(gpu: common_pb2.Gpu, held: Mapping[str, str], parents_held: Collection[str]) -> bool:
    """Free to lease: not held, no instance of it held (a GPU), its parent not held (an instance)."""
    if gpu.uuid in held:
        return False
    if gpu.parent_uuid:
        return gpu.parent_uuid not in held
    return gpu.uuid not in parents_held
