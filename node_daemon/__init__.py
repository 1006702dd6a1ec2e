"""The gpufed node daemon: reads GPUs through NVML and streams them to the control plane."""

__version__ = "0.1.0"
