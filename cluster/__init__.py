"""What spans nodes and regions: ring, membership, replication, rebalancing."""
