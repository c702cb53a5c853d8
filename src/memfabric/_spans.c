/* memfabric._frames, part two: BigMemory span reads and writes over plain TCP, served and
 * called with no Python per request.
 *
 * A remote read or write of 64 KiB spent about 30 us in Python on each side (decoding and
 * encoding headers, the namespace and span checks, the hold and its let-go, the locks and
 * the pending table of the link) around some 40 us of kernel work. Here both sides do the
 * common case in one C call that holds no GIL, and hand everything else to Python unchanged.
 *
 * The server: serve_spans(fd, block, grants, window_s, polling, frame_timeout_s, max_payload)
 * waits for the connection's next frame (as recv_frame does: polling first while `polling`,
 * then sleeping; no deadline until a frame begins) and serves it itself when it is a
 * seg_read or seg_write whose header is exactly the one rpc_link.py sends and whose span a
 * grant of this connection covers. It then waits for the next one. It returns, with the
 * GIL, when Python has work: (status, polling, info):
 *   FALLBACK (0)          `block` holds the first block of a frame for Python to serve
 *   OWED (1)              a grant revoked during its transfer is done with: take_owed()
 *   STALLED (-2)          a frame began but its first block did not come within frame_timeout_s
 *   TRANSFER_FAILED (-3)  a transfer's stream broke (info says how): close the connection
 * A peer that closed between frames raises ConnectionError; other socket errors, OSError.
 *
 * A grant (SpanGrants.add, made by Python after it served a span request of the connection
 * with every check passed) names a namespace's object by pool, ns and bm_id, the secId
 * that was proven for it, the spans of segment memory that are the object's on this server
 * (with exports of the segments' buffers, so no mapping goes while a grant lives), and for an
 * object homed here its generation word. A request is served here only if its secId equals
 * the grant's (compared in constant time), the generation word still holds the object's
 * generation, and [offset, offset + length) lies inside one span of the named segment:
 * anything else is Python's, which answers with today's errors.
 *
 * Python revokes a grant (revoke) before the object's bytes stop being its own: a free, its
 * extents given back, its bytes lost, its namespace destroyed. A revoke of a grant whose
 * transfer is under way returns the segment it uses: Python then holds that segment and the
 * object (as its own transfers do) until the transfer is over, which the serve loop reports
 * (OWED) and take_owed() hands back. A grant's memory is freed only with the GIL.
 *
 * The client: call_span(fd, block, head, entries, offset, length, request_id, payload, into,
 * window_s, polling, timeout_s, frame_timeout_s) -> (status, polling) sends one request
 * (prefix, the msgpack map of `head`'s `entries` pairs plus offset, length and id, padding,
 * and for a write the payload) and receives its reply into `block` (its first FIRST_BLOCK
 * bytes), a read's payload straight into `into`, polling for it first while `polling` (the
 * polling that follows from this wait is returned, BusyPoll's rule). The caller must know
 * the reply is the next frame (rpc_link.py: no other request in flight, both its locks
 * held). Statuses:
 *   OK (2)                the reply is {"id": request_id} and its payload (if any) landed
 *   LANDED (1), BLOCK (0) the reply's first block is in `block` (and its payload, with
 *                         LANDED): for Python to read as any reply (an error, say)
 *   NOTHING (-1)          no byte of the reply came within timeout_s (the stream is whole)
 *   STALLED (-2)          the reply began but did not end within frame_timeout_s
 *   SEND_TIMEOUT (-3)     the peer took no byte of the request (SO_SNDTIMEO; the stream is whole)
 *   SEND_STALLED (-4)     the peer took part of it
 *   UNSENT (-5)           the header does not fit one block: nothing was sent
 * A closed peer raises ConnectionError; a signal handler that raises (Ctrl-C) raises through,
 * also one that cut a blocked send short. A link calls it on a duplicate of its connection's
 * fd (SpanFd), so that a close by another thread cannot free the number under the call.
 */
#include "_frames.h"
#include "_msgpack.h"
#include <fcntl.h>
#include <pthread.h>
#include <string.h>
#include <sys/uio.h>

#define OWED 1
#define FALLBACK 0
#define TRANSFER_FAILED (-3)
#define BUCKETS 256
#define OP_READ 1
#define OP_WRITE 2

typedef struct {
    const unsigned char *pool, *ns, *sec, *bm_id, *id;
    size_t pool_n, ns_n, sec_n, bm_id_n, id_n;
    uint64_t segment, offset, length;
    int op;
} SpanRequest;

enum { K_OP, K_ID, K_POOL, K_NS, K_SEC, K_BM_ID, K_SEGMENT, K_OFFSET, K_LENGTH, K_COUNT };

/* Whether `head` is exactly a span request as rpc_link.py sends it: one map of these nine
 * keys, each once, with values of the right types (non-negative ints), and nothing after
 * it. Anything else (other keys, a bool id, a str secId...) is Python's to judge. */
