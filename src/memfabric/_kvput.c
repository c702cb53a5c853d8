/* memfabric._frames, part four: same-host MemKV puts of small values, answered in the
 * server's IPC loop with no Python bytecode per request.
 *
 * A same-host put of 4 KiB spent some 50 us in the server's Python (decoding, the namespace
 * check, the keyspace's lock, the lookup, the heap, the slot, the reply) around a round trip
 * of some 15 us. Here the connection's receive loop (recv_packet, _frames.c, given the
 * connection's grants) answers the common put itself and hands every other packet to Python
 * unchanged.
 *
 * Unlike the RPC loop's gets (_kvget.c), a put changes the keyspace, whose state is Python's
 * (the heap, the counters, the version clock, the table's writer). So the put runs with the
 * GIL held, under the keyspace's own lock (`space.lock`, waited for as Python waits: the GIL
 * let go meanwhile), and changes the Python state it must
 * directly: the version clock, the key counts. It takes the key's stripe lock first, as
 * Python's writes do (an INCR or APPEND reads, then writes, under it: a put between the
 * two would be lost); the locks' order is Python's, so waiting cannot deadlock. What it
 * cannot do cheaply it is given or
 * leaves behind:
 *   - memory: a stock of chunks of one size class, allocated from the heap by Python (counted
 *     aside, in space.stocked_bytes, until used);
 *   - the record a put replaces: it rests in the grant's queue for the heap's grace (as any
 *     freed record's memory does), then its chunk serves a later put of the stock's class
 *     here, with no Python: a stream of puts replacing keys needs no refill. What is not
 *     reused, Python frees (kv/put_grants.py settles the queue);
 *   - settings: a grant lasts until `until_ms` (CLOCK_MONOTONIC), the settings' time to live.
 *
 * A packet is a put of this loop's when its map is exactly op "kv_put", id, pool, ns, sec,
 * key, value, and optionally ttl_ms (nil or 1..10**15), nx and xx (false), replicas (nil or 0)
 * and budget_s (a positive number), each once; a grant of the connection names (pool, ns) and
 * the same secId (compared in constant time); the connection has no segment news to hear
 * (conn.gone); the table is current (not moved, closed or draining) and within its lease; a
 * new key leaves it under MAX_LOAD; the record (key + value) fits the stock's class; a key
 * that is there is live, holds an inline value, and lies in a segment the grant names; the
 * memory limit's share (if any) has room without evicting. Anything else: Python's.
 *
 * The slot is written as IndexWriter.write writes it (kv/index.py): seq odd, the fields, the
 * hash, seq even, with release stores, so same-host readers (seqlock) never see it torn.
 *
 * The client: call_put(fd, head, entries, key, value, request_id, budget_s, buffer, max_fds,
 * poll_s) -> (n, fds, flags, waited_s) builds {<head's `entries` pairs: op, pool, ns, sec>,
 * "key", "value", "id", "budget_s"} as msgpack would, sends it and receives the reply as
 * call_packet does (n -3: not sent; -1: no reply in time). n is PUT_STORED (-4) when the
 * reply was exactly {"stored": True, "id": request_id}: nothing left for Python to read.
 */
#include "_frames.h"
#include "_kvlookup.h"
#include "_msgpack.h"
#include "_pyattr.h"
#include <string.h>

#define PUT_STOCK_MAX 64           /* chunks a grant holds at most */
#define PUT_REPLACED_FIRST 64      /* the replaced queue's first room; it doubles as needed, */
/* The replaced records rest here or in Python's heap alike (rate x grace of them: a grace of
 * 64 KiB overwrites at 25k a second is 100 MiB): a queue too short to hold a grace sent every
 * put past it to Python, under the GIL, until the oldest had rested (a door's 64 KiB SETs
 * went there by the thousand, 8k a second where the grant alone does 26k). */
#define PUT_REPLACED_MAX 65536     /* up to this many records */
#define PUT_REPLACED_BYTES (256ULL << 20)   /* and these chunk bytes */
#define PUT_SEGMENTS_MAX 128       /* segments a grant writes or reads keys in (a grace of 64 KiB puts
                                      * replaces records in dozens of the pool's 4 MiB segments) */
#define PUT_MAX_KEY 65536          /* MAX_KV_KEY_BYTES */
#define PUT_MAX_TTL_MS 1000000000000000ULL
#define KV_H_KEYS 4
#define KV_H_TOMBSTONES 5
#define KV_W_VERSION 7
#define KV_TOMBSTONE 1
#define PUT_CLASSES_MAX 128

/* The heap's chunk sizes (kv/heap.py CLASSES), set once (kv_put_setup): a replaced record's cost. */
static uint64_t classes[PUT_CLASSES_MAX];
static int n_classes = 0;

static uint64_t chunk_of(uint64_t size) {      /* 0: no class holds it */
    for (int i = 0; i < n_classes; i++)
        if (classes[i] >= size)
            return classes[i];
    return 0;
}

typedef struct {
    uint64_t id;
    char *base;
    uint64_t len;
} PutSegment;

typedef struct {
    uint64_t segment, offset;
} Stocked;

typedef struct {
    uint64_t segment, offset, klen, vlen, expiry, extents, version;
    uint64_t until_ms;           /* CLOCK_MONOTONIC ms its grace ends: it may serve again after */
    uint64_t chunk;              /* its chunk's bytes */
} Replaced;

