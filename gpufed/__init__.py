"""gpufed: a federation control plane for GPU capacity.

This package holds what clients and servers share: the generated gpufed.v1 stubs, the Python
SDK (`gpufed.client`), the `gpufed` CLI and logging setup.
"""

__version__ = "0.1.0"
