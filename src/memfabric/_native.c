/* memfabric._native: the same-host hot paths of MemKV, compiled.
 *
 * A same-host client reads a server's key index (a hash table in shared memory, see
 * kv/index.py) and the records it names without asking the server. In Python each lookup
 * costs dozens of interpreter steps; here it is one call. The protocol is index.py's seqlock:
 * read a slot's sequence (odd: being written), its fields, the key and the value, then the
 * sequence again; any change means "again". Loads of the sequence are acquire loads, and a
 * fence orders the copy before the second read, so a torn copy is always caught.
 *
 * Results of probe() (and of each item of probe_many()):
 *   None            the key is not there (or expired): a validated miss
 *   bytes           its value (no buffer given)
 *   int >= 0        its length, copied into the buffer given
 *   ASK (-1)        this path cannot answer: the caller asks the server (a record in a
 *                   segment not mapped yet, a large value, a table followed by another or
 *                   one draining that the caller did not give, writes that kept coming)
 *   TOO_SMALL (-2)  the buffer cannot hold the value (nothing was copied)
 *   AWAY (-3)       the index's lease (header word H_LEASE, CLOCK_MONOTONIC ms) ran out:
 *                   the server may be stopped or cut off, and its keys written elsewhere;
 *                   the caller reads the key's other homes (kv/index.py, kv/service.py)
 *
 * While a table drains into the current one (header word H_DRAINING names its generation),
 * the caller gives both (old_words, old_refs): the draining table is probed first, then the
 * current one, as kv/index.py explains. Given the client's stats words and its slot, probe()
 * counts a hit or a miss there itself (count() adds the others' counts).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include "_kvlookup.h"

#define ASK KV_ASK
#define TOO_SMALL KV_TOO_SMALL
#define AWAY KV_AWAY
#define MISSING (-4)   /* find_slot: not in the table (ASK there: Python looks) */