typedef struct {
    PyObject_HEAD
    char *names;                 /* pool, ns, sec back to back */
    size_t pool_n, ns_n, sec_n;
    PyObject *space, *lock, *key_locks, *writer, *conn;   /* set by refill; NULL: nothing granted */
    Py_buffer words_buf, refs_buf;
    uint64_t *words;
    uint64_t nwords;
    unsigned char *refs;
    Py_ssize_t nrefs;
    PutSegment segments[PUT_SEGMENTS_MAX];
    Py_buffer segment_bufs[PUT_SEGMENTS_MAX];
    int n_segments;
    Stocked stock[PUT_STOCK_MAX];
    int n_stock;
    uint64_t chunk_bytes;        /* the stock's class */
    uint64_t min_record;         /* records of min_record..chunk_bytes bytes take that class */
    Replaced *replaced;          /* a ring, oldest first: what puts replaced, resting */
    uint32_t replaced_room, replaced_head, n_replaced;
    uint64_t replaced_bytes;     /* their chunks' bytes */
    uint64_t grace_ms;           /* how long a replaced record rests before its chunk serves again */
    long long share;             /* the memory limit's share here; -1: no limit */
    uint64_t until_ms;           /* CLOCK_MONOTONIC ms the grant holds until */
    unsigned long long served;
} KvPutGrant;

static PyObject *s_acquire, *s_release, *s_last_version, *s_primary_keys, *s_stocked_bytes, *s_keys,
    *s_tombstones, *s_gone, *s_heap, *s_record_bytes, *s_large_bytes, *s_reserved_bytes, *s_busy;

static void drop_views(KvPutGrant *g) {         /* with the GIL */
    for (int i = 0; i < g->n_segments; i++)
        PyBuffer_Release(&g->segment_bufs[i]);
    g->n_segments = 0;
}

static void drop_table(KvPutGrant *g) {
    if (g->words != NULL) {
        PyBuffer_Release(&g->words_buf);
        PyBuffer_Release(&g->refs_buf);
        g->words = NULL;
        g->refs = NULL;
    }
    Py_CLEAR(g->space);
    Py_CLEAR(g->lock);
    Py_CLEAR(g->key_locks);
    Py_CLEAR(g->writer);
    Py_CLEAR(g->conn);
}

static PyObject *grant_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *pool_o, *ns_o;
    Py_buffer sec;
    if (!PyArg_ParseTuple(args, "UUy*", &pool_o, &ns_o, &sec))
        return NULL;
    Py_ssize_t pool_n, ns_n;
    const char *pool = PyUnicode_AsUTF8AndSize(pool_o, &pool_n), *ns = pool == NULL ? NULL
                       : PyUnicode_AsUTF8AndSize(ns_o, &ns_n);
    KvPutGrant *g = NULL;
    if (ns != NULL && (g = (KvPutGrant *)type->tp_alloc(type, 0)) != NULL) {
        g->names = PyMem_Malloc((size_t)(pool_n + ns_n + sec.len) + 1);
        if (g->names == NULL) {
            Py_CLEAR(g);
            PyErr_NoMemory();
        } else {
            memcpy(g->names, pool, (size_t)pool_n);
            memcpy(g->names + pool_n, ns, (size_t)ns_n);
            memcpy(g->names + pool_n + ns_n, sec.buf, (size_t)sec.len);
            g->pool_n = (size_t)pool_n;
            g->ns_n = (size_t)ns_n;
            g->sec_n = (size_t)sec.len;
            g->share = -1;
        }
    }
    PyBuffer_Release(&sec);
    return (PyObject *)g;
}

static void grant_dealloc(KvPutGrant *g) {
    drop_views(g);
    drop_table(g);
    PyMem_Free(g->names);
    PyMem_Free(g->replaced);
    Py_TYPE(g)->tp_free((PyObject *)g);
}

/* refill(space, writer, index, refs, conn, chunk_bytes, min_record, stock, segments, share,
 * until_ms, grace_ms): the grant covers `space` (its lock, its table's `writer`, `index` words
 * and `refs`) for `conn`, with `stock` [(segment, offset)] more chunks of chunk_bytes for
 * records of min_record..chunk_bytes bytes (a stock of another class must have been taken
 * back), and `segments` [(id, view)] (replacing those it had); a record its puts replace rests
 * grace_ms (the heap's grace) before its chunk serves again. Python calls it under the
 * keyspace's lock. */
