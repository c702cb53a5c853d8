"""MemKV, the pool's second semantic: a key-value store, one keyspace per namespace.

    index.py     a namespace's key index on one server, in shared memory (pure)
    heap.py      where its records live: slabs over pages of its segments (pure)
    rules.py     keys, values, TTLs, and rendezvous placement of keys on servers (pure)
    space.py     a namespace's keyspace on one server: index, heap, limits, counters
    service.py   the server's KV operations, registered with its dispatcher
    client.py    the client's KV: gets without a round trip on the same host
"""
