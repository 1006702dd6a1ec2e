"""Adapters: etcd (store, keyspace, group commit), the in-memory index and its watch, peers."""
