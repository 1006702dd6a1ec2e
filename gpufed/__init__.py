"""gpufed: a federation control plane for GPU capacity.

This package holds what clients and servers share: the generated gpufed.v1 stubs, the Python
SDK (`from gpufed import Client`), the `gpufed` CLI, the clock, settings and logging setup.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.3.0.dev0"
__all__ = ["Client", "GpufedError", "__version__"]

if TYPE_CHECKING:
    from gpufed.client import Client, GpufedError


def __getattr__(name: str) -> Any:
    # The SDK is imported on first use, so servers that only need gpufed.v1 do not load it.
    if name in ("Client", "GpufedError"):
        from gpufed import client

        return getattr(client, name)
    raise AttributeError(f"module 'gpufed' has no attribute {name!r}")
