"""BigMemory, the first of the pool's three semantics: large byte objects you allocate, map,
read, write, copy and gather.

    objects.py    the object table of a namespace, ids that name one object forever (pure)
    placement.py  where an object's bytes go: local, a given server, spread (pure)
    reduce.py     gather arithmetic (pure, numpy)
    layout.py     an object's bytes as pieces of segments; copies over them
    journal.py    persistent pools' crash-safe record of their objects
    space.py      a namespace's objects on one server: the table, its shared generation words
    service.py    the server's BigMemory operations, registered with its dispatcher
    client.py     the client's handles: BigMemory, Mapping
    batch.py      reads and writes of many objects at once (Session.read_many, write_many)

Segments, namespaces, secIds and the server process are shared by every semantic and live
outside this package.
"""