static inline uint64_t load_acquire(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint64_t load_relaxed(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }

#define CACHED_SEGMENTS 8

typedef struct {
    const uint64_t *words;
    uint64_t nwords;
    unsigned char *refs;          /* one byte per slot: recency for the server's eviction clock */
    Py_ssize_t nrefs;
    PyObject *pool;               /* the pool's name: segments are keyed (pool, segment id) */
    PyObject *segments;           /* the link's dict (pool, segment) -> mapped (with .view) */
    /* Segments looked up during this call (a batch's records share few): their buffers are
     * held until close_index. */
    int cached;
    uint64_t cached_id[CACHED_SEGMENTS];
    Py_buffer cached_buf[CACHED_SEGMENTS];
} Index;

/* The bytes of segment `segment` as this process maps it: 1 and `out` filled (a buffer to
 * release), 0 when it is not mapped here, -1 with an exception set. */
static int segment_lookup(Index *ix, uint64_t segment, Py_buffer *out) {
    PyObject *id = PyLong_FromUnsignedLongLong(segment);
    if (id == NULL) return -1;
    PyObject *key = PyTuple_Pack(2, ix->pool, id);
    Py_DECREF(id);
    if (key == NULL) return -1;
    PyObject *mapped = PyDict_GetItemWithError(ix->segments, key);     /* borrowed */
    Py_DECREF(key);
    if (mapped == NULL) return PyErr_Occurred() ? -1 : 0;
    PyObject *view = PyObject_GetAttrString(mapped, "view");
    if (view == NULL) { PyErr_Clear(); return 0; }
    int got = PyObject_GetBuffer(view, out, PyBUF_SIMPLE);
    Py_DECREF(view);
    if (got < 0) { PyErr_Clear(); return 0; }
    return 1;
}

/* segment_lookup through the call's small cache: the buffer returned stays valid until
 * close_index (the caller does not release it). */
static int segment_buffer(Index *ix, uint64_t segment, Py_buffer **out) {
    for (int i = 0; i < ix->cached; i++)
        if (ix->cached_id[i] == segment) { *out = &ix->cached_buf[i]; return 1; }
    if (ix->cached == CACHED_SEGMENTS) {            /* full: the oldest makes room */
        PyBuffer_Release(&ix->cached_buf[0]);
        memmove(&ix->cached_id[0], &ix->cached_id[1], sizeof(uint64_t) * (CACHED_SEGMENTS - 1));
        memmove(&ix->cached_buf[0], &ix->cached_buf[1], sizeof(Py_buffer) * (CACHED_SEGMENTS - 1));
        ix->cached--;
    }
    int found = segment_lookup(ix, segment, &ix->cached_buf[ix->cached]);
    if (found <= 0) return found;
    ix->cached_id[ix->cached] = segment;
    *out = &ix->cached_buf[ix->cached++];
    return 1;
}

static void close_index(Index *ix) {
    for (int i = 0; i < ix->cached; i++) PyBuffer_Release(&ix->cached_buf[i]);
    ix->cached = 0;
}

/* kv_lookup's reader for a same-host client (with the GIL): segments through the link's
 * mappings, the value into a new bytes object or the caller's buffer. */
typedef struct {
    Index *ix;
    Py_buffer *into;
    PyObject *result;
} Probe;

static int probe_segment(void *ctx, uint64_t segment, const char **base, uint64_t *len) {
    Py_buffer *seg;
    int mapped = segment_buffer(((Probe *)ctx)->ix, segment, &seg);
    if (mapped <= 0) return mapped;
    *base = (const char *)seg->buf;
    *len = (uint64_t)seg->len;
    return 1;
}

static int probe_copy(void *ctx, const char *value, uint64_t vlen) {
    Probe *p = ctx;
    if (p->into != NULL) {
        if ((uint64_t)p->into->len < vlen) return KV_TOO_SMALL;
        memcpy(p->into->buf, value, (size_t)vlen);
        p->result = PyLong_FromUnsignedLongLong(vlen);
    } else {
        p->result = PyBytes_FromStringAndSize(value, (Py_ssize_t)vlen);
    }
    return p->result == NULL ? KV_ERROR : KV_FOUND;
}

static void probe_drop(void *ctx) { Py_CLEAR(((Probe *)ctx)->result); }

/* One lookup in the current table `ix` (and `old`, the table draining into it, if given).
 * Returns a new reference (see the header), or NULL with an exception set. Segments are
 * looked up in the table's Index (both tables' records lie in the same segments). */
static PyObject *lookup(Index *ix, Index *old, uint64_t h, const char *key, Py_ssize_t klen, Py_buffer *into) {
    Probe p = {ix, into, NULL};
    KvReader reader = {probe_segment, probe_copy, probe_drop, &p};
    KvTable t = {ix->words, ix->nwords, ix->refs, ix->nrefs}, o;
    if (old != NULL) o = (KvTable){old->words, old->nwords, old->refs, old->nrefs};
    int got = kv_lookup(&t, old != NULL ? &o : NULL, h, key, (uint64_t)klen, &reader);
    switch (got) {
    case KV_FOUND: return p.result;
    case KV_MISSING:
    case KV_EXPIRED: Py_RETURN_NONE;
    case KV_ERROR: return NULL;
    default: return PyLong_FromLong(got);           /* ASK, TOO_SMALL, AWAY */
    }
}

static int open_index(Index *ix, Py_buffer *words, Py_buffer *refs, PyObject *pool, PyObject *segments) {
    if (words->len % 8 || ((uintptr_t)words->buf % 8)) {
        PyErr_SetString(PyExc_ValueError, "an index is 64-bit words, aligned");
        return -1;
    }
    if (!PyDict_Check(segments)) {
        PyErr_SetString(PyExc_TypeError, "segments must be a dict");
        return -1;
    }
    ix->words = (const uint64_t *)words->buf;
    ix->nwords = (uint64_t)words->len / 8;
    ix->refs = refs->buf != NULL && !refs->readonly ? (unsigned char *)refs->buf : NULL;
    ix->nrefs = refs->len;
    ix->pool = pool;
    ix->segments = segments;
    ix->cached = 0;
    if (ix->nwords < KV_HEADER_WORDS) {
        PyErr_SetString(PyExc_ValueError, "an index has at least its header");
        return -1;
    }
    return 0;
}

/* The draining table's index and refs (None, None: none given): 1 and `oix` opened (release
 * with close_old), 0 for none, -1 with an exception set. */
static int open_old(PyObject *words_obj, PyObject *refs_obj, Py_buffer *words, Py_buffer *refs, Index *oix,
                    PyObject *pool, PyObject *segments) {
    if (words_obj == Py_None && refs_obj == Py_None) return 0;
    if (PyObject_GetBuffer(words_obj, words, PyBUF_SIMPLE) < 0) return -1;
    if (PyObject_GetBuffer(refs_obj, refs, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(words);
        return -1;
    }
    if (open_index(oix, words, refs, pool, segments) < 0) {
        PyBuffer_Release(words);
        PyBuffer_Release(refs);
        return -1;
    }
    return 1;
}

static void close_old(Index *oix, Py_buffer *words, Py_buffer *refs) {
    close_index(oix);
    PyBuffer_Release(words);
    PyBuffer_Release(refs);
}

/* A client's own hit and miss counters (kv/space.py's stats memfd: a pair of words per
 * client): added to with the GIL held, so the threads of the process that share them lose
 * no count, and no lock is taken. */
static int add_counts(PyObject *stats_obj, Py_ssize_t slot, unsigned long long hits, unsigned long long misses) {
    if (stats_obj == Py_None || slot < 0 || (hits == 0 && misses == 0))
        return 0;
    Py_buffer stats;
    if (PyObject_GetBuffer(stats_obj, &stats, PyBUF_WRITABLE) < 0)
        return -1;
    if ((size_t)stats.len / (2 * sizeof(uint64_t)) > (size_t)slot) {
        uint64_t *pair = (uint64_t *)stats.buf + 2 * slot;
        pair[0] += hits;
        pair[1] += misses;
    }
    PyBuffer_Release(&stats);
    return 0;
}

/* count(stats, slot, hits, misses): add to a client's counters (see add_counts). */
static PyObject *count(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *stats_obj;
    Py_ssize_t slot;
    unsigned long long hits, misses;
    if (!PyArg_ParseTuple(args, "OnKK", &stats_obj, &slot, &hits, &misses))
        return NULL;
    if (add_counts(stats_obj, slot, hits, misses) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *probe(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer words, refs, keybuf, into = {0}, old_words, old_refs;
    unsigned long long h;
    PyObject *pool, *segments, *into_obj, *old_words_obj = Py_None, *old_refs_obj = Py_None, *stats_obj = Py_None;
    Py_ssize_t stats_slot = -1;
    if (!PyArg_ParseTuple(args, "y*w*KOOy*O|OOOn", &words, &refs, &h, &pool, &segments, &keybuf, &into_obj,
                          &old_words_obj, &old_refs_obj, &stats_obj, &stats_slot))
        return NULL;
    PyObject *result = NULL;
    Py_buffer *target = NULL;
    Index ix, oix;
    int has_old = 0;
    if (into_obj != Py_None) {
        if (PyObject_GetBuffer(into_obj, &into, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) goto done;
        target = &into;
    }
    has_old = open_old(old_words_obj, old_refs_obj, &old_words, &old_refs, &oix, pool, segments);
    if (has_old >= 0 && open_index(&ix, &words, &refs, pool, segments) == 0) {
        result = lookup(&ix, has_old ? &oix : NULL, (uint64_t)h, (const char *)keybuf.buf, keybuf.len, target);
        close_index(&ix);
    }
    if (has_old > 0) close_old(&oix, &old_words, &old_refs);
    if (target != NULL) PyBuffer_Release(&into);
    if (result != NULL) {            /* a validated hit or miss counts (ASK and AWAY do not) */
        int hit = PyBytes_Check(result) || (PyLong_Check(result) && PyLong_AsLong(result) >= 0);
        if ((hit || result == Py_None) && add_counts(stats_obj, stats_slot, hit, !hit) < 0)
            Py_CLEAR(result);
    }
done:
    PyBuffer_Release(&words);
    PyBuffer_Release(&refs);
    PyBuffer_Release(&keybuf);
    return result;
}

static PyObject *probe_many(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer words, refs, old_words, old_refs;
    PyObject *hashes, *keys, *pool, *segments, *buffers, *old_words_obj = Py_None, *old_refs_obj = Py_None;
    if (!PyArg_ParseTuple(args, "y*w*O!O!OOO|OO", &words, &refs, &PyList_Type, &hashes, &PyList_Type, &keys,
                          &pool, &segments, &buffers, &old_words_obj, &old_refs_obj))
        return NULL;
    PyObject *out = NULL;
    Index ix = {0}, oix = {0};
    Py_ssize_t n = PyList_GET_SIZE(keys);
    int has_old = open_old(old_words_obj, old_refs_obj, &old_words, &old_refs, &oix, pool, segments);
    if (has_old < 0) {
        has_old = 0;
        goto done;
    }
    if (open_index(&ix, &words, &refs, pool, segments) < 0) goto done;
    if (PyList_GET_SIZE(hashes) != n || (buffers != Py_None && (!PyList_Check(buffers) || PyList_GET_SIZE(buffers) != n))) {
        PyErr_SetString(PyExc_ValueError, "one hash (and one buffer) per key");
        goto done;
    }
    out = PyList_New(n);
    if (out == NULL) goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *key = PyList_GET_ITEM(keys, i);
        if (!PyBytes_Check(key)) { PyErr_SetString(PyExc_TypeError, "keys are bytes"); goto fail; }
        unsigned long long h = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(hashes, i));
        if (h == (unsigned long long)-1 && PyErr_Occurred()) goto fail;
        Py_buffer into, *target = NULL;
        if (buffers != Py_None) {
            if (PyObject_GetBuffer(PyList_GET_ITEM(buffers, i), &into, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
                goto fail;
            target = &into;
        }
        PyObject *r = lookup(&ix, has_old ? &oix : NULL, (uint64_t)h, PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key),
                             target);
        if (target != NULL) PyBuffer_Release(&into);
        if (r == NULL) goto fail;
        PyList_SET_ITEM(out, i, r);
    }
    goto done;
fail:
    Py_CLEAR(out);
done:
    close_index(&ix);
    if (has_old) close_old(&oix, &old_words, &old_refs);
    PyBuffer_Release(&words);
    PyBuffer_Release(&refs);
    return out;
}

/* ---- BigMemory's same-host batches (bigmemory/batch.py) --------------------------------------
 *
 * plan_copies(items, alive, writing, chunk_bytes) -> (Plan, rest): every item that is an
 * object in one piece on this host, whose link is in `alive` (this session's links, checked
 * alive for this batch), still of the generation its handle knows, with a range inside the
 * object and its buffer, of at most chunk_bytes, is planned; the indices of all others are in
 * `rest`, for the Python checks (which raise on a bad item before any byte moves). Nothing is
 * copied until Plan.run(results, freed_code), which copies each planned item as
 * _copy_local does: the generation read again after the copy (and before it, past the first
 * chunk_bytes of the batch), an item whose object went meanwhile getting freed_code. The
 * buffers stay held (exported) from the plan until run() or release(). */

static PyObject *str_described, *str_single;      /* attribute names, made once */

typedef struct {
    Py_ssize_t index;
    char *object;                 /* the item's bytes in the pool's mapping */
    char *buffer;                 /* the caller's */
    Py_ssize_t length;
    const uint64_t *generation_word;
    uint64_t generation;
} Copy;

typedef struct {
    PyObject_HEAD
    int writing;
    Py_ssize_t chunk_bytes;
    Py_ssize_t count, room;
    Copy *copies;
    Py_buffer *held;              /* three per copy: the caller's buffer, the segment, the generations */
} Plan;

static void plan_release(Plan *plan) {
    for (Py_ssize_t i = 0; i < plan->count * 3; i++) PyBuffer_Release(&plan->held[i]);
    plan->count = 0;
}

static void plan_dealloc(Plan *plan) {
    plan_release(plan);
    PyMem_Free(plan->copies);
    PyMem_Free(plan->held);
    Py_TYPE(plan)->tp_free((PyObject *)plan);
}

static PyObject *plan_release_method(Plan *plan, PyObject *Py_UNUSED(ignored)) {
    plan_release(plan);
    Py_RETURN_NONE;
}

static PyObject *plan_run(Plan *plan, PyObject *args) {
    PyObject *results, *freed;
    if (!PyArg_ParseTuple(args, "O!O", &PyList_Type, &results, &freed)) return NULL;
    Py_ssize_t done = 0;
    for (Py_ssize_t i = 0; i < plan->count; i++) {
        Copy *c = &plan->copies[i];
        if (c->index >= PyList_GET_SIZE(results)) {
            PyErr_SetString(PyExc_ValueError, "results is shorter than the batch");
            plan_release(plan);
            return NULL;
        }
        int gone = done > plan->chunk_bytes && load_acquire(c->generation_word) != c->generation;
        if (!gone) {
            if (plan->writing) memcpy(c->object, c->buffer, (size_t)c->length);
            else memcpy(c->buffer, c->object, (size_t)c->length);
            __atomic_thread_fence(__ATOMIC_ACQUIRE);
            gone = load_relaxed(c->generation_word) != c->generation;
            if (done <= plan->chunk_bytes) done += c->length;
        }
        if (gone) {
            Py_INCREF(freed);
            if (PyList_SetItem(results, c->index, freed) < 0) {
                plan_release(plan);
                return NULL;
            }
        }
    }
    plan_release(plan);
    Py_RETURN_NONE;
}

static PyMethodDef plan_methods[] = {
    {"run", (PyCFunction)plan_run, METH_VARARGS, "run(results, freed_code): copy every planned item"},
    {"release", (PyCFunction)plan_release_method, METH_NOARGS, "let the buffers go without copying"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject PlanType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "memfabric._native.Plan",
    .tp_basicsize = sizeof(Plan),
    .tp_dealloc = (destructor)plan_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "copies planned by plan_copies, done by run()",
    .tp_methods = plan_methods,
};

static int as_size(PyObject *o, Py_ssize_t *out) {
    if (!PyLong_CheckExact(o)) return 0;
    *out = PyLong_AsSsize_t(o);
    if (*out == -1 && PyErr_Occurred()) { PyErr_Clear(); return 0; }
    return 1;
}

/* Item i planned (1), or left to Python (0); -1 with an exception (out of memory). */
static int plan_item(Plan *plan, PyObject *item, Py_ssize_t i, PyObject *alive) {
    if (!(PyTuple_CheckExact(item) || PyList_CheckExact(item)) || PySequence_Fast_GET_SIZE(item) != 4) return 0;
    PyObject **f = PySequence_Fast_ITEMS(item);
    PyObject *described = PyObject_GetAttr(f[0], str_described);
    if (described == NULL) { PyErr_Clear(); return 0; }
    PyObject *single = PyObject_GetAttr(described, str_single);
    Py_DECREF(described);
    if (single == NULL) { PyErr_Clear(); return 0; }
    int planned = 0;
    Py_ssize_t offset, length = -1, gi, size, base;
    unsigned long long generation;
    if (!PyTuple_CheckExact(single) || PyTuple_GET_SIZE(single) != 7) goto out;
    PyObject *gens = PyTuple_GET_ITEM(single, 0), *segment = PyTuple_GET_ITEM(single, 4);
    int is_alive = PySet_Contains(alive, PyTuple_GET_ITEM(single, 6));
    if (is_alive <= 0) { PyErr_Clear(); goto out; }
    if (!PyMemoryView_Check(segment) || !as_size(f[1], &offset) || offset < 0 ||
            (f[2] != Py_None && (!as_size(f[2], &length) || length < 0)) ||
            !as_size(PyTuple_GET_ITEM(single, 1), &gi) || gi < 0 || !as_size(PyTuple_GET_ITEM(single, 3), &size) ||
            !as_size(PyTuple_GET_ITEM(single, 5), &base) || base < 0 || !PyLong_CheckExact(PyTuple_GET_ITEM(single, 2)))
        goto out;
    generation = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(single, 2));
    if (generation == (unsigned long long)-1 && PyErr_Occurred()) { PyErr_Clear(); goto out; }
    if (plan->count == plan->room) {
        Py_ssize_t room = plan->room ? plan->room * 2 : 64;
        Copy *copies = PyMem_Realloc(plan->copies, sizeof(Copy) * (size_t)room);
        if (copies == NULL) { PyErr_NoMemory(); planned = -1; goto out; }
        plan->copies = copies;
        Py_buffer *held = PyMem_Realloc(plan->held, sizeof(Py_buffer) * 3 * (size_t)room);
        if (held == NULL) { PyErr_NoMemory(); planned = -1; goto out; }
        plan->held = held;
        plan->room = room;
    }
    Py_buffer *b = &plan->held[plan->count * 3];
    if (PyObject_GetBuffer(f[3], &b[0], plan->writing ? PyBUF_SIMPLE : PyBUF_WRITABLE) < 0) {
        PyErr_Clear();          /* not a flat buffer (or read-only for a read): Python says why */
        goto out;
    }
    if (length < 0) length = b[0].len;
    if (length > b[0].len || length > plan->chunk_bytes || offset > size - length ||
            PyObject_GetBuffer(gens, &b[1], PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        PyBuffer_Release(&b[0]);
        goto out;
    }
    const uint64_t *word = (const uint64_t *)b[1].buf + gi;
    if (((uintptr_t)b[1].buf % 8) || gi >= b[1].len / 8 || load_acquire(word) != generation ||
            PyObject_GetBuffer(segment, &b[2], plan->writing ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        PyBuffer_Release(&b[0]);
        PyBuffer_Release(&b[1]);
        goto out;
    }
    if (base > b[2].len || offset > b[2].len - base || length > b[2].len - base - offset) {
        for (int k = 0; k < 3; k++) PyBuffer_Release(&b[k]);
        goto out;
    }
    plan->copies[plan->count++] = (Copy){i, (char *)b[2].buf + base + offset, (char *)b[0].buf, length, word,
                                         (uint64_t)generation};
    planned = 1;
out:
    Py_DECREF(single);
    return planned;
}

static PyObject *plan_copies(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *items, *alive;
    int writing;
    Py_ssize_t chunk_bytes;
    if (!PyArg_ParseTuple(args, "OO!pn", &items, &PySet_Type, &alive, &writing, &chunk_bytes)) return NULL;
    PyObject *seq = PySequence_Fast(items, "items must be a sequence");
    if (seq == NULL) return NULL;
    Plan *plan = PyObject_New(Plan, &PlanType);
    if (plan != NULL) {
        plan->writing = writing;
        plan->chunk_bytes = chunk_bytes;
        plan->count = plan->room = 0;
        plan->copies = NULL;
        plan->held = NULL;
    }
    PyObject *rest = PyList_New(0);
    if (plan == NULL || rest == NULL) goto fail_early;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        int planned = plan_item(plan, PySequence_Fast_GET_ITEM(seq, i), i, alive);
        if (planned < 0) goto fail;
        if (!planned) {
            PyObject *index = PyLong_FromSsize_t(i);
            if (index == NULL || PyList_Append(rest, index) < 0) { Py_XDECREF(index); goto fail; }
            Py_DECREF(index);
        }
    }
    Py_DECREF(seq);
    PyObject *out = PyTuple_Pack(2, (PyObject *)plan, rest);
    Py_DECREF(plan);
    Py_DECREF(rest);
    return out;
fail:
    Py_DECREF(plan);
    Py_DECREF(rest);
    Py_DECREF(seq);
    return NULL;
fail_early:
    Py_XDECREF(plan);
    Py_XDECREF(rest);
    Py_DECREF(seq);
    return NULL;
}

/* find_slot(index, hash, key, memory) -> slot | MISSING | ASK: the server's own lookup of a key
 * in its current table (kv/store.py Store.find), as IndexWriter.find does it in Python: the
 * probe chain from `hash`, a slot of that hash whose record holds exactly `key` (its bytes read
 * through memory(segment).view). The server is the table's one writer and holds the keyspace's
 * lock, so no slot changes under this read and no seqlock is needed. MISSING: not in this
 * table. ASK: a record this path cannot read (its memory has no view, or the slot's fields do
 * not fit it): the caller looks in Python, which says what is wrong. An exception of memory()
 * (a segment gone) goes up as it would from Python. */
static PyObject *find_slot(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer words, key;
    unsigned long long h;
    PyObject *memory;
    if (!PyArg_ParseTuple(args, "y*Ky*O", &words, &h, &key, &memory))
        return NULL;
    long long result = MISSING;
    PyObject *failed = NULL;             /* set (to anything) when an exception is pending */
    const uint64_t *w = (const uint64_t *)words.buf;
    uint64_t nwords = (uint64_t)words.len / 8;
    if (words.len % 8 || ((uintptr_t)words.buf % 8) || nwords < KV_HEADER_WORDS) {
        PyErr_SetString(PyExc_ValueError, "an index is 64-bit words, aligned, with its header");
        failed = Py_None;
        goto done;
    }
    uint64_t slots = w[KV_H_SLOTS];
    if (slots == 0 || (slots & (slots - 1)) || slots > (nwords - KV_HEADER_WORDS) / KV_SLOT_WORDS) {
        result = ASK;
        goto done;
    }
    uint64_t mask = slots - 1, slot = (uint64_t)h & mask;
    for (uint64_t probes = 0; probes < slots; probes++, slot = (slot + 1) & mask) {
        const uint64_t *s = w + KV_HEADER_WORDS + slot * KV_SLOT_WORDS;
        uint64_t stored = s[KV_W_HASH];
        if (stored == KV_EMPTY)
            break;
        if (stored != (uint64_t)h || (s[KV_W_OFFSET_KLEN] >> 32) != (uint64_t)key.len)
            continue;
        uint64_t offset = s[KV_W_OFFSET_KLEN] & KV_LOW32;
        PyObject *mem = PyObject_CallFunction(memory, "K", (unsigned long long)s[KV_W_SEGMENT]);
        if (mem == NULL) {
            failed = Py_None;
            goto done;
        }
        PyObject *view = PyObject_GetAttrString(mem, "view");
        Py_DECREF(mem);
        Py_buffer seg;
        if (view == NULL || view == Py_None || PyObject_GetBuffer(view, &seg, PyBUF_SIMPLE) < 0) {
            PyErr_Clear();       /* no view, or a released one (a destroyed segment): Python's to say */
            Py_XDECREF(view);
            result = ASK;
            goto done;
        }
        Py_DECREF(view);
        int fits = offset <= (uint64_t)seg.len && (uint64_t)key.len <= (uint64_t)seg.len - offset;
        int same = fits && memcmp((const char *)seg.buf + offset, key.buf, (size_t)key.len) == 0;
        PyBuffer_Release(&seg);
        if (!fits) {
            result = ASK;
            goto done;
        }
        if (same) {
            result = (long long)slot;
            goto done;
        }
    }
done:
    PyBuffer_Release(&words);
    PyBuffer_Release(&key);
    if (failed != NULL)
        return NULL;
    return PyLong_FromLongLong(result);
}

/* hung_up(fd) -> bool: whether a connected socket's peer hung up (POLLRDHUP, POLLHUP,
 * POLLERR, POLLNVAL), asked without letting the GIL go. A poll that never waits takes about
 * a microsecond; select.poll's let the GIL go and took it back at once, every 2 ms of a
 * thread's reads (transport/sockets.py), and CPython hands the GIL to a waiting thread only
 * after 5 ms with no switch: the process's other threads got a turn about once a second. */
static PyObject *hung_up(PyObject *self, PyObject *arg) {
    int fd = (int)PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    struct pollfd p = {.fd = fd, .events = POLLRDHUP};
    int n = poll(&p, 1, 0);
    if (n < 0)
        return errno == EINTR ? Py_NewRef(Py_False) : PyErr_SetFromErrno(PyExc_OSError);
    return PyBool_FromLong(n > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)));
}

static PyMethodDef methods[] = {
    {"hung_up", hung_up, METH_O,
     "hung_up(fd) -> bool: whether the socket's peer hung up; one poll that never waits, the GIL kept"},
    {"count", count, METH_VARARGS, "count(stats, slot, hits, misses): add to a client's own counters"},
    {"probe", probe, METH_VARARGS,
     "probe(index, refs, hash, pool, segments, key, into[, old_index, old_refs, stats, slot]) -> value | length | "
     "None | ASK | TOO_SMALL | AWAY"},
    {"plan_copies", plan_copies, METH_VARARGS,
     "plan_copies(items, alive, writing, chunk_bytes) -> (Plan, indices left to Python)"},
    {"find_slot", find_slot, METH_VARARGS,
     "find_slot(index, hash, key, memory) -> slot | MISSING | ASK: the server's lookup (kv/store.py)"},
    {"probe_many", probe_many, METH_VARARGS,
     "probe_many(index, refs, hashes, keys, pool, segments, buffers) -> [probe's result per key]"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "memfabric._native",
                                    "memfabric's compiled hot paths (see _native.c)", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&PlanType) < 0) return NULL;
    str_described = PyUnicode_InternFromString("_described");
    str_single = PyUnicode_InternFromString("single");
    if (str_described == NULL || str_single == NULL) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddIntConstant(m, "ASK", ASK) < 0 || PyModule_AddIntConstant(m, "TOO_SMALL", TOO_SMALL) < 0 ||
            PyModule_AddIntConstant(m, "AWAY", AWAY) < 0 || PyModule_AddIntConstant(m, "MISSING", MISSING) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
