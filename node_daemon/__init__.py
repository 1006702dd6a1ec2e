"""The gpufed node daemon: reads GPUs through NVML and streams them to the control plane."""

from gpufed import __version__  # one release for the whole project

__all__ = ["__version__"]
