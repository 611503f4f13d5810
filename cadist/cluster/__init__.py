"""Joining Ray and sizing work for it: connect, nodes and resources, the network interface, paths
made absolute for workers, the cluster file check. Imports config, storage, tracking (below train)."""
