/* memfabric._frames, part three: remote MemKV gets of small values, answered in the server's
 * RPC loop and called by the client, with no Python per request.
 *
 * A remote get of 4 KiB spent some 100 us in Python on both sides (decoding, the namespace
 * check, the keyspace's lock, encoding the reply, the link's locks and pending table) around
 * some 25 us of kernel work. As with spans (_spans.c), both sides now do the common case in
 * one C call that holds no GIL, and hand everything else to Python unchanged.
 *
 * The server: serve_spans() (_spans.c), given a connection's KvGrants, calls kv_serve() for
 * each frame that is not a span request. It answers the frame itself when its header is
 * exactly {"op": "kv_get", "id", "pool", "ns", "sec", "key"} (in any order, nothing else, no
 * payload) and a grant of this connection covers (pool, ns) with that secId (compared in
 * constant time). The key is looked up in the grant's index as same-host clients do
 * (_kvlookup.h, the same code): a validated miss is answered {"found": False}, a hit of a
 * small value {"found": True, "value": ...}: the reply Python would send, byte for byte. Its
 * refs byte is set (CLOCK recency) and it is counted in two counter words (hits, misses) the
 * grant names, which stats() sums (kv/get_grants.py says why not the stats memfd's slots).
 * Anything else (an expired key, which Python deletes and counts; a large value or one held
 * in extents; a draining or replaced table; a closed keyspace; a lease run out; a segment
 * the grant does not name; a bad request) goes to Python, which answers with today's errors.
 *
 * A grant (KvGrants.add, made by Python after it served a kv_get of the connection with the
 * secId checked) holds exports of the index, refs and counter buffers and of the segments its
 * records were seen in, so no mapping goes while it lives. The loop uses a grant only under
 * the grants' lock: from finding it, through the lookup and the copy of the value into the
 * reply, to counting it; the reply is sent from that copy after the lock is let go. A revoke
 * so waits at most for one lookup (bounded: KV_RETRIES passes over a probe chain), and once
 * it returns no byte of the keyspace is touched under that grant again. Python revokes before
 * the keyspace's memory can go (kv/get_grants.py).
 *
 * The key's hash is the index's: xxh3-64 of the key (kv/rules.py), from the xxhash module's
 * own library (kv_hash_setup), checked against Python's before any grant is made.
 *
 * The client: call_get(fd, block, head, entries, request_id, window_s, polling, timeout_s,
 * frame_timeout_s, max_value) -> (status, polling, value) sends {<head's `entries` pairs>,
 * "id": request_id} and reads the reply, as call_span does. OK (2): the reply was exactly
 * {"found": False, "id"} (value None) or {"found": True, "value": v, "id"} with v of at most
 * max_value bytes (value: v as bytes). BLOCK (0): the reply's first block is in `block` for
 * Python to read as any reply (an error, a hold, a larger value...). NOTHING, STALLED,
 * SEND_TIMEOUT, SEND_STALLED and UNSENT as call_span's; MISMATCH (-6): a reply that began as
 * an inline value did not end as one (the stream is not what it should be: close it).
 */
#include "_frames.h"
#include "_kvlookup.h"
#include "_msgpack.h"
#include <dlfcn.h>
#include <pthread.h>
#include <string.h>

#define MISMATCH (-6)
#define MAX_ID_BYTES 9
/* found, value, a bin32 header, id: what an inline value's reply adds to the value */
#define VALUE_AT (PREFIX_BYTES + 1 + 6 + 1 + 6 + 5)
#define REPLY_TAIL (3 + MAX_ID_BYTES)

typedef uint64_t (*Xxh3)(const void *, size_t);
static Xxh3 xxh3 = NULL;

uint64_t kv_key_hash(const unsigned char *key, size_t n) {
    uint64_t h = xxh3(key, n);
    return h > 1 ? h : h + 2;                /* never EMPTY or TOMBSTONE (index.py fix_hash) */
}

int kv_hash_ready(void) { return xxh3 != NULL; }

/* ---- grants ----------------------------------------------------------------------------------- */

typedef struct {
    uint64_t id;
    const char *base;
    uint64_t len;
} Segment;

