"""The control plane: election, heartbeats and role assignments between nodes.

- links.py: PeerLinks, signed request/reply messages over WebSocket
  (trio-websocket); refuses anything unsigned, forged, from a non-member,
  stale or replayed.
- election.py: Election, Bully with ranks (priority, preference, node id),
  terms granted by the store's lease (compare-and-set), heartbeats.
- policy.py: assign_roles, the pure function from members to roles.
- swarm.py: SwarmNode, which wires membership, links and election for one
  node and answers the API's /nodes and /cluster.
"""