static int parse_request(const unsigned char *head, size_t n, SpanRequest *q) {
    Reader r = {head, head + n};
    const unsigned char *c;
    if (!take(&r, 1, &c) || *c != (0x80 | K_COUNT))
        return 0;
    unsigned seen = 0;
    for (int i = 0; i < K_COUNT; i++) {
        const unsigned char *key, *s, *raw;
        size_t key_n, s_n, raw_n;
        uint64_t v;
        int negative, k;
        if (!read_bytes(&r, 's', &key, &key_n))
            return 0;
        if (key_is(key, key_n, "op")) {
            k = K_OP;
            if (!read_bytes(&r, 's', &s, &s_n))
                return 0;
            if (key_is(s, s_n, "seg_read"))
                q->op = OP_READ;
            else if (key_is(s, s_n, "seg_write"))
                q->op = OP_WRITE;
            else
                return 0;
        } else if (key_is(key, key_n, "id")) {
            k = K_ID;
            if (!read_int(&r, &q->id, &q->id_n, &v, &negative))
                return 0;
        } else if (key_is(key, key_n, "pool")) {
            k = K_POOL;
            if (!read_bytes(&r, 's', &q->pool, &q->pool_n))
                return 0;
        } else if (key_is(key, key_n, "ns")) {
            k = K_NS;
            if (!read_bytes(&r, 's', &q->ns, &q->ns_n))
                return 0;
        } else if (key_is(key, key_n, "sec")) {
            k = K_SEC;
            if (!read_bytes(&r, 'b', &q->sec, &q->sec_n))
                return 0;
        } else if (key_is(key, key_n, "bm_id")) {
            k = K_BM_ID;
            if (!read_bytes(&r, 's', &q->bm_id, &q->bm_id_n))
                return 0;
        } else {
            uint64_t *field;
            if (key_is(key, key_n, "segment")) {
                k = K_SEGMENT;
                field = &q->segment;
            } else if (key_is(key, key_n, "offset")) {
                k = K_OFFSET;
                field = &q->offset;
            } else if (key_is(key, key_n, "length")) {
                k = K_LENGTH;
                field = &q->length;
            } else
                return 0;
            if (!read_int(&r, &raw, &raw_n, field, &negative) || negative)
                return 0;
        }
        if (seen & (1u << k))
            return 0;
        seen |= 1u << k;
    }
    return r.p == r.end && seen == (1u << K_COUNT) - 1;
}

/* ---- grants ----------------------------------------------------------------------------------- */

typedef struct {
    uint64_t segment, offset, length;
    char *base;                  /* the segment's memory */
} Span;

typedef struct Grant {
    struct Grant *next;          /* in its bucket, or in the owed list */
    uint64_t hash;
    char *names;                 /* pool, ns, bm_id, sec back to back (one allocation) */
    size_t pool_n, ns_n, bm_id_n, sec_n;
    Span *spans;
    Py_ssize_t n_spans;
    Py_buffer *buffers;          /* exports of the segments' (and generation table's) buffers */
    Py_ssize_t n_buffers;
    const uint64_t *gen_word;    /* NULL: no generation to check (the object's home is elsewhere) */
    uint64_t generation;
    PyObject *token;             /* Python's, handed back by take_owed */
    int in_flight, revoked;
    uint64_t in_flight_segment;
} Grant;

typedef struct {
    PyObject_HEAD
    pthread_mutex_t mu;          /* guards the table, the owed list and every grant's flags */
    Grant *buckets[BUCKETS];
    Grant *owed;
    Py_ssize_t count;
    unsigned long long served;   /* span requests serve_spans() took (before it answers them) */
    int serving;                 /* a serve_spans() runs on these grants (with the GIL: checked) */
} SpanGrants;

static uint64_t hash_names(const unsigned char *pool, size_t pool_n, const unsigned char *ns, size_t ns_n,
                           const unsigned char *bm_id, size_t bm_id_n) {
    uint64_t h = 1469598103934665603ull;
    const unsigned char *parts[3] = {pool, ns, bm_id};
    size_t sizes[3] = {pool_n, ns_n, bm_id_n};
    for (int k = 0; k < 3; k++) {
        for (size_t i = 0; i < sizes[k]; i++)
            h = (h ^ parts[k][i]) * 1099511628211ull;
        h = (h ^ 0x100) * 1099511628211ull;      /* a separator no byte equals */
    }
    return h;
}

static int names_match(const Grant *g, const unsigned char *pool, size_t pool_n, const unsigned char *ns,
                       size_t ns_n, const unsigned char *bm_id, size_t bm_id_n) {
    const char *p = g->names;
    return g->pool_n == pool_n && g->ns_n == ns_n && g->bm_id_n == bm_id_n && memcmp(p, pool, pool_n) == 0
           && memcmp(p + pool_n, ns, ns_n) == 0 && memcmp(p + pool_n + ns_n, bm_id, bm_id_n) == 0;
}

/* With the table's lock: the grant for these names and where it is linked, or NULL. */
static Grant **find(SpanGrants *t, uint64_t hash, const unsigned char *pool, size_t pool_n,
                    const unsigned char *ns, size_t ns_n, const unsigned char *bm_id, size_t bm_id_n) {
    Grant **at = &t->buckets[hash % BUCKETS];
    for (; *at != NULL; at = &(*at)->next)
        if ((*at)->hash == hash && names_match(*at, pool, pool_n, ns, ns_n, bm_id, bm_id_n))
            return at;
    return NULL;
}

/* In time that depends on the lengths only, as hmac.compare_digest. */
static int same_secret(const unsigned char *a, size_t a_n, const unsigned char *b, size_t b_n) {
    if (a_n != b_n)
        return 0;
    volatile unsigned char differ = 0;
    for (size_t i = 0; i < a_n; i++)
        differ |= a[i] ^ b[i];
    return differ == 0;
}