typedef struct KvGrant {
    struct KvGrant *next;
    char *names;                 /* pool, ns, sec back to back (one allocation) */
    size_t pool_n, ns_n, sec_n;
    KvTable table;
    uint64_t *counts;            /* the connection's hits word; misses follow it */
    Segment *segments;
    Py_ssize_t n_segments;
    Py_buffer *buffers;          /* exports: index, refs, counters, then the segments' */
    Py_ssize_t n_buffers;
} KvGrant;

typedef struct {
    PyObject_HEAD
    pthread_mutex_t mu;          /* guards the list, and a grant while the loop uses it */
    KvGrant *grants;
    Py_ssize_t count;
    unsigned long long served;   /* gets kv_serve() answered */
    uint64_t max_value;          /* larger values are Python's */
    unsigned char *reply;        /* the loop's reply: VALUE_AT + max_value + REPLY_TAIL, at least FIRST_BLOCK
                                    (made with the first grant) */
} KvGrants;

static void free_grant(KvGrant *g) {     /* with the GIL */
    for (Py_ssize_t i = 0; i < g->n_buffers; i++)
        PyBuffer_Release(&g->buffers[i]);
    PyMem_Free(g->buffers);
    PyMem_Free(g->segments);
    PyMem_Free(g->names);
    PyMem_Free(g);
}

static int names_match(const KvGrant *g, const unsigned char *pool, size_t pool_n, const unsigned char *ns,
                       size_t ns_n) {
    return g->pool_n == pool_n && g->ns_n == ns_n && memcmp(g->names, pool, pool_n) == 0
           && memcmp(g->names + pool_n, ns, ns_n) == 0;
}

/* With the lock: where the grant of these names is linked, or NULL. */
static KvGrant **find(KvGrants *t, const unsigned char *pool, size_t pool_n, const unsigned char *ns, size_t ns_n) {
    for (KvGrant **at = &t->grants; *at != NULL; at = &(*at)->next)
        if (names_match(*at, pool, pool_n, ns, ns_n))
            return at;
    return NULL;
}

int kv_same_secret(const unsigned char *a, size_t a_n, const unsigned char *b, size_t b_n) {
    if (a_n != b_n)
        return 0;
    volatile unsigned char differ = 0;
    for (size_t i = 0; i < a_n; i++)
        differ |= a[i] ^ b[i];
    return differ == 0;
}

static PyObject *grants_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    unsigned long long max_value;
    if (!PyArg_ParseTuple(args, "K", &max_value))
        return NULL;
    if (max_value > (1u << 24)) {
        PyErr_SetString(PyExc_ValueError, "max_value is at most 16 MiB");
        return NULL;
    }
    KvGrants *t = (KvGrants *)type->tp_alloc(type, 0);
    if (t == NULL)
        return NULL;
    t->max_value = max_value;
    pthread_mutex_init(&t->mu, NULL);
    return (PyObject *)t;
}

static void forget_all(KvGrants *t) {     /* with the GIL */
    pthread_mutex_lock(&t->mu);
    KvGrant *g = t->grants;
    t->grants = NULL;
    t->count = 0;
    pthread_mutex_unlock(&t->mu);
    while (g != NULL) {
        KvGrant *next = g->next;
        free_grant(g);
        g = next;
    }
}

