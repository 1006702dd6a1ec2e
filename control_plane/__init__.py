"""The gpufed control plane: servicers (thin) -> domain (pure) -> store (etcd adapter)."""