static void free_grant(Grant *g) {     /* with the GIL */
    for (Py_ssize_t i = 0; i < g->n_buffers; i++)
        PyBuffer_Release(&g->buffers[i]);
    PyMem_Free(g->buffers);
    PyMem_Free(g->spans);
    PyMem_Free(g->names);
    Py_XDECREF(g->token);
    PyMem_Free(g);
}

static PyObject *grants_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    if (!PyArg_ParseTuple(args, ""))
        return NULL;
    SpanGrants *t = (SpanGrants *)type->tp_alloc(type, 0);
    if (t == NULL)
        return NULL;
    pthread_mutex_init(&t->mu, NULL);
    return (PyObject *)t;
}

static void grants_dealloc(SpanGrants *t) {
    for (int b = 0; b < BUCKETS; b++) {
        while (t->buckets[b] != NULL) {
            Grant *g = t->buckets[b];
            t->buckets[b] = g->next;
            free_grant(g);
        }
    }
    while (t->owed != NULL) {
        Grant *g = t->owed;
        t->owed = g->next;
        free_grant(g);
    }
    pthread_mutex_destroy(&t->mu);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static int utf8_of(PyObject *s, const char **at, Py_ssize_t *n) {
    if (!PyUnicode_Check(s)) {
        PyErr_SetString(PyExc_TypeError, "pool, ns and bm_id are str");
        return 0;
    }
    *at = PyUnicode_AsUTF8AndSize(s, n);
    return *at != NULL;
}

/* add(pool, ns, bm_id, sec, spans, gens, gen_index, generation, token): spans are
 * (segment, offset, length, view) with `view` the segment's whole memory; `gens` the home's
 * generation words (None: none to check). Replaces the grant of the same names. */
static PyObject *grants_add(SpanGrants *t, PyObject *args) {
    PyObject *pool_o, *ns_o, *bm_o, *spans_o, *gens_o, *token;
    Py_buffer sec;
    Py_ssize_t gen_index;
    unsigned long long generation;
    if (t->serving) {      /* a grant may be in use: only revoke() may take it away meanwhile */
        PyErr_SetString(PyExc_RuntimeError, "add() while serve_spans() runs on these grants");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "UUUy*O!OnKO", &pool_o, &ns_o, &bm_o, &sec, &PyList_Type, &spans_o, &gens_o,
                          &gen_index, &generation, &token))
        return NULL;
    const char *pool, *ns, *bm_id;
    Py_ssize_t pool_n, ns_n, bm_id_n;
    Grant *g = NULL;
    if (!utf8_of(pool_o, &pool, &pool_n) || !utf8_of(ns_o, &ns, &ns_n) || !utf8_of(bm_o, &bm_id, &bm_id_n))
        goto fail;
    Py_ssize_t n_spans = PyList_GET_SIZE(spans_o);
    g = PyMem_Calloc(1, sizeof(Grant));
    if (g == NULL)
        goto nomem;
    g->names = PyMem_Malloc((size_t)(pool_n + ns_n + bm_id_n + sec.len) + 1);
    g->spans = PyMem_Calloc((size_t)n_spans + 1, sizeof(Span));
    g->buffers = PyMem_Calloc((size_t)n_spans + 1, sizeof(Py_buffer));
    if (g->names == NULL || g->spans == NULL || g->buffers == NULL)
        goto nomem;
    memcpy(g->names, pool, (size_t)pool_n);
    memcpy(g->names + pool_n, ns, (size_t)ns_n);
    memcpy(g->names + pool_n + ns_n, bm_id, (size_t)bm_id_n);
    memcpy(g->names + pool_n + ns_n + bm_id_n, sec.buf, (size_t)sec.len);
    g->pool_n = (size_t)pool_n;
    g->ns_n = (size_t)ns_n;
    g->bm_id_n = (size_t)bm_id_n;
    g->sec_n = (size_t)sec.len;
    g->hash = hash_names((const unsigned char *)pool, (size_t)pool_n, (const unsigned char *)ns, (size_t)ns_n,
                         (const unsigned char *)bm_id, (size_t)bm_id_n);
    PyObject **views = PyMem_Calloc((size_t)n_spans + 1, sizeof(PyObject *));   /* whose buffer each export is */
    if (views == NULL)
        goto nomem;
    for (Py_ssize_t i = 0; i < n_spans; i++) {
        Py_ssize_t segment, offset, length;
        PyObject *view;
        PyObject *item = PyList_GET_ITEM(spans_o, i);
        if (!PyTuple_Check(item) || !PyArg_ParseTuple(item, "nnnO", &segment, &offset, &length, &view)) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "a span is (segment, offset, length, view)");
            PyMem_Free(views);
            goto fail;
        }
        Py_ssize_t b = 0;
        while (b < g->n_buffers && views[b] != view)
            b++;
        if (b == g->n_buffers) {
            if (!writable(view, &g->buffers[b])) {
                PyMem_Free(views);
                goto fail;
            }
            views[b] = view;
            g->n_buffers++;
        }
        if (segment < 0 || offset < 0 || length <= 0 || length > g->buffers[b].len - offset) {
            PyErr_SetString(PyExc_ValueError, "a span lies outside its segment's memory");
            PyMem_Free(views);
            goto fail;
        }
        g->spans[i] = (Span){(uint64_t)segment, (uint64_t)offset, (uint64_t)length, (char *)g->buffers[b].buf};
        g->n_spans++;
    }
    PyMem_Free(views);
    if (gens_o != Py_None) {
        Py_buffer *words = &g->buffers[g->n_buffers];
        if (PyObject_GetBuffer(gens_o, words, PyBUF_C_CONTIGUOUS) < 0)
            goto fail;
        g->n_buffers++;
        if (gen_index < 0 || (gen_index + 1) * (Py_ssize_t)sizeof(uint64_t) > words->len) {
            PyErr_SetString(PyExc_ValueError, "the generation index lies outside the table");
            goto fail;
        }
        g->gen_word = (const uint64_t *)words->buf + gen_index;
        g->generation = generation;
    }
    Py_INCREF(token);
    g->token = token;
    PyBuffer_Release(&sec);
    Grant *replaced = NULL;
    pthread_mutex_lock(&t->mu);
    Grant **at = find(t, g->hash, (const unsigned char *)pool, (size_t)pool_n, (const unsigned char *)ns,
                      (size_t)ns_n, (const unsigned char *)bm_id, (size_t)bm_id_n);
    if (at != NULL) {            /* not in flight: none is while serve_spans() does not run */
        replaced = *at;
        *at = replaced->next;
        t->count--;
    }
    Grant **bucket = &t->buckets[g->hash % BUCKETS];
    g->next = *bucket;
    *bucket = g;
    t->count++;
    pthread_mutex_unlock(&t->mu);
    if (replaced != NULL)
        free_grant(replaced);
    Py_RETURN_NONE;
