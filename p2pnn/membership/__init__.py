"""The membership plane: who is in the swarm, where they listen, what they can do.

- records.py: NodeRecord, the signed, expiring description a node publishes
  of itself, its DHT key, and the checks every reader runs (signature, swarm
  credential, freshness, key matches id); Beat, the hash-chain proof of life
  that keeps a record's node live between two records.
- dht.py: DhtNode, the one place that talks to the ``kademlia`` library
  (asyncio, bridged into trio with trio-asyncio); its storage refuses any
  value that is not a valid record for the key it is stored under.
- view.py: MemberView, this node's record and beats and the records of every
  member it knows, kept current by gossip (the ``members`` RPC) and healing.
"""