static void grants_dealloc(KvGrants *t) {
    forget_all(t);
    pthread_mutex_destroy(&t->mu);
    PyMem_Free(t->reply);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static int utf8_of(PyObject *s, const char **at, Py_ssize_t *n) {
    *at = PyUnicode_AsUTF8AndSize(s, n);
    return *at != NULL;
}

/* Takes an export of `o` into g->buffers (writable or not): its memory, or NULL. */
static char *hold(KvGrant *g, PyObject *o, int writable_too, Py_ssize_t *len) {
    Py_buffer *b = &g->buffers[g->n_buffers];
    if (PyObject_GetBuffer(o, b, writable_too ? PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS : PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    g->n_buffers++;
    *len = b->len;
    return (char *)b->buf;
}

/* add(pool, ns, sec, index, refs, counts, slot, segments): `index` the keyspace's current
 * table (64-bit words), `refs` its reference bytes, `counts` 64-bit words with the counters
 * (hits, misses) at 2 * slot, `segments` [(id, view)] the segments the loop may read
 * records in. Replaces the grant of the same names. */
static PyObject *grants_add(KvGrants *t, PyObject *args) {
    PyObject *pool_o, *ns_o, *index_o, *refs_o, *counts_o, *segments_o;
    Py_buffer sec;
    Py_ssize_t slot;
    if (!PyArg_ParseTuple(args, "UUy*OOOnO!", &pool_o, &ns_o, &sec, &index_o, &refs_o, &counts_o, &slot,
                          &PyList_Type, &segments_o))
        return NULL;
    const char *pool, *ns;
    Py_ssize_t pool_n, ns_n, n_segments = PyList_GET_SIZE(segments_o), len;
    KvGrant *g = PyMem_Calloc(1, sizeof(KvGrant));
    if (g == NULL)
        goto nomem;
    if (!utf8_of(pool_o, &pool, &pool_n) || !utf8_of(ns_o, &ns, &ns_n))
        goto fail;
    g->names = PyMem_Malloc((size_t)(pool_n + ns_n + sec.len) + 1);
    g->segments = PyMem_Calloc((size_t)n_segments + 1, sizeof(Segment));
    g->buffers = PyMem_Calloc((size_t)n_segments + 3, sizeof(Py_buffer));
    if (g->names == NULL || g->segments == NULL || g->buffers == NULL)
        goto nomem;
    memcpy(g->names, pool, (size_t)pool_n);
    memcpy(g->names + pool_n, ns, (size_t)ns_n);
    memcpy(g->names + pool_n + ns_n, sec.buf, (size_t)sec.len);
    g->pool_n = (size_t)pool_n;
    g->ns_n = (size_t)ns_n;
    g->sec_n = (size_t)sec.len;
    char *words = hold(g, index_o, 0, &len);
    if (words == NULL)
        goto fail;
    if (len % 8 || (uintptr_t)words % 8 || len / 8 < KV_HEADER_WORDS) {
        PyErr_SetString(PyExc_ValueError, "an index is aligned 64-bit words, at least its header");
        goto fail;
    }
    g->table.words = (const uint64_t *)words;
    g->table.nwords = (uint64_t)len / 8;
    g->table.refs = (unsigned char *)hold(g, refs_o, 1, &len);
    if (g->table.refs == NULL)
        goto fail;
    g->table.nrefs = len;
    char *counters = hold(g, counts_o, 1, &len);
    if (counters == NULL)
        goto fail;
    if ((uintptr_t)counters % 8 || slot < 0 || (slot * 2 + 2) * 8 > len) {
        PyErr_SetString(PyExc_ValueError, "the counters' slot lies outside the counter words");
        goto fail;
    }
    g->counts = (uint64_t *)counters + slot * 2;
    for (Py_ssize_t i = 0; i < n_segments; i++) {
        unsigned long long id;
        PyObject *view;
        PyObject *item = PyList_GET_ITEM(segments_o, i);
        if (!PyTuple_Check(item) || !PyArg_ParseTuple(item, "KO", &id, &view)) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "a segment is (id, view)");
            goto fail;
        }
        char *base = hold(g, view, 0, &len);
        if (base == NULL)
            goto fail;
        g->segments[g->n_segments++] = (Segment){id, base, (uint64_t)len};
    }
    PyBuffer_Release(&sec);
    sec.buf = NULL;
    if (t->reply == NULL) {      /* made with the first grant: connections that never get pay nothing */
        size_t room = VALUE_AT + (size_t)t->max_value + REPLY_TAIL;
        unsigned char *reply = PyMem_Malloc(room < FIRST_BLOCK ? FIRST_BLOCK : room);
        if (reply == NULL)
            goto nomem;
        pthread_mutex_lock(&t->mu);
        t->reply = reply;
        pthread_mutex_unlock(&t->mu);
    }
    pthread_mutex_lock(&t->mu);
    KvGrant **at = find(t, (const unsigned char *)pool, (size_t)pool_n, (const unsigned char *)ns, (size_t)ns_n);
    KvGrant *replaced = NULL;
    if (at != NULL) {
        replaced = *at;
        *at = replaced->next;
        t->count--;
    }
    g->next = t->grants;
    t->grants = g;
    t->count++;
    pthread_mutex_unlock(&t->mu);
    if (replaced != NULL)
        free_grant(replaced);    /* unlinked under the lock: the loop no longer uses it */
    Py_RETURN_NONE;
nomem:
    PyErr_NoMemory();
fail:
    if (sec.buf != NULL)
        PyBuffer_Release(&sec);
    if (g != NULL)
        free_grant(g);
    return NULL;
}

/* revoke(pool, ns) -> whether there was one. Once it returns, the loop reads nothing of it. */
static PyObject *grants_revoke(KvGrants *t, PyObject *args) {
    PyObject *pool_o, *ns_o;
    if (!PyArg_ParseTuple(args, "UU", &pool_o, &ns_o))
        return NULL;
    const char *pool, *ns;
    Py_ssize_t pool_n, ns_n;
    if (!utf8_of(pool_o, &pool, &pool_n) || !utf8_of(ns_o, &ns, &ns_n))
        return NULL;
    pthread_mutex_lock(&t->mu);      /* waits out a lookup under way (bounded) */
    KvGrant **at = find(t, (const unsigned char *)pool, (size_t)pool_n, (const unsigned char *)ns, (size_t)ns_n);
    KvGrant *g = NULL;
    if (at != NULL) {
        g = *at;
        *at = g->next;
        t->count--;
    }
    pthread_mutex_unlock(&t->mu);
    if (g == NULL)
        Py_RETURN_FALSE;
    free_grant(g);
    Py_RETURN_TRUE;
}

static PyObject *grants_close(KvGrants *t, PyObject *Py_UNUSED(ignored)) {
    forget_all(t);
    Py_RETURN_NONE;
}

static Py_ssize_t grants_len(KvGrants *t) {
    pthread_mutex_lock(&t->mu);
    Py_ssize_t n = t->count;
    pthread_mutex_unlock(&t->mu);
    return n;
}

static PyObject *grants_served(KvGrants *t, void *Py_UNUSED(closure)) {
    pthread_mutex_lock(&t->mu);
    unsigned long long n = t->served;
    pthread_mutex_unlock(&t->mu);
    return PyLong_FromUnsignedLongLong(n);
}

static PyMethodDef grants_methods[] = {
    {"add", (PyCFunction)grants_add, METH_VARARGS, "add(pool, ns, sec, index, refs, counts, slot, segments)"},
    {"revoke", (PyCFunction)grants_revoke, METH_VARARGS, "revoke(pool, ns) -> whether there was one"},
    {"close", (PyCFunction)grants_close, METH_NOARGS, "close(): forgets every grant"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef grants_getset[] = {
    {"served", (getter)grants_served, NULL, "gets the loop answered on these grants", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods grants_sequence = {.sq_length = (lenfunc)grants_len};

PyTypeObject KvGrantsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "memfabric._frames.KvGrants",
    .tp_basicsize = sizeof(KvGrants),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One connection's keyspace grants for remote gets (see _kvget.c).",
    .tp_new = grants_new,
    .tp_dealloc = (destructor)grants_dealloc,
    .tp_methods = grants_methods,
    .tp_getset = grants_getset,
    .tp_as_sequence = &grants_sequence,
};

/* ---- the server's part ---------------------------------------------------------------------- */

typedef struct {
    const unsigned char *pool, *ns, *sec, *key, *id;
    size_t pool_n, ns_n, sec_n, key_n, id_n;
} GetRequest;

/* Whether `head` is exactly a get as kv/client.py sends it: these six keys, each once, of
 * the right types, and nothing after them. Anything else is Python's to judge. */
static int parse_get(const unsigned char *head, size_t n, GetRequest *q) {
    Field f[] = {{"op", F_IS, 1, "kv_get"}, {"id", F_INT, 1}, {"pool", F_STR, 1}, {"ns", F_STR, 1},
                 {"sec", F_BIN, 1}, {"key", F_BIN, 1}};
    if (!read_request(head, n, f, 6))
        return 0;
    *q = (GetRequest){f[2].at, f[3].at, f[4].at, f[5].at, f[1].at, f[2].n, f[3].n, f[4].n, f[5].n, f[1].n};
    return 1;
}

/* kv_lookup's reader for the loop: segments the grant names, the value straight into the
 * reply after its bin header. */
typedef struct {
    const KvGrant *g;
    KvGrants *t;
    size_t value_at;             /* where the value begins in the reply */
    uint64_t vlen;
} Answer;

static int answer_segment(void *ctx, uint64_t segment, const char **base, uint64_t *len) {
    const KvGrant *g = ((Answer *)ctx)->g;
    for (Py_ssize_t i = 0; i < g->n_segments; i++)
        if (g->segments[i].id == segment) {
            *base = g->segments[i].base;
            *len = g->segments[i].len;
            return 1;
        }
    return 0;                    /* a segment granted after this grant: Python's (it grants again) */
}

static int answer_copy(void *ctx, const char *value, uint64_t vlen) {
    Answer *a = ctx;
    if (vlen > a->t->max_value)
        return KV_ASK;
    unsigned char *p = a->t->reply + PREFIX_BYTES + 1 + 6 + 1 + 6;   /* past {found: true, "value" */
    if (vlen <= 0xff) {
        p[0] = 0xc4;
        p[1] = (unsigned char)vlen;
        p += 2;
    } else if (vlen <= 0xffff) {
        p[0] = 0xc5;
        p[1] = (unsigned char)(vlen >> 8);
        p[2] = (unsigned char)vlen;
        p += 3;
    } else {
        p[0] = 0xc6;
        for (int i = 0; i < 4; i++)
            p[1 + i] = (unsigned char)(vlen >> (8 * (3 - i)));
        p += 5;
    }
    memcpy(p, value, (size_t)vlen);
    a->value_at = (size_t)(p - a->t->reply);
    a->vlen = vlen;
    return KV_FOUND;
}

static void answer_drop(void *ctx) { (void)ctx; }     /* the next copy overwrites it */

int kv_serve(PyObject *grants, int fd, const unsigned char *block, Outcome *outcome, int *err,
             PyThreadState **save, int main_thread) {
    KvGrants *t = (KvGrants *)grants;
    uint32_t head_len = (uint32_t)big_endian(block, 4);
    uint64_t payload_len = big_endian(block + 4, 8);
    GetRequest q = {0};
    if (xxh3 == NULL || payload_len != 0 || (uint64_t)PREFIX_BYTES + head_len > FIRST_BLOCK
            || !parse_get(block + PREFIX_BYTES, head_len, &q) || q.id_n > MAX_ID_BYTES || q.key_n == 0)
        return 0;
    uint64_t h = kv_key_hash(q.key, q.key_n);
    Answer a = {NULL, t, 0, 0};
    KvReader reader = {answer_segment, answer_copy, answer_drop, &a};
    int got = KV_ASK;
    pthread_mutex_lock(&t->mu);
    KvGrant **found = find(t, q.pool, q.pool_n, q.ns, q.ns_n);
    if (found != NULL) {
        KvGrant *g = *found;
        const unsigned char *sec = (const unsigned char *)g->names + g->pool_n + g->ns_n;
        if (kv_same_secret(sec, g->sec_n, q.sec, q.sec_n)) {
            a.g = g;
            got = kv_lookup(&g->table, NULL, h, (const char *)q.key, q.key_n, &reader);
            if (got == KV_FOUND || got == KV_MISSING) {
                __atomic_fetch_add(&g->counts[got == KV_FOUND ? 0 : 1], 1, __ATOMIC_RELAXED);
                t->served++;
            }
        }
    }
    pthread_mutex_unlock(&t->mu);
    if (got != KV_FOUND && got != KV_MISSING)
        return 0;                /* Python's, with what it does and says */
    unsigned char *b = t->reply;
    size_t n = PREFIX_BYTES;
    b[n++] = got == KV_FOUND ? 0x83 : 0x82;
    n += put_key(b + n, "found");
    b[n++] = got == KV_FOUND ? 0xc3 : 0xc2;
    if (got == KV_FOUND) {
        n += put_key(b + n, "value");            /* the bin header and value: answer_copy's */
        n = a.value_at + (size_t)a.vlen;
    }
    n += put_key(b + n, "id");
    memcpy(b + n, q.id, q.id_n);
    n += q.id_n;
    put_prefix(b, (uint32_t)(n - PREFIX_BYTES), 0);
    if (n < FIRST_BLOCK) {
        memset(b + n, 0, FIRST_BLOCK - n);
        n = FIRST_BLOCK;
    }
    size_t sent = 0;
    struct iovec iov[1] = {{b, n}};
    *outcome = send_all(fd, iov, 1, &sent, err, save, main_thread);
    return 1;
}

/* ---- the Redis-protocol door's GET (_resp.c) --------------------------------------------------- */

/* kv_lookup's reader for the door: the value as a RESP bulk string into `out`. */
typedef struct {
    const KvGrant *g;
    unsigned char *out;
    size_t room, n;
    int short_of_room;           /* the value was there, its reply longer than room */
} Bulk;

static int bulk_segment(void *ctx, uint64_t segment, const char **base, uint64_t *len) {
    Answer a = {((Bulk *)ctx)->g, NULL, 0, 0};
    return answer_segment(&a, segment, base, len);
}

static int bulk_copy(void *ctx, const char *value, uint64_t vlen) {
    Bulk *b = ctx;
    char digits[20], head[24];
    int d = 0, head_n = 0;
    uint64_t v = vlen;
    do {                         /* the length in decimal, without printf's cost per GET */
        digits[d++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    head[head_n++] = '$';
    while (d)
        head[head_n++] = digits[--d];
    head[head_n++] = '\r';
    head[head_n++] = '\n';
    if ((size_t)head_n + vlen + 2 > b->room) {
        b->short_of_room = 1;
        return KV_ASK;
    }
    memcpy(b->out, head, (size_t)head_n);
    memcpy(b->out + head_n, value, (size_t)vlen);
    memcpy(b->out + head_n + vlen, "\r\n", 2);
    b->n = (size_t)head_n + (size_t)vlen + 2;
    return KV_FOUND;
}

static void bulk_drop(void *ctx) { ((Bulk *)ctx)->n = 0; }

#define DOOR_MAX_KEY 65536         /* MAX_KV_KEY_BYTES */

int kv_door_get(PyObject *grants, const unsigned char *pool, size_t pool_n, const unsigned char *ns, size_t ns_n,
                const unsigned char *sec, size_t sec_n, const unsigned char *key, size_t key_n, unsigned char *out,
                size_t room, size_t *out_n) {
    KvGrants *t = (KvGrants *)grants;
    if (xxh3 == NULL || key_n == 0 || key_n > DOOR_MAX_KEY || Py_TYPE(grants) != &KvGrantsType)
        return 0;                /* no key, or one too long: Python's error */
    uint64_t h = kv_key_hash(key, key_n);
    Bulk b = {NULL, out, room < t->max_value + 32 ? room : t->max_value + 32, 0, 0};
    KvReader reader = {bulk_segment, bulk_copy, bulk_drop, &b};
    int got = KV_ASK;
    pthread_mutex_lock(&t->mu);
    KvGrant **found = find(t, pool, pool_n, ns, ns_n);
    if (found != NULL) {
        KvGrant *g = *found;
        if (kv_same_secret((const unsigned char *)g->names + g->pool_n + g->ns_n, g->sec_n, sec, sec_n)) {
            b.g = g;
            got = kv_lookup(&g->table, NULL, h, (const char *)key, key_n, &reader);
            if (got == KV_FOUND || got == KV_MISSING) {
                __atomic_fetch_add(&g->counts[got == KV_FOUND ? 0 : 1], 1, __ATOMIC_RELAXED);
                t->served++;
            }
        }
    }
    pthread_mutex_unlock(&t->mu);
    if (got == KV_MISSING) {
        if (room < 5)
            return -1;
        memcpy(out, "$-1\r\n", 5);
        *out_n = 5;
        return 1;
    }
    if (got != KV_FOUND)
        return b.short_of_room && room < t->max_value + 32 ? -1 : 0;
    *out_n = b.n;
    return 1;
}

/* ---- the client's call ------------------------------------------------------------------------ */

static PyObject *call_get(PyObject *Py_UNUSED(self), PyObject *args) {
    int fd, entries, polling;
    Py_buffer head;
    Py_ssize_t request_id, max_value;
    PyObject *block_obj;
    double window_s, timeout_s, frame_timeout_s;
    if (!PyArg_ParseTuple(args, "iOy*indpddn", &fd, &block_obj, &head, &entries, &request_id, &window_s, &polling,
                          &timeout_s, &frame_timeout_s, &max_value))
        return NULL;
    Py_buffer block = {0};
    PyObject *result = NULL;
    unsigned char *whole = NULL;         /* a reply longer than its first block */
    if (!writable(block_obj, &block)) {
        PyBuffer_Release(&head);
        return NULL;
    }
    if (block.len != FIRST_BLOCK || entries < 0 || entries > 14 || request_id < 0 || max_value < 0
            || max_value > (1 << 24)) {
        PyErr_SetString(PyExc_ValueError, "a get has a block of FIRST_BLOCK bytes and at most 16 MiB of value");
        goto out;
    }
    unsigned char request[FIRST_BLOCK];
    unsigned char *h = request + PREFIX_BYTES;
    if (PREFIX_BYTES + 1 + (size_t)head.len + 3 + 9 > FIRST_BLOCK) {
        result = Py_BuildValue("(iOO)", UNSENT, polling ? Py_True : Py_False, Py_None);
        goto out;
    }
    size_t n = 0;
    h[n++] = (unsigned char)(0x80 | (entries + 1));
    memcpy(h + n, head.buf, (size_t)head.len);
    n += (size_t)head.len;
    n += put_key(h + n, "id");
    n += put_uint(h + n, (uint64_t)request_id);
    memset(h + n, 0, FIRST_BLOCK - PREFIX_BYTES - n);
    put_prefix(request, (uint32_t)n, 0);
    int err = 0, status = BLOCK, main_thread = in_main_thread(), found = 0;
    size_t value_at = 0;
    uint64_t vlen = 0;
    Outcome outcome;
    double waited = 0.0, began = 0.0, poll_s = polling ? window_s : 0.0;
    unsigned char *b = (unsigned char *)block.buf;
    PyThreadState *save = PyEval_SaveThread();
    struct iovec iov[1] = {{request, FIRST_BLOCK}};
    outcome = call_first_block(fd, iov, 1, b, poll_s, timeout_s, frame_timeout_s, &status, &began, &waited, &err, &save,
                               main_thread);
    if (outcome != GOT)
        goto done;
    double frame_deadline = began + (frame_timeout_s > 0 ? frame_timeout_s : 0);
    uint64_t head_len = big_endian(b, 4), payload_len = big_endian(b + 4, 8);
    if (payload_len != 0)
        goto done;                                       /* BLOCK: Python's */
    /* The id as the server echoes it: our request's, encoded as put_uint does. */
    unsigned char id_raw[9];
    size_t id_n = put_uint(id_raw, (uint64_t)request_id);
    const unsigned char *p = b + PREFIX_BYTES;
    static const unsigned char miss[] = {0x82, 0xa5, 'f', 'o', 'u', 'n', 'd', 0xc2, 0xa2, 'i', 'd'};
    static const unsigned char hit[] = {0x83, 0xa5, 'f', 'o', 'u', 'n', 'd', 0xc3, 0xa5, 'v', 'a', 'l', 'u', 'e'};
    if (head_len == sizeof miss + id_n && memcmp(p, miss, sizeof miss) == 0
            && memcmp(p + sizeof miss, id_raw, id_n) == 0) {
        status = OK;
        goto done;
    }
    if (head_len < sizeof hit + 5 || memcmp(p, hit, sizeof hit) != 0)
        goto done;
    const unsigned char *bin = p + sizeof hit;
    int width = bin[0] == 0xc4 ? 1 : bin[0] == 0xc5 ? 2 : bin[0] == 0xc6 ? 4 : 0;
    if (width == 0)
        goto done;
    vlen = big_endian(bin + 1, width);
    value_at = PREFIX_BYTES + sizeof hit + 1 + (size_t)width;
    if (vlen > (uint64_t)max_value || head_len != value_at - PREFIX_BYTES + vlen + 3 + id_n)
        goto done;                                       /* not an inline value we take: Python's */
    size_t total = PREFIX_BYTES + (size_t)head_len;
    const unsigned char *frame = b;
    if (total > FIRST_BLOCK) {
        whole = PyMem_RawMalloc(total);
        if (whole == NULL) {
            outcome = FAILED;
            err = ENOMEM;
            goto done;
        }
        memcpy(whole, b, FIRST_BLOCK);
        Py_ssize_t landed = 0;
        outcome = receive(fd, (char *)whole + FIRST_BLOCK, (Py_ssize_t)(total - FIRST_BLOCK), &landed,
                          began + poll_s, frame_deadline, 0, &err, &save, main_thread);
        if (outcome == TIMED_OUT) {
            status = STALLED;
            goto done;
        }
        if (outcome != GOT)
            goto done;
        frame = whole;
    }
    const unsigned char *tail = frame + value_at + vlen;
    if (tail[0] != 0xa2 || tail[1] != 'i' || tail[2] != 'd' || memcmp(tail + 3, id_raw, id_n) != 0) {
        status = MISMATCH;                               /* read past its block: no going back */
        goto done;
    }
    status = OK;
    found = 1;
done:
    PyEval_RestoreThread(save);
    if (outcome == INTERRUPTED || outcome == CLOSED || outcome == FAILED) {
        if (outcome == FAILED && err == ENOMEM)
            PyErr_NoMemory();
        else
            raise_for(outcome, err);
        goto out;
    }
    if (status != SEND_TIMEOUT && status != SEND_STALLED)    /* BusyPoll's rule (busy_poll.py) */
        polling = window_s > 0 && waited <= window_s;
    PyObject *value = Py_None;
    if (found) {
        const unsigned char *frame = whole != NULL ? whole : b;
        value = PyBytes_FromStringAndSize((const char *)frame + value_at, (Py_ssize_t)vlen);
        if (value == NULL)
            goto out;
    } else
        Py_INCREF(value);
    result = Py_BuildValue("(iON)", status, polling ? Py_True : Py_False, value);
out:
    PyMem_RawFree(whole);
    PyBuffer_Release(&head);
    PyBuffer_Release(&block);
    return result;
}

/* kv_hash_setup(library) -> whether xxh3 came from that (already loaded) library. */
static PyObject *kv_hash_setup(PyObject *Py_UNUSED(self), PyObject *args) {
    const char *path;
    if (!PyArg_ParseTuple(args, "s", &path))
        return NULL;
    void *lib = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    if (lib == NULL)
        Py_RETURN_FALSE;
    Xxh3 f = (Xxh3)dlsym(lib, "XXH3_64bits");
    if (f == NULL)
        Py_RETURN_FALSE;         /* the handle stays: the module it belongs to is loaded for good */
    xxh3 = f;
    Py_RETURN_TRUE;
}

/* kv_hash(key) -> the index's hash of `key`, as the loop computes it (to check against Python's). */
static PyObject *kv_hash(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer key;
    if (!PyArg_ParseTuple(args, "y*", &key))
        return NULL;
    if (xxh3 == NULL) {
        PyBuffer_Release(&key);
        PyErr_SetString(PyExc_RuntimeError, "kv_hash_setup() found no xxh3");
        return NULL;
    }
    uint64_t h = kv_key_hash(key.buf, (size_t)key.len);
    PyBuffer_Release(&key);
    return PyLong_FromUnsignedLongLong(h);
}

static PyMethodDef kvget_functions[] = {
    {"call_get", call_get, METH_VARARGS,
     "call_get(fd, block, head, entries, request_id, window_s, polling, timeout_s, frame_timeout_s, max_value) "
     "-> (status, polling, value)"},
    {"kv_hash_setup", kv_hash_setup, METH_VARARGS, "kv_hash_setup(library) -> whether xxh3 was found there"},
    {"kv_hash", kv_hash, METH_VARARGS, "kv_hash(key) -> the index's hash of key"},
    {NULL, NULL, 0, NULL},
};

int kvget_add_to_module(PyObject *m) {
    if (PyType_Ready(&KvGrantsType) < 0)
        return -1;
    Py_INCREF(&KvGrantsType);
    if (PyModule_AddObject(m, "KvGrants", (PyObject *)&KvGrantsType) < 0) {
        Py_DECREF(&KvGrantsType);
        return -1;
    }
    if (PyModule_AddFunctions(m, kvget_functions) < 0 || PyModule_AddIntConstant(m, "MISMATCH", MISMATCH) < 0)
        return -1;
    return 0;
}