nomem:
    PyErr_NoMemory();
fail:
    PyBuffer_Release(&sec);
    if (g != NULL)
        free_grant(g);
    return NULL;
}

/* Unlinks the grant of these names; NULL if there is none. With the lock. */
static Grant *unlink_named(SpanGrants *t, PyObject *args) {
    PyObject *pool_o, *ns_o, *bm_o;
    if (!PyArg_ParseTuple(args, "UUU", &pool_o, &ns_o, &bm_o))
        return NULL;
    const char *pool, *ns, *bm_id;
    Py_ssize_t pool_n, ns_n, bm_id_n;
    if (!utf8_of(pool_o, &pool, &pool_n) || !utf8_of(ns_o, &ns, &ns_n) || !utf8_of(bm_o, &bm_id, &bm_id_n))
        return NULL;
    uint64_t hash = hash_names((const unsigned char *)pool, (size_t)pool_n, (const unsigned char *)ns, (size_t)ns_n,
                               (const unsigned char *)bm_id, (size_t)bm_id_n);
    Grant **at = find(t, hash, (const unsigned char *)pool, (size_t)pool_n, (const unsigned char *)ns, (size_t)ns_n,
                      (const unsigned char *)bm_id, (size_t)bm_id_n);
    if (at == NULL)
        return NULL;
    Grant *g = *at;
    *at = g->next;
    t->count--;
    return g;
}

/* revoke(pool, ns, bm_id) -> None, or the segment a transfer under it uses now: the grant
 * then waits in the owed list until that transfer is over (take_owed). */