static PyObject *grant_refill(KvPutGrant *g, PyObject *args) {
    PyObject *space, *writer, *index_o, *refs_o, *conn, *stock, *segments;
    unsigned long long chunk_bytes, min_record, until_ms, grace_ms;
    long long share;
    if (!PyArg_ParseTuple(args, "OOOOOKKO!O!LKK", &space, &writer, &index_o, &refs_o, &conn, &chunk_bytes,
                          &min_record, &PyList_Type, &stock, &PyList_Type, &segments, &share, &until_ms, &grace_ms))
        return NULL;
    if (PyList_GET_SIZE(segments) > PUT_SEGMENTS_MAX || (g->n_stock && chunk_bytes != g->chunk_bytes)
            || g->n_stock + PyList_GET_SIZE(stock) > PUT_STOCK_MAX || min_record == 0 || min_record > chunk_bytes) {
        PyErr_SetString(PyExc_ValueError, "a refill beyond the grant's bounds, or of another class");
        return NULL;
    }
    /* All that is new first, into these: a failure leaves the grant as it was. */
    PyObject *lock = NULL, *key_locks = NULL;
    Py_buffer words = {0}, refs = {0}, bufs[PUT_SEGMENTS_MAX];
    PutSegment segs[PUT_SEGMENTS_MAX];
    Stocked more[PUT_STOCK_MAX];
    int n = 0;
    Py_ssize_t n_more = PyList_GET_SIZE(stock);
    if ((lock = PyObject_GetAttrString(space, "lock")) == NULL
            || (key_locks = PyObject_GetAttrString(space, "key_locks")) == NULL)
        goto fail;
    if (!PyList_Check(key_locks) || PyList_GET_SIZE(key_locks) == 0) {
        PyErr_SetString(PyExc_TypeError, "a keyspace's key_locks is a list of locks");
        goto fail;
    }
    if (PyObject_GetBuffer(index_o, &words, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        words.buf = NULL;
        goto fail;
    }
    if (words.len % 8 || (uintptr_t)words.buf % 8 || words.len / 8 < KV_HEADER_WORDS) {
        PyErr_SetString(PyExc_ValueError, "an index is aligned 64-bit words, at least its header");
        goto fail;
    }
    if (PyObject_GetBuffer(refs_o, &refs, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        refs.buf = NULL;
        goto fail;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(segments); i++) {
        unsigned long long id;
        PyObject *view;
        PyObject *item = PyList_GET_ITEM(segments, i);
        if (!PyTuple_Check(item) || !PyArg_ParseTuple(item, "KO", &id, &view)
                || PyObject_GetBuffer(view, &bufs[n], PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "a segment is (id, view)");
            goto fail;
        }
        segs[n] = (PutSegment){id, bufs[n].buf, (uint64_t)bufs[n].len};
        n++;
    }
    /* Every chunk of the stock, new and kept, must lie in a segment given. */
    for (Py_ssize_t i = 0; i < n_more + g->n_stock; i++) {
        unsigned long long segment, offset;
        int known = 0;
        if (i < n_more) {
            PyObject *item = PyList_GET_ITEM(stock, i);
            if (!PyTuple_Check(item) || !PyArg_ParseTuple(item, "KK", &segment, &offset))
                goto fail;
            more[i] = (Stocked){segment, offset};
        } else {
            segment = g->stock[i - n_more].segment;
            offset = g->stock[i - n_more].offset;
        }
        for (int k = 0; k < n; k++)
            known |= segs[k].id == segment && offset <= segs[k].len && chunk_bytes <= segs[k].len - offset;
        if (!known) {
            PyErr_SetString(PyExc_ValueError, "a stocked chunk outside the segments given");
            goto fail;
        }
    }
    drop_views(g);
    drop_table(g);
    memcpy(g->segments, segs, sizeof(PutSegment) * (size_t)n);
    memcpy(g->segment_bufs, bufs, sizeof(Py_buffer) * (size_t)n);
    g->n_segments = n;
    memcpy(g->stock + g->n_stock, more, sizeof(Stocked) * (size_t)n_more);
    g->n_stock += (int)n_more;
    g->words_buf = words;
    g->refs_buf = refs;
    g->words = (uint64_t *)words.buf;
    g->nwords = (uint64_t)words.len / 8;
    g->refs = (unsigned char *)refs.buf;
    g->nrefs = refs.len;
    g->lock = lock;
    g->key_locks = key_locks;
    Py_INCREF(space);
    g->space = space;
    Py_INCREF(writer);
    g->writer = writer;
    Py_INCREF(conn);
    g->conn = conn;
    g->chunk_bytes = chunk_bytes;
    g->min_record = min_record;
    g->share = share;
    g->until_ms = until_ms;
    g->grace_ms = grace_ms;
    Py_RETURN_NONE;
fail:
    if (!PyErr_Occurred())
        PyErr_SetString(PyExc_TypeError, "a stocked chunk is (segment, offset)");
    for (int k = 0; k < n; k++)
        PyBuffer_Release(&bufs[k]);
    if (words.buf != NULL)
        PyBuffer_Release(&words);
    if (refs.buf != NULL)
        PyBuffer_Release(&refs);
    Py_XDECREF(lock);
    Py_XDECREF(key_locks);
    return NULL;
}

static PyObject *stocked_item(KvPutGrant *g, int i) {
    return Py_BuildValue("(KK)", (unsigned long long)g->stock[i].segment, (unsigned long long)g->stock[i].offset);
}

static PyObject *replaced_item(KvPutGrant *g, int i) {
    Replaced *r = &g->replaced[(g->replaced_head + (uint32_t)i) % g->replaced_room];
    return Py_BuildValue("((KKKKKKK)K)", (unsigned long long)r->segment, (unsigned long long)r->offset,
                         (unsigned long long)r->klen, (unsigned long long)r->vlen, (unsigned long long)r->expiry,
                         (unsigned long long)r->extents, (unsigned long long)r->version,
                         (unsigned long long)r->until_ms);
}

/* [item(g, i) for i < *count], and *count set to 0: what the grant hands over. */
static PyObject *hand_over(KvPutGrant *g, int *count, PyObject *(*item)(KvPutGrant *, int)) {
    PyObject *out = PyList_New(*count);
    for (int i = 0; out != NULL && i < *count; i++) {
        PyObject *one = item(g, i);
        if (one == NULL)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, i, one);
    }
    if (out != NULL)
        *count = 0;
    return out;
}

/* take_stock() -> [(segment, offset)]: the chunks not used, no longer the grant's. */
static PyObject *grant_take_stock(KvPutGrant *g, PyObject *Py_UNUSED(ignored)) {
    return hand_over(g, &g->n_stock, stocked_item);
}

/* take_replaced() -> [(fields, until_ms)]: the records puts replaced and did not reuse,
 * oldest first, for Python to free, each with the CLOCK_MONOTONIC ms its grace ends (it
 * rested here since it was replaced). */
static PyObject *grant_take_replaced(KvPutGrant *g, PyObject *Py_UNUSED(ignored)) {
    int n = (int)g->n_replaced;
    PyObject *out = hand_over(g, &n, replaced_item);
    if (out != NULL) {
        g->n_replaced = 0;
        g->replaced_head = 0;
        g->replaced_bytes = 0;
    }
    return out;
}

/* drop_views(): no segment's memory is reached through the grant any more (one may be
 * destroyed); it serves again once refilled. */
static PyObject *grant_drop_views(KvPutGrant *g, PyObject *Py_UNUSED(ignored)) {
    drop_views(g);
    Py_RETURN_NONE;
}

/* close(): nothing is granted; the stock and the queue are forgotten (take them first). */
static PyObject *grant_close(KvPutGrant *g, PyObject *Py_UNUSED(ignored)) {
    drop_views(g);
    drop_table(g);
    g->n_stock = 0;
    g->n_replaced = 0;
    g->replaced_head = 0;
    g->replaced_bytes = 0;
    Py_RETURN_NONE;
}

static PyObject *grant_served(KvPutGrant *g, void *Py_UNUSED(closure)) {
    return PyLong_FromUnsignedLongLong(g->served);
}

static PyObject *grant_chunk_bytes(KvPutGrant *g, void *Py_UNUSED(closure)) {
    return PyLong_FromUnsignedLongLong(g->chunk_bytes);
}

static PyObject *grant_stocked(KvPutGrant *g, void *Py_UNUSED(closure)) {
    return PyLong_FromLong(g->n_stock);
}

static PyObject *grant_queued(KvPutGrant *g, void *Py_UNUSED(closure)) {
    return PyLong_FromUnsignedLong(g->n_replaced);
}

static PyObject *grant_oldest_replaced_ms(KvPutGrant *g, void *Py_UNUSED(closure)) {
    if (g->n_replaced == 0)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(g->replaced[g->replaced_head].until_ms - g->grace_ms);
}

static PyObject *grant_stock_segments(KvPutGrant *g, void *Py_UNUSED(closure)) {
    PyObject *out = PySet_New(NULL);
    for (int i = 0; out != NULL && i < g->n_stock; i++) {
        PyObject *id = PyLong_FromUnsignedLongLong(g->stock[i].segment);
        if (id == NULL || PySet_Add(out, id) < 0)
            Py_CLEAR(out);
        Py_XDECREF(id);
    }
    return out;
}

/* queued_segments: the segments of the replaced records, in the queue's order (the oldest's
 * first: the next to serve again), each once, at most PUT_SEGMENTS_MAX. */
static PyObject *grant_queued_segments(KvPutGrant *g, void *Py_UNUSED(closure)) {
    uint64_t seen[PUT_SEGMENTS_MAX];
    int n = 0;
    PyObject *out = PyList_New(0);
    for (uint32_t i = 0; out != NULL && i < g->n_replaced && n < PUT_SEGMENTS_MAX; i++) {
        uint64_t id = g->replaced[(g->replaced_head + i) % g->replaced_room].segment;
        int known = 0;
        for (int k = 0; k < n; k++)
            known |= seen[k] == id;
        if (known)
            continue;
        seen[n++] = id;
        PyObject *o = PyLong_FromUnsignedLongLong(id);
        if (o == NULL || PyList_Append(out, o) < 0)
            Py_CLEAR(out);
        Py_XDECREF(o);
    }
    return out;
}

static PyMethodDef grant_methods[] = {
    {"refill", (PyCFunction)grant_refill, METH_VARARGS, "refill(space, writer, index, refs, conn, chunk_bytes, "
     "min_record, stock, segments, share, until_ms, grace_ms)"},
    {"take_stock", (PyCFunction)grant_take_stock, METH_NOARGS, "take_stock() -> [(segment, offset)]"},
    {"take_replaced", (PyCFunction)grant_take_replaced, METH_NOARGS, "take_replaced() -> [(fields, until_ms)]"},
    {"drop_views", (PyCFunction)grant_drop_views, METH_NOARGS, "drop_views()"},
    {"close", (PyCFunction)grant_close, METH_NOARGS, "close()"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef grant_getset[] = {
    {"served", (getter)grant_served, NULL, "puts answered here", NULL},
    {"stocked", (getter)grant_stocked, NULL, "chunks in stock", NULL},
    {"queued", (getter)grant_queued, NULL, "replaced records resting in the grant (reused, or freed by Python)", NULL},
    {"oldest_replaced_ms", (getter)grant_oldest_replaced_ms, NULL,
     "when the oldest of them was replaced (CLOCK_MONOTONIC ms; None: none)", NULL},
    {"stock_segments", (getter)grant_stock_segments, NULL, "the segments of the chunks in stock", NULL},
    {"queued_segments", (getter)grant_queued_segments, NULL,
     "the segments of the replaced records, the oldest's first (at most PUT_SEGMENTS_MAX)", NULL},
    {"chunk_bytes", (getter)grant_chunk_bytes, NULL, "the stock's chunk size", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject KvPutGrantType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "memfabric._frames.KvPutGrant",
    .tp_basicsize = sizeof(KvPutGrant),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "KvPutGrant(pool, ns, sec): one IPC connection's puts into one keyspace, answered compiled",
    .tp_new = grant_new,
    .tp_dealloc = (destructor)grant_dealloc,
    .tp_methods = grant_methods,
    .tp_getset = grant_getset,
};

/* ---- the request ---------------------------------------------------------------------------- */

typedef KvPutRequest PutRequest;

/* Whether `b` is exactly a put this loop serves (see the header), its parts in `q`. */
static int parse_put(const unsigned char *b, size_t n, PutRequest *q) {
    Field f[] = {{"op", F_IS, 1, "kv_put"}, {"id", F_INT, 1}, {"pool", F_STR, 1}, {"ns", F_STR, 1},
                 {"sec", F_BIN, 1}, {"key", F_BIN, 1}, {"value", F_BIN, 1},
                 {"ttl_ms", F_NIL_OR_UPTO, 0, NULL, PUT_MAX_TTL_MS}, {"nx", F_FALSE}, {"xx", F_FALSE},
                 {"replicas", F_NIL_OR_ZERO}, {"budget_s", F_POSITIVE}};
    if (!read_request(b, n, f, 12) || f[1].n > 9 || f[5].n == 0 || f[5].n > PUT_MAX_KEY)
        return 0;
    *q = (PutRequest){f[2].at, f[3].at, f[4].at, f[5].at, f[6].at, f[1].at, f[2].n, f[3].n, f[4].n, f[5].n, f[6].n,
                      f[1].n, f[7].value};
    return 1;
}

/* ---- the put ----------------------------------------------------------------------------------- */

static PutSegment *segment_of(KvPutGrant *g, uint64_t id) {
    for (int i = 0; i < g->n_segments; i++)
        if (g->segments[i].id == id)
            return &g->segments[i];
    return NULL;
}

static inline void store_release(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

/* Where `key` is in the table: its slot (*found 1), or the slot a new entry takes (*found
 * 0); -1: Python's (a record in a segment the grant does not name, or no room). With the
 * keyspace's lock held: nothing changes the table meanwhile. */
static long long place(KvPutGrant *g, uint64_t h, const unsigned char *key, size_t klen, int *found) {
    uint64_t *w = g->words, slots = w[KV_H_SLOTS];
    if (slots == 0 || (slots & (slots - 1)) || slots > (g->nwords - KV_HEADER_WORDS) / KV_SLOT_WORDS
            || (Py_ssize_t)slots > g->nrefs)
        return -1;
    uint64_t mask = slots - 1, slot = h & mask;
    long long free_slot = -1;
    for (uint64_t probes = 0; probes < slots; probes++, slot = (slot + 1) & mask) {
        uint64_t *s = w + KV_HEADER_WORDS + slot * KV_SLOT_WORDS;
        uint64_t stored = s[KV_W_HASH];
        if (stored == KV_EMPTY) {
            *found = 0;
            return free_slot >= 0 ? free_slot : (long long)slot;
        }
        if (stored == KV_TOMBSTONE) {
            if (free_slot < 0)
                free_slot = (long long)slot;
            continue;
        }
        if (stored != h || (s[KV_W_OFFSET_KLEN] >> 32) != klen)
            continue;
        PutSegment *seg = segment_of(g, s[KV_W_SEGMENT]);
        uint64_t offset = s[KV_W_OFFSET_KLEN] & KV_LOW32;
        if (seg == NULL || offset > seg->len || klen > seg->len - offset)
            return -1;
        if (memcmp(seg->base + offset, key, klen) == 0) {
            *found = 1;
            return (long long)slot;
        }
    }
    return -1;
}

/* Bytes the keyspace holds as Python counts them (KeySpace.used_bytes); -1: unknown. */
static long long used_bytes(KvPutGrant *g) {
    PyObject *heap = PyObject_GetAttr(g->space, s_heap);
    if (heap == NULL) {
        PyErr_Clear();
        return -1;
    }
    long long records = attr_ll_or_minus_one(heap, s_record_bytes);
    Py_DECREF(heap);
    long long large = attr_ll_or_minus_one(g->space, s_large_bytes), reserved = attr_ll_or_minus_one(g->space, s_reserved_bytes),
              stocked = attr_ll_or_minus_one(g->space, s_stocked_bytes);
    if (records < 0 || large < 0 || reserved < 0 || stocked < 0)
        return -1;
    return records + large + reserved - stocked;
}

/* Room in the replaced queue for `n` records (grown as needed, within its bounds). */
static int replaced_room_for(KvPutGrant *g, uint32_t n) {
    if (n <= g->replaced_room)
        return 1;
    if (g->replaced_room >= PUT_REPLACED_MAX)
        return 0;
    uint32_t room = g->replaced_room ? 2 * g->replaced_room : PUT_REPLACED_FIRST;
    Replaced *ring = PyMem_Malloc(sizeof(Replaced) * room);
    if (ring == NULL)
        return 0;
    for (uint32_t i = 0; i < g->n_replaced; i++)
        ring[i] = g->replaced[(g->replaced_head + i) % g->replaced_room];
    PyMem_Free(g->replaced);
    g->replaced = ring;
    g->replaced_room = room;
    g->replaced_head = 0;
    return n <= room;
}

/* The segment of the oldest replaced record, when its chunk may serve this put again: it has
 * rested its grace (readers that raced its replacement have seen the slot change), is of the
 * stock's class, inline, in a segment the grant reaches, and no reply is being sent from it
 * (space.busy: Python holds records a slow reply reads); NULL otherwise. */
static PutSegment *reusable(KvPutGrant *g, uint64_t now_ms) {
    if (g->n_replaced == 0)
        return NULL;
    Replaced *r = &g->replaced[g->replaced_head];
    if (r->until_ms > now_ms || r->chunk != g->chunk_bytes || (r->extents & KV_LOW32) != 0)
        return NULL;
    PutSegment *seg = segment_of(g, r->segment);
    if (seg == NULL || r->offset > seg->len || g->chunk_bytes > seg->len - r->offset)
        return NULL;
    PyObject *busy = PyObject_GetAttr(g->space, s_busy);
    int held = busy == NULL || !PyDict_Check(busy);
    if (!held && PyDict_GET_SIZE(busy)) {
        PyObject *place = Py_BuildValue("(KK)", (unsigned long long)r->segment, (unsigned long long)r->offset);
        held = place == NULL || PyDict_Contains(busy, place) != 0;
        Py_XDECREF(place);
    }
    Py_XDECREF(busy);
    if (held) {
        PyErr_Clear();
        return NULL;
    }
    return seg;
}

/* The put, with the GIL and the keyspace's lock held: 1 done, 0 Python's (nothing changed).
 * Its chunk is the oldest replaced record's when that may serve again (no memory taken: it
 * was counted as a record all along), else one of the stock's. */
static int put_locked(KvPutGrant *g, const PutRequest *q, uint64_t h) {
    uint64_t *w = g->words;
    if (w[KV_H_MAGIC] != KV_MAGIC || w[KV_H_VERSION] != KV_VERSION || w[KV_H_MOVED] != 0 || w[KV_H_DRAINING] != 0
            || w[KV_H_LEASE] <= kv_lease_now_ms())
        return 0;                /* closed, followed, draining, or not vouched for */
    uint64_t size = (uint64_t)(q->key_n + q->value_n);
    if (size < g->min_record || size > g->chunk_bytes)
        return 0;
    int found = 0;
    long long at = place(g, h, q->key, q->key_n, &found);
    if (at < 0)
        return 0;
    uint64_t mono_ms = kv_lease_now_ms();
    PutSegment *reuse = reusable(g, mono_ms);
    if (reuse == NULL && g->n_stock == 0)
        return 0;
    uint64_t slot = (uint64_t)at, *s = w + KV_HEADER_WORDS + slot * KV_SLOT_WORDS;
    uint64_t now_ms = kv_now_ms();
    Replaced old = {0};
    if (found) {
        old = (Replaced){s[KV_W_SEGMENT], s[KV_W_OFFSET_KLEN] & KV_LOW32, s[KV_W_OFFSET_KLEN] >> 32, s[KV_W_VLEN],
                         s[KV_W_EXPIRY], s[KV_W_EXTENTS], s[KV_W_VERSION]};
        if ((old.extents & KV_LOW32) != 0 || (old.expiry && old.expiry <= now_ms))
            return 0;            /* a large value's, or expired (Python deletes and counts it) */
        old.until_ms = mono_ms + g->grace_ms;
        old.chunk = chunk_of(old.klen + old.vlen);
        if (old.chunk == 0 || g->replaced_bytes + old.chunk > PUT_REPLACED_BYTES
                || !replaced_room_for(g, g->n_replaced + (reuse == NULL)))
            return 0;            /* the queue is full: Python frees it */
    }
    uint64_t keys = w[KV_H_KEYS], tombstones = w[KV_H_TOMBSTONES], slots = w[KV_H_SLOTS];
    int was_tombstone = !found && s[KV_W_HASH] == KV_TOMBSTONE;
    if (!found && (keys + tombstones + 1) * 2 > slots)
        return 0;                /* MAX_LOAD: Python grows the table */
    if (g->share >= 0) {
        /* Whichever chunk the put takes: a reused one was counted all along, but as no key's,
         * and the key needs room all the same. The records resting here still count (as in
         * Python's figure: one held by a reply stays counted when freed), so a put near the
         * limit is Python's, which frees them first. */
        uint64_t freed = found ? old.chunk : 0;
        long long used = used_bytes(g);
        if (used < 0 || (found && freed == 0))
            return 0;
        if (g->chunk_bytes > freed && used + (long long)(g->chunk_bytes - freed) > g->share)
            return 0;            /* Python evicts, or refuses */
    }
    /* Everything Python's that may fail, before anything changes. */
    long long last = attr_ll_or_minus_one(g->space, s_last_version), primary = attr_ll_or_minus_one(g->space, s_primary_keys),
              stocked = attr_ll_or_minus_one(g->space, s_stocked_bytes);
    if (last < 0 || primary < 0 || (reuse == NULL && stocked < (long long)g->chunk_bytes))
        return 0;
    uint64_t version = (uint64_t)last + 1, clock = kv_now_ms() << 20;
    if (clock > version)
        version = clock;
    PyObject *version_o = PyLong_FromUnsignedLongLong(version);
    if (version_o == NULL) {
        PyErr_Clear();
        return 0;
    }
    Stocked chunk;
    PutSegment *seg = reuse;
    if (reuse != NULL) {
        Replaced *r = &g->replaced[g->replaced_head];
        chunk = (Stocked){r->segment, r->offset};
        g->replaced_bytes -= r->chunk;
        g->replaced_head = (g->replaced_head + 1) % g->replaced_room;
        g->n_replaced--;
    } else {
        chunk = g->stock[g->n_stock - 1];
        seg = segment_of(g, chunk.segment);
        if (seg == NULL) {
            Py_DECREF(version_o);
            return 0;            /* its view was dropped: refilled first */
        }
        g->n_stock--;
    }
    memcpy(seg->base + chunk.offset, q->key, q->key_n);
    if (q->value_n)
        memcpy(seg->base + chunk.offset + q->key_n, q->value, q->value_n);
    uint64_t expiry = q->ttl_ms ? now_ms + q->ttl_ms : 0;
    uint64_t seq = s[KV_W_SEQ];
    store_release(&s[KV_W_SEQ], seq + 1);
    store_release(&s[KV_W_SEGMENT], chunk.segment);
    store_release(&s[KV_W_OFFSET_KLEN], chunk.offset | (uint64_t)q->key_n << 32);
    store_release(&s[KV_W_VLEN], q->value_n);
    store_release(&s[KV_W_EXPIRY], expiry);
    store_release(&s[KV_W_EXTENTS], 0);          /* inline, the namespace's replicas */
    store_release(&s[KV_W_VERSION], version);
    store_release(&s[KV_W_HASH], h);
    store_release(&s[KV_W_SEQ], seq + 2);
    /* Python's figures follow; a failure to set one (memory) leaves a count off, not the table. */
    int failed = PyObject_SetAttr(g->space, s_last_version, version_o) < 0;
    Py_DECREF(version_o);
    if (reuse == NULL)
        failed |= set_ll(g->space, s_stocked_bytes, stocked - (long long)g->chunk_bytes) < 0;
    if (found) {
        g->replaced[(g->replaced_head + g->n_replaced) % g->replaced_room] = old;
        g->n_replaced++;
        g->replaced_bytes += old.chunk;
        g->refs[slot] = 1;       /* used: the eviction clock keeps it a round (as Store.live) */
    } else {
        keys++;
        if (was_tombstone)
            tombstones--;
        store_release(&w[KV_H_KEYS], keys);
        store_release(&w[KV_H_TOMBSTONES], tombstones);
        failed |= set_ll(g->writer, s_keys, (long long)keys) < 0;
        failed |= set_ll(g->writer, s_tombstones, (long long)tombstones) < 0;
        failed |= set_ll(g->space, s_primary_keys, primary + 1) < 0;
    }
    if (failed)
        PyErr_Clear();
    g->served++;
    return 1;
}

/* kv_put_apply(grants, q), with the GIL: 1 when the put `q` was one the grants (a list)
 * cover and is done, 0 when it is Python's (nothing changed). */
int kv_put_apply(PyObject *grants, const KvPutRequest *q_) {
    const PutRequest q = *q_;
    if (!PyList_Check(grants) || PyList_GET_SIZE(grants) == 0 || !kv_hash_ready() || q.key_n == 0
            || q.key_n > PUT_MAX_KEY)
        return 0;
    KvPutGrant *g = NULL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(grants); i++) {
        PyObject *item = PyList_GET_ITEM(grants, i);
        if (Py_TYPE(item) != &KvPutGrantType)
            continue;
        KvPutGrant *c = (KvPutGrant *)item;
        if (c->pool_n == q.pool_n && c->ns_n == q.ns_n && memcmp(c->names, q.pool, q.pool_n) == 0
                && memcmp(c->names + c->pool_n, q.ns, q.ns_n) == 0) {
            g = c;
            break;
        }
    }
    if (g == NULL || g->words == NULL || !kv_same_secret((const unsigned char *)g->names + g->pool_n + g->ns_n,
                                                         g->sec_n, q.sec, q.sec_n)
            || kv_lease_now_ms() >= g->until_ms)
        return 0;
    PyObject *gone = PyObject_GetAttr(g->conn, s_gone);    /* segment news go in Python's reply */
    int news = gone == NULL || !PyList_Check(gone) || PyList_GET_SIZE(gone) != 0;
    Py_XDECREF(gone);
    if (news) {
        PyErr_Clear();
        return 0;
    }
    uint64_t h = kv_key_hash(q.key, q.key_n);
    Py_INCREF(g);                /* the grant outlives the put, whatever Python does meanwhile */
    /* The key's stripe, then the keyspace's lock, in the order Python's writes take them (so
     * waiting for them is safe), and waiting as Python's do (the GIL let go meanwhile): a put
     * that left for Python whenever another thread held one made a busy keyspace's puts
     * queue up in Python, where they hold the locks longer. */
    PyObject *stripe = PyList_GET_ITEM(g->key_locks, (Py_ssize_t)(h % (uint64_t)PyList_GET_SIZE(g->key_locks)));
    Py_INCREF(stripe);
    int done = 0;
    PyObject *lock = g->lock;    /* ours: a close while we wait (GIL let go) clears the grant's */
    Py_INCREF(lock);
    PyObject *took_stripe = PyObject_CallMethodNoArgs(stripe, s_acquire);
    if (took_stripe == Py_True) {
        PyObject *took = PyObject_CallMethodNoArgs(lock, s_acquire);
        if (took == Py_True) {
            done = g->words != NULL && put_locked(g, &q, h);     /* rechecked: it may be closed now */
            Py_XDECREF(PyObject_CallMethodNoArgs(lock, s_release));
        }
        Py_XDECREF(took);
        Py_XDECREF(PyObject_CallMethodNoArgs(stripe, s_release));
    }
    Py_XDECREF(took_stripe);
    Py_DECREF(lock);
    Py_DECREF(stripe);
    Py_DECREF(g);
    PyErr_Clear();
    return done;
}

/* kv_put_serve(grants, packet, n, reply, &reply_n), with the GIL: 1 when the packet was a
 * put of the grants' and is done, the reply's bytes in `reply` (PUT_REPLY_ROOM at least); 0
 * when it is Python's (nothing changed). */
int kv_put_serve(PyObject *grants, const unsigned char *packet, size_t n, unsigned char *reply, size_t *reply_n) {
    PutRequest q = {0};
    if (!parse_put(packet, n, &q) || !kv_put_apply(grants, &q))
        return 0;
    size_t k = 0;
    reply[k++] = 0x82;
    k += put_key(reply + k, "stored");
    reply[k++] = 0xc3;
    k += put_key(reply + k, "id");
    memcpy(reply + k, q.id, q.id_n);
    *reply_n = k + q.id_n;
    return 1;
}

/* ---- the client's call ----------------------------------------------------------------------- */

#define PUT_STORED (-4)

static size_t put_bin_header(unsigned char *p, size_t n) {
    if (n <= 0xff) {
        p[0] = 0xc4;
        p[1] = (unsigned char)n;
        return 2;
    }
    if (n <= 0xffff) {
        p[0] = 0xc5;
        p[1] = (unsigned char)(n >> 8);
        p[2] = (unsigned char)n;
        return 3;
    }
    p[0] = 0xc6;
    for (int i = 0; i < 4; i++)
        p[1 + i] = (unsigned char)(n >> (8 * (3 - i)));
    return 5;
}

static PyObject *call_put(PyObject *Py_UNUSED(self), PyObject *args) {
    int fd, entries, max_fds;
    Py_buffer head, key, value;
    unsigned long long request_id;
    double budget_s, poll_s, waited = 0.0;
    PyObject *buffer_obj;
    if (!PyArg_ParseTuple(args, "iy*iy*y*KdOid", &fd, &head, &entries, &key, &value, &request_id, &budget_s,
                          &buffer_obj, &max_fds, &poll_s))
        return NULL;
    PyObject *result = NULL;
    unsigned char *request = NULL;
    if (entries < 0 || entries > 11 || key.len > UINT32_MAX || value.len > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "a put's head has at most 11 pairs; keys and values under 4 GiB");
        goto out;
    }
    size_t room = 1 + (size_t)head.len + 4 + 5 + (size_t)key.len + 6 + 5 + (size_t)value.len + 3 + 9 + 9 + 9;
    request = PyMem_Malloc(room);
    if (request == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    size_t n = 0;
    request[n++] = (unsigned char)(0x80 | (entries + 4));
    memcpy(request + n, head.buf, (size_t)head.len);
    n += (size_t)head.len;
    n += put_key(request + n, "key");
    n += put_bin_header(request + n, (size_t)key.len);
    memcpy(request + n, key.buf, (size_t)key.len);
    n += (size_t)key.len;
    n += put_key(request + n, "value");
    n += put_bin_header(request + n, (size_t)value.len);
    memcpy(request + n, value.buf, (size_t)value.len);
    n += (size_t)value.len;
    n += put_key(request + n, "id");
    n += put_uint(request + n, request_id);
    n += put_key(request + n, "budget_s");
    uint64_t bits;
    memcpy(&bits, &budget_s, 8);
    request[n++] = 0xcb;
    for (int i = 0; i < 8; i++)
        request[n++] = (unsigned char)(bits >> (8 * (7 - i)));
    PyObject *got = receive_packet(fd, buffer_obj, max_fds, poll_s, 0.0, NULL, &waited, (const char *)request, n);
    if (got == NULL)
        goto out;
    Py_ssize_t got_n = PyLong_AsSsize_t(PyTuple_GET_ITEM(got, 0));
    unsigned char expected[PUT_REPLY_ROOM];
    size_t k = 0;
    expected[k++] = 0x82;
    k += put_key(expected + k, "stored");
    expected[k++] = 0xc3;
    k += put_key(expected + k, "id");
    k += put_uint(expected + k, request_id);
    Py_buffer reply;
    int stored = 0;
    if (got_n == (Py_ssize_t)k && PyList_GET_SIZE(PyTuple_GET_ITEM(got, 1)) == 0
            && PyObject_GetBuffer(buffer_obj, &reply, PyBUF_SIMPLE) == 0) {
        stored = reply.len >= (Py_ssize_t)k && memcmp(reply.buf, expected, k) == 0;
        PyBuffer_Release(&reply);
    }
    PyErr_Clear();
    if (stored)
        result = Py_BuildValue("(iOid)", PUT_STORED, PyTuple_GET_ITEM(got, 1), 0, waited);
    else
        result = Py_BuildValue("(OOOd)", PyTuple_GET_ITEM(got, 0), PyTuple_GET_ITEM(got, 1), PyTuple_GET_ITEM(got, 2),
                               waited);
    Py_DECREF(got);
out:
    PyMem_Free(request);
    PyBuffer_Release(&head);
    PyBuffer_Release(&key);
    PyBuffer_Release(&value);
    return result;
}

/* kv_put_setup(classes): the heap's chunk sizes, ascending (kv/heap.py CLASSES). */
static PyObject *kv_put_setup(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *sizes;
    if (!PyArg_ParseTuple(args, "O!", &PyList_Type, &sizes))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(sizes);
    if (n == 0 || n > PUT_CLASSES_MAX) {
        PyErr_SetString(PyExc_ValueError, "1 to 128 chunk sizes");
        return NULL;
    }
    uint64_t got[PUT_CLASSES_MAX];
    for (Py_ssize_t i = 0; i < n; i++) {
        got[i] = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(sizes, i));
        if (PyErr_Occurred())
            return NULL;
        if (i && got[i] <= got[i - 1]) {
            PyErr_SetString(PyExc_ValueError, "chunk sizes ascend");
            return NULL;
        }
    }
    memcpy(classes, got, sizeof(uint64_t) * (size_t)n);
    n_classes = (int)n;
    Py_RETURN_NONE;
}

static PyMethodDef kvput_functions[] = {
    {"kv_put_setup", kv_put_setup, METH_VARARGS, "kv_put_setup(classes): the heap's chunk sizes"},
    {"call_put", call_put, METH_VARARGS, "call_put(fd, head, entries, key, value, request_id, budget_s, buffer, "
     "max_fds, poll_s) -> (n, fds, flags, waited_s)"},
    {NULL, NULL, 0, NULL},
};

int kvput_add_to_module(PyObject *m) {
    struct { PyObject **at; const char *name; } names[] = {
        {&s_acquire, "acquire"}, {&s_release, "release"}, {&s_last_version, "_last_version"},
        {&s_primary_keys, "primary_keys"}, {&s_stocked_bytes, "stocked_bytes"}, {&s_keys, "keys"},
        {&s_tombstones, "tombstones"}, {&s_gone, "gone"}, {&s_heap, "heap"}, {&s_record_bytes, "record_bytes"},
        {&s_large_bytes, "large_bytes"}, {&s_reserved_bytes, "reserved_bytes"}, {&s_busy, "busy"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if ((*names[i].at = PyUnicode_InternFromString(names[i].name)) == NULL)
            return -1;
    if (PyType_Ready(&KvPutGrantType) < 0)
        return -1;
    Py_INCREF(&KvPutGrantType);
    if (PyModule_AddObject(m, "KvPutGrant", (PyObject *)&KvPutGrantType) < 0) {
        Py_DECREF(&KvPutGrantType);
        return -1;
    }
    if (PyModule_AddFunctions(m, kvput_functions) < 0
            || PyModule_AddIntConstant(m, "PUT_STOCK_MAX", PUT_STOCK_MAX) < 0
            || PyModule_AddIntConstant(m, "PUT_SEGMENTS_MAX", PUT_SEGMENTS_MAX) < 0
            || PyModule_AddIntConstant(m, "PUT_STORED", PUT_STORED) < 0)
        return -1;
    return 0;
}
