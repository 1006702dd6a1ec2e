"""The application layer: one module per capability, between the servicers and the adapters."""