static PyObject *grants_revoke(SpanGrants *t, PyObject *args) {
    pthread_mutex_lock(&t->mu);
    Grant *g = unlink_named(t, args);
    if (g == NULL) {
        pthread_mutex_unlock(&t->mu);
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    g->revoked = 1;
    if (g->in_flight) {
        uint64_t segment = g->in_flight_segment;
        g->next = t->owed;
        t->owed = g;
        pthread_mutex_unlock(&t->mu);
        return PyLong_FromUnsignedLongLong(segment);
    }
    pthread_mutex_unlock(&t->mu);
    free_grant(g);
    Py_RETURN_NONE;
}

/* Owed grants whose transfer is over (all of them with `all`, which also forgets every
 * grant): [(token, segment)]. */
static PyObject *settle(SpanGrants *t, int all) {
    Grant *done = NULL;
    pthread_mutex_lock(&t->mu);
    for (Grant **at = &t->owed; *at != NULL;) {
        Grant *g = *at;
        if (g->in_flight && !all) {
            at = &g->next;
            continue;
        }
        *at = g->next;
        g->next = done;
        done = g;
    }
    Grant *forgotten = NULL;
    if (all) {
        for (int b = 0; b < BUCKETS; b++) {
            while (t->buckets[b] != NULL) {
                Grant *g = t->buckets[b];
                t->buckets[b] = g->next;
                g->next = forgotten;
                forgotten = g;
            }
        }
        t->count = 0;
    }
    pthread_mutex_unlock(&t->mu);
    while (forgotten != NULL) {
        Grant *g = forgotten;
        forgotten = g->next;
        free_grant(g);
    }
    PyObject *list = PyList_New(0);
    while (done != NULL) {
        Grant *g = done;
        done = g->next;
        if (list != NULL) {
            PyObject *pair = Py_BuildValue("(OK)", g->token, (unsigned long long)g->in_flight_segment);
            if (pair == NULL || PyList_Append(list, pair) < 0)
                Py_CLEAR(list);
            Py_XDECREF(pair);
        }
        free_grant(g);
    }
    return list;
}

static PyObject *grants_take_owed(SpanGrants *t, PyObject *Py_UNUSED(ignored)) {
    return settle(t, 0);
}

static PyObject *grants_close(SpanGrants *t, PyObject *Py_UNUSED(ignored)) {
    if (t->serving) {
        PyErr_SetString(PyExc_RuntimeError, "close() while serve_spans() runs on these grants");
        return NULL;
    }
    return settle(t, 1);
}

static PyObject *grants_remove(SpanGrants *t, PyObject *args) {
    if (t->serving) {
        PyErr_SetString(PyExc_RuntimeError, "remove() while serve_spans() runs on these grants");
        return NULL;
    }
    pthread_mutex_lock(&t->mu);
    Grant *g = unlink_named(t, args);
    pthread_mutex_unlock(&t->mu);
    if (g == NULL)
        return PyErr_Occurred() ? NULL : Py_NewRef(Py_False);
    free_grant(g);
    Py_RETURN_TRUE;
}

static Py_ssize_t grants_len(SpanGrants *t) {
    pthread_mutex_lock(&t->mu);
    Py_ssize_t n = t->count;
    pthread_mutex_unlock(&t->mu);
    return n;
}

static PyMethodDef grants_methods[] = {
    {"add", (PyCFunction)grants_add, METH_VARARGS,
     "add(pool, ns, bm_id, sec, spans, gens, gen_index, generation, token)"},
    {"revoke", (PyCFunction)grants_revoke, METH_VARARGS, "revoke(pool, ns, bm_id) -> None | segment in use"},
    {"remove", (PyCFunction)grants_remove, METH_VARARGS, "remove(pool, ns, bm_id) -> whether there was one"},
    {"take_owed", (PyCFunction)grants_take_owed, METH_NOARGS, "take_owed() -> [(token, segment)]"},
    {"close", (PyCFunction)grants_close, METH_NOARGS, "close() -> [(token, segment)]: forgets every grant"},
    {NULL, NULL, 0, NULL},
};

static PyObject *grants_served(SpanGrants *t, void *Py_UNUSED(closure)) {
    pthread_mutex_lock(&t->mu);
    unsigned long long n = t->served;
    pthread_mutex_unlock(&t->mu);
    return PyLong_FromUnsignedLongLong(n);
}

static PyGetSetDef grants_getset[] = {
    {"served", (getter)grants_served, NULL, "span requests serve_spans() took on these grants", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods grants_sequence = {.sq_length = (lenfunc)grants_len};

static PyTypeObject SpanGrantsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "memfabric._frames.SpanGrants",
    .tp_basicsize = sizeof(SpanGrants),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One connection's span grants (see _spans.c).",
    .tp_new = grants_new,
    .tp_dealloc = (destructor)grants_dealloc,
    .tp_methods = grants_methods,
    .tp_getset = grants_getset,
    .tp_as_sequence = &grants_sequence,
};

/* ---- sending ---------------------------------------------------------------------------------- */

/* All of iov[0..n) (the socket blocks, bounded by SO_SNDTIMEO); *sent counts what went.
 * Without the GIL. TIMED_OUT: SO_SNDTIMEO ran out. */
Outcome send_all(int fd, struct iovec *iov, int n, size_t *sent, int *err, PyThreadState **save,
                        int main_thread) {
    while (n > 0) {
        struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)n};
        ssize_t k = sendmsg(fd, &msg, MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR) {
                if (main_thread && handlers_raised(save))
                    return INTERRUPTED;
                continue;
            }
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return TIMED_OUT;
            *err = errno;
            return errno == EPIPE || errno == ECONNRESET ? CLOSED : FAILED;
        }
        *sent += (size_t)k;
        while (n > 0 && (size_t)k >= iov->iov_len) {
            k -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (char *)iov->iov_base + k;
            iov->iov_len -= (size_t)k;
            /* Part went: a signal may have cut the send short (no EINTR then). Python's own
             * sendmsg returns here and runs its handler: so do we, in the main thread. */
            if (main_thread && handlers_raised(save))
                return INTERRUPTED;
        }
    }
    return GOT;
}

Outcome call_first_block(int fd, struct iovec *iov, int n, unsigned char *b, double poll_s, double timeout_s,
                         double frame_timeout_s, int *status, double *began, double *waited, int *err,
                         PyThreadState **save, int main_thread) {
    size_t sent = 0;
    Outcome outcome = send_all(fd, iov, n, &sent, err, save, main_thread);
    if (outcome == TIMED_OUT)
        *status = sent ? SEND_STALLED : SEND_TIMEOUT;
    if (outcome != GOT)
        return outcome;
    double start = now_s();
    Py_ssize_t got = 0;
    outcome = receive(fd, (char *)b, FIRST_BLOCK, &got, start + poll_s, start + (timeout_s > 0 ? timeout_s : 0), 1,
                      err, save, main_thread);
    *waited = now_s() - start;
    if (outcome == TIMED_OUT)
        *status = NOTHING;
    if (outcome != GOT)
        return outcome;
    *began = now_s();
    outcome = receive(fd, (char *)b, FIRST_BLOCK, &got, *began + poll_s,
                      *began + (frame_timeout_s > 0 ? frame_timeout_s : 0), 0, err, save, main_thread);
    *waited = now_s() - start;
    if (outcome == TIMED_OUT)
        *status = STALLED;
    return outcome;
}

/* ---- the server's loop -------------------------------------------------------------------- */

static const char *what_failed(Outcome outcome, int err) {
    if (outcome == TIMED_OUT)
        return "it stalled part way";
    if (outcome == CLOSED)
        return "the peer closed the connection";
    return strerror(err);
}

static PyObject *serve_spans(PyObject *Py_UNUSED(self), PyObject *args) {
    int fd, polling;
    PyObject *block_obj;
    SpanGrants *t;
    double window_s, frame_timeout_s;
    unsigned long long max_payload;
    PyObject *kv = Py_None;
    if (!PyArg_ParseTuple(args, "iOO!dpdK|O", &fd, &block_obj, &SpanGrantsType, &t, &window_s, &polling,
                          &frame_timeout_s, &max_payload, &kv))
        return NULL;
    if (kv != Py_None && !PyObject_TypeCheck(kv, &KvGrantsType)) {
        PyErr_SetString(PyExc_TypeError, "kv is a KvGrants or None");
        return NULL;
    }
    Py_buffer block;
    if (!writable(block_obj, &block))
        return NULL;
    if (block.len != FIRST_BLOCK) {
        PyBuffer_Release(&block);
        PyErr_SetString(PyExc_ValueError, "the block must be FIRST_BLOCK bytes");
        return NULL;
    }
    if (t->serving) {
        PyBuffer_Release(&block);
        PyErr_SetString(PyExc_RuntimeError, "serve_spans() runs on these grants already");
        return NULL;
    }
    t->serving = 1;
    Py_INCREF(t);
    unsigned char *b = (unsigned char *)block.buf;
    unsigned char reply[FIRST_BLOCK];
    int status = FALLBACK, err = 0, main_thread = in_main_thread();
    Outcome outcome = GOT;
    const char *info = NULL;
    const char *op_name = "";
    PyThreadState *save = PyEval_SaveThread();
    for (;;) {
        /* The next frame: polled for while the peer keeps answering within the window. */
        double start = now_s();
        double window = polling ? window_s : 0.0;
        Py_ssize_t got = 0;
        outcome = receive(fd, (char *)b, FIRST_BLOCK, &got, start + window, FOREVER, 1, &err, &save, main_thread);
        if (outcome != GOT)
            break;
        double began = now_s();
        outcome = receive(fd, (char *)b, FIRST_BLOCK, &got, began + window, began + frame_timeout_s, 0, &err, &save,
                          main_thread);
        polling = window_s > 0 && now_s() - start <= window_s;
        if (outcome == TIMED_OUT) {
            status = STALLED;
            break;
        }
        if (outcome != GOT)
            break;
        uint32_t head_len = (uint32_t)big_endian(b, 4);
        uint64_t payload_len = big_endian(b + 4, 8);
        SpanRequest q;
        if ((uint64_t)PREFIX_BYTES + head_len > FIRST_BLOCK || !parse_request(b + PREFIX_BYTES, head_len, &q)) {
            /* Not a span request: a granted get (_kvget.c) is answered here too. */
            if (kv == Py_None || !kv_serve(kv, fd, b, &outcome, &err, &save, main_thread))
                break;                               /* FALLBACK: Python's */
            if (outcome != GOT) {
                status = outcome == INTERRUPTED ? FALLBACK : TRANSFER_FAILED;
                info = what_failed(outcome, err);
                op_name = "kv_get";
                break;
            }
            continue;
        }
        if (q.length == 0 || q.length > max_payload || q.id_n > 9 || payload_len != (q.op == OP_WRITE ? q.length : 0))
            break;                                   /* FALLBACK: Python's */
        /* Checked and held under the grants' lock: a revoke sees the hold, or we see it. */
        char *at = NULL;
        Grant *g = NULL;
        uint64_t hash = hash_names(q.pool, q.pool_n, q.ns, q.ns_n, q.bm_id, q.bm_id_n);
        pthread_mutex_lock(&t->mu);
        Grant **found = find(t, hash, q.pool, q.pool_n, q.ns, q.ns_n, q.bm_id, q.bm_id_n);
        if (found != NULL) {
            g = *found;
            const unsigned char *sec = (const unsigned char *)g->names + g->pool_n + g->ns_n + g->bm_id_n;
            uint64_t end = q.offset + q.length;
            if (!g->revoked && end > q.offset && same_secret(sec, g->sec_n, q.sec, q.sec_n)
                    && (g->gen_word == NULL || __atomic_load_n(g->gen_word, __ATOMIC_ACQUIRE) == g->generation)) {
                for (Py_ssize_t i = 0; i < g->n_spans; i++) {
                    const Span *s = &g->spans[i];
                    if (s->segment == q.segment && s->offset <= q.offset && end <= s->offset + s->length) {
                        at = s->base + q.offset;
                        break;
                    }
                }
            }
            if (at != NULL) {
                g->in_flight = 1;
                g->in_flight_segment = q.segment;
                t->served++;
            }
        }
        pthread_mutex_unlock(&t->mu);
        if (at == NULL)
            break;                                   /* FALLBACK: Python's, with its precise error */
        /* The reply: {"id": <the request's id, as it came>} in a block of its own. */
        size_t head = 0;
        unsigned char *h = reply + PREFIX_BYTES;
        h[head++] = 0x81;
        head += put_key(h + head, "id");
        memcpy(h + head, q.id, q.id_n);
        head += q.id_n;
        memset(h + head, 0, FIRST_BLOCK - PREFIX_BYTES - head);
        size_t sent = 0;
        if (q.op == OP_READ) {
            op_name = "seg_read";
            put_prefix(reply, (uint32_t)head, q.length);
            struct iovec iov[2] = {{reply, FIRST_BLOCK}, {at, (size_t)q.length}};
            outcome = send_all(fd, iov, 2, &sent, &err, &save, main_thread);
        } else {
            op_name = "seg_write";
            Py_ssize_t landed = 0;
            double now = now_s();
            outcome = receive(fd, at, (Py_ssize_t)q.length, &landed, now + (polling ? window_s : 0.0),
                              now + frame_timeout_s, 0, &err,
                              &save, main_thread);
            if (outcome == GOT) {
                put_prefix(reply, (uint32_t)head, 0);
                struct iovec iov[1] = {{reply, FIRST_BLOCK}};
                outcome = send_all(fd, iov, 1, &sent, &err, &save, main_thread);
            }
        }
        pthread_mutex_lock(&t->mu);
        g->in_flight = 0;
        int owed = g->revoked;
        pthread_mutex_unlock(&t->mu);
        if (outcome != GOT) {
            status = outcome == INTERRUPTED ? FALLBACK : TRANSFER_FAILED;
            info = what_failed(outcome, err);
            break;
        }
        if (owed) {
            status = OWED;
            break;
        }
    }
    PyEval_RestoreThread(save);
    t->serving = 0;
    Py_DECREF(t);
    PyBuffer_Release(&block);
    if (status == TRANSFER_FAILED)
        return Py_BuildValue("(iON)", status, polling ? Py_True : Py_False,
                             PyUnicode_FromFormat("%s: %s", op_name, info));
    if (outcome == INTERRUPTED || outcome == CLOSED || outcome == FAILED) {
        raise_for(outcome, err);
        return NULL;
    }
    return Py_BuildValue("(iOO)", status, polling ? Py_True : Py_False, Py_None);
}

/* ---- the client's call ------------------------------------------------------------------------ */

/* SpanFd(fd): a duplicate of a connection's fd for call_span, owned from the moment it is made
 * (a duplicate made in Python could be lost, unclosed, to a signal between two statements),
 * closed by close() or when the object goes. */
typedef struct {
    PyObject_HEAD
    int fd;
} SpanFd;

static PyObject *span_fd_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    int fd;
    if (!PyArg_ParseTuple(args, "i", &fd))
        return NULL;
    SpanFd *self = (SpanFd *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (self->fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static PyObject *span_fd_close(SpanFd *self, PyObject *Py_UNUSED(ignored)) {
    if (self->fd >= 0) {
        close(self->fd);
        self->fd = -1;
    }
    Py_RETURN_NONE;
}

static void span_fd_dealloc(SpanFd *self) {
    if (self->fd >= 0)
        close(self->fd);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *span_fd_fileno(SpanFd *self, void *Py_UNUSED(closure)) {
    return PyLong_FromLong(self->fd);
}

static PyMethodDef span_fd_methods[] = {
    {"close", (PyCFunction)span_fd_close, METH_NOARGS, "close the duplicate (fd becomes -1)"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef span_fd_getset[] = {
    {"fd", (getter)span_fd_fileno, NULL, "the duplicate's number, -1 once closed", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject SpanFdType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "memfabric._frames.SpanFd",
    .tp_basicsize = sizeof(SpanFd),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A duplicate of a connection's fd, owned (see _spans.c).",
    .tp_new = span_fd_new,
    .tp_dealloc = (destructor)span_fd_dealloc,
    .tp_methods = span_fd_methods,
    .tp_getset = span_fd_getset,
};

static PyObject *call_span(PyObject *Py_UNUSED(self), PyObject *args) {
    int fd, entries;
    Py_buffer head;
    Py_ssize_t offset, length, request_id;
    PyObject *block_obj, *payload_obj, *into_obj;
    double window_s, timeout_s, frame_timeout_s;
    int polling;
    if (!PyArg_ParseTuple(args, "iOy*innnOOdpdd", &fd, &block_obj, &head, &entries, &offset, &length, &request_id,
                          &payload_obj, &into_obj, &window_s, &polling, &timeout_s, &frame_timeout_s))
        return NULL;
    double poll_s = polling ? window_s : 0.0;
    Py_buffer block = {0}, payload = {0}, into = {0};
    int has_payload = payload_obj != Py_None, has_into = into_obj != Py_None;
    PyObject *result = NULL;
    if (!writable(block_obj, &block)) {
        PyBuffer_Release(&head);
        return NULL;
    }
    if (has_payload && PyObject_GetBuffer(payload_obj, &payload, PyBUF_C_CONTIGUOUS) < 0) {
        has_payload = 0;
        goto out;
    }
    if (has_into && !writable(into_obj, &into)) {
        has_into = 0;
        goto out;
    }
    if (block.len != FIRST_BLOCK || has_payload == has_into || entries < 0 || entries > 12 || offset < 0
            || length <= 0 || request_id < 0 || (has_payload ? payload.len : into.len) != length) {
        PyErr_SetString(PyExc_ValueError, "a span call has a block of FIRST_BLOCK bytes, and a payload (write) "
                                          "or a buffer (read) of `length` > 0 bytes");
        goto out;
    }
    /* The request: map header, the caller's pairs, offset, length and id (at most 3 * 8 + 3 * 9). */
    unsigned char request[FIRST_BLOCK];
    unsigned char *h = request + PREFIX_BYTES;
    if (PREFIX_BYTES + 1 + (size_t)head.len + 3 * 8 + 3 * 9 > FIRST_BLOCK) {
        result = Py_BuildValue("(iO)", UNSENT, polling ? Py_True : Py_False);
        goto out;
    }
    size_t n = 0;
    h[n++] = (unsigned char)(0x80 | (entries + 3));
    memcpy(h + n, head.buf, (size_t)head.len);
    n += (size_t)head.len;
    n += put_key(h + n, "offset");
    n += put_uint(h + n, (uint64_t)offset);
    n += put_key(h + n, "length");
    n += put_uint(h + n, (uint64_t)length);
    n += put_key(h + n, "id");
    n += put_uint(h + n, (uint64_t)request_id);
    memset(h + n, 0, FIRST_BLOCK - PREFIX_BYTES - n);
    put_prefix(request, (uint32_t)n, has_payload ? (uint64_t)length : 0);
    int err = 0, status = BLOCK, main_thread = in_main_thread();
    Outcome outcome;
    double waited = 0.0, began = 0.0;
    unsigned char *b = (unsigned char *)block.buf;
    PyThreadState *save = PyEval_SaveThread();
    struct iovec iov[2] = {{request, FIRST_BLOCK}, {payload.buf, has_payload ? (size_t)payload.len : 0}};
    /* The reply: its first block, and a read's payload straight into `into` (recv_frame's way). */
    outcome = call_first_block(fd, iov, has_payload ? 2 : 1, b, poll_s, timeout_s, frame_timeout_s, &status, &began,
                               &waited, &err, &save, main_thread);
    if (outcome != GOT)
        goto done;
    double frame_deadline = began + (frame_timeout_s > 0 ? frame_timeout_s : 0);
    uint32_t head_len = (uint32_t)big_endian(b, 4);
    uint64_t payload_len = big_endian(b + 4, 8);
    int fits = PREFIX_BYTES + (uint64_t)head_len <= FIRST_BLOCK;
    if (has_into && fits && payload_len == (uint64_t)length) {
        Py_ssize_t landed = 0;
        outcome = receive(fd, (char *)into.buf, into.len, &landed, began + poll_s, frame_deadline, 0, &err, &save,
                          main_thread);
        if (outcome == TIMED_OUT) {
            status = STALLED;
            goto done;
        }
        if (outcome != GOT)
            goto done;
        status = LANDED;
    }
    /* Exactly {"id": request_id}, with what it should carry: done, nothing for Python to read. */
    if (fits && (has_into ? status == LANDED : payload_len == 0)) {
        Reader r = {b + PREFIX_BYTES, b + PREFIX_BYTES + head_len};
        const unsigned char *c, *key, *raw;
        size_t key_n, raw_n;
        uint64_t id;
        int negative;
        if (take(&r, 1, &c) && *c == 0x81 && read_bytes(&r, 's', &key, &key_n) && key_is(key, key_n, "id")
                && read_int(&r, &raw, &raw_n, &id, &negative) && !negative && id == (uint64_t)request_id
                && r.p == r.end)
            status = OK;
    }
done:
    PyEval_RestoreThread(save);
    if (outcome == INTERRUPTED || outcome == CLOSED || outcome == FAILED)
        raise_for(outcome, err);
    else {
        if (status != SEND_TIMEOUT && status != SEND_STALLED)   /* BusyPoll's rule (busy_poll.py) */
            polling = window_s > 0 && waited <= window_s;
        result = Py_BuildValue("(iO)", status, polling ? Py_True : Py_False);
    }
out:
    PyBuffer_Release(&head);
    PyBuffer_Release(&block);
    if (has_payload)
        PyBuffer_Release(&payload);
    if (has_into)
        PyBuffer_Release(&into);
    return result;
}

static PyMethodDef span_functions[] = {
    {"serve_spans", serve_spans, METH_VARARGS,
     "serve_spans(fd, block, grants, window_s, polling, frame_timeout_s, max_payload, kv=None) -> (status, polling, "
     "info)"},
    {"call_span", call_span, METH_VARARGS,
     "call_span(fd, block, head, entries, offset, length, request_id, payload, into, window_s, polling, "
     "timeout_s, frame_timeout_s) -> (status, polling)"},
    {NULL, NULL, 0, NULL},
};

int spans_add_to_module(PyObject *m) {
    if (PyType_Ready(&SpanGrantsType) < 0 || PyType_Ready(&SpanFdType) < 0)
        return -1;
    Py_INCREF(&SpanFdType);
    if (PyModule_AddObject(m, "SpanFd", (PyObject *)&SpanFdType) < 0) {
        Py_DECREF(&SpanFdType);
        return -1;
    }
    Py_INCREF(&SpanGrantsType);
    if (PyModule_AddObject(m, "SpanGrants", (PyObject *)&SpanGrantsType) < 0) {
        Py_DECREF(&SpanGrantsType);
        return -1;
    }
    if (PyModule_AddFunctions(m, span_functions) < 0)
        return -1;
    const struct { const char *name; int value; } constants[] = {
        {"OWED", OWED}, {"FALLBACK", FALLBACK}, {"TRANSFER_FAILED", TRANSFER_FAILED}, {"OK", OK},
        {"SEND_TIMEOUT", SEND_TIMEOUT}, {"SEND_STALLED", SEND_STALLED}, {"UNSENT", UNSENT},
    };
    for (size_t i = 0; i < sizeof constants / sizeof constants[0]; i++)
        if (PyModule_AddIntConstant(m, constants[i].name, constants[i].value) < 0)
            return -1;
    return 0;
}
