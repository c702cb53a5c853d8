/* ---- forward_served: a home's forward to its one live same-host copy, in its receive loop ----
 *
 * serve_append's append_one wrote a record its plog's copy must hold before it is answered.
 * Python forwarded it (PlogService._flush_to, under the plog's flush lock, through the peer
 * link's call_compiled): some 35 us of Python per append around the compiled call, as much
 * again as the call. Here the same is done in C, every rule of that path read again from the
 * same objects (the forwarder, plog/fast_append.py Forwarder, only says which copy and link
 * Python chose, and the request's fixed parts), or nothing is done:
 *   the flush lock taken without waiting; nothing but the log's end to forward and commit
 *   (forwarded == committed, written == end), in one piece and one extent; the plog not
 *   resyncing nor broken, as many dead copies as when Python made the forwarder; the cluster's
 *   view the one Python saw then, not older than Server.view keeps one; the link the server's
 *   for that copy (Server._peer's), open, idle (its lock taken without waiting), nothing given
 *   up on, no undo or "gone" list pending, its bound the one call_compiled would set, its peer
 *   not hung up.
 * Any of these not so: 0, nothing sent or changed, and Python commits it as before. Else the
 * log's bytes, read from the segment's file under its lock (as Python reads them), go out as
 * send_forward's request, its reply read without the GIL (exchange, as call_append). The common
 * reply (CALL_OK) commits the log to `end` (PlogLog.commit) and counts the forward in `counts`
 * ([2] forwards, [3] compiled ones): 1. Any other outcome is handed to the forwarder's `failed`,
 * which applies call_compiled's rules to it and then _forward's (the copy marked dead, or the
 * plog fenced); then 0, and Python's _flush_to finishes the append as it would have. -1: an
 * error is set (MemoryError, or a signal handler's exception). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "_msgpack.h"
#include "_plogcall.h"
#include "_plogwait.h"
#include "_pyattr.h"
#include "_plogserve.h"

/* (FORWARD_PIECE_MOST, the most bytes forwarded here: _plogserve.h, a module constant too.) */

/* The interned name of a literal (forward_served's attributes: looked up per append, not made
 * each time): a borrowed reference, kept for the process's life; NULL (an error set) past
 * NAMES_MOST distinct names, which forward_served never reaches (it uses some 40). */
#define NAMES_MOST 64
static PyObject *name_of(const char *literal) {
    static const char *literals[NAMES_MOST];
    static PyObject *names[NAMES_MOST];
    static int count;
    for (int i = 0; i < count; i++)      /* the same literal (the compiler merges them): no strcmp */
        if (literals[i] == literal)
            return names[i];
    for (int i = 0; i < count; i++)
        if (strcmp(literals[i], literal) == 0)
            return names[i];
    if (count == NAMES_MOST) {
        PyErr_SetString(PyExc_SystemError, "_plogforward.c name_of: more names than NAMES_MOST");
        return NULL;
    }
    PyObject *name = PyUnicode_InternFromString(literal);
    if (name != NULL) {
        literals[count] = literal;
        names[count++] = name;
    }
    return name;
}

static PyObject *attr(PyObject *o, const char *name) {
    PyObject *n = o == NULL ? NULL : name_of(name);
    return n == NULL ? NULL : PyObject_GetAttr(o, n);
}

static long long attr_n(PyObject *o, const char *name) {
    PyObject *v = attr(o, name);
    long long x = v != NULL && PyLong_Check(v) ? PyLong_AsLongLong(v) : -1;
    Py_XDECREF(v);
    return x;
}

/* attr(o, name) is `want`: 1, else 0. */
static int attr_is(PyObject *o, const char *name, PyObject *want) {
    PyObject *v = attr(o, name);
    Py_XDECREF(v);
    return v != NULL && v == want;
}

/* attr(o, name) false (0, None, empty): 1, else 0. */
static int attr_false(PyObject *o, const char *name) {
    PyObject *v = attr(o, name);
    int t = v == NULL ? -1 : PyObject_IsTrue(v);
    Py_XDECREF(v);
    return t == 0;
}

static int set_n(PyObject *o, const char *name, long long x) {
    PyObject *v = PyLong_FromLongLong(x);
    if (v == NULL)
        return -1;
    PyObject *n = name_of(name);
    int rc = n == NULL ? -1 : PyObject_SetAttr(o, n, v);
    Py_DECREF(v);
    return rc;
}

static double attr_double(PyObject *o, const char *name) {
    PyObject *v = attr(o, name);
    double d = v != NULL && PyFloat_Check(v) ? PyFloat_AS_DOUBLE(v) : -1.0;
    Py_XDECREF(v);
    return d;
}

/* The peer hung up (as sockets.py HangUpWatch.peer_gone: one poll that does not wait). */
static int peer_hung_up(int fd) {
    struct pollfd p = {.fd = fd, .events = POLLRDHUP};
    int r = poll(&p, 1, 0);
    return r < 0 || (r > 0 && (p.revents & (POLLHUP | POLLRDHUP | POLLERR | POLLNVAL)));
}

int forward_served(PyObject *pending) {
    if (PyTuple_GET_SIZE(pending) != 6)
        return 0;                          /* a batch's: Python's */
    PyObject *grant = PyTuple_GET_ITEM(pending, 1);
    long long end = PyLong_AsLongLong(PyTuple_GET_ITEM(pending, 2));
    if (end < 0 || PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    int result = 0, flush_locked = 0, link_locked = 0, seg_locked = 0, failed = 0;
    PyObject *plog = attr(grant, "plog"), *fwd = NULL, *flush_lock = NULL, *core = NULL, *link = NULL,
             *link_lock = NULL, *channel = NULL, *channel_args = NULL, *server = NULL, *view = NULL, *peers = NULL,
             *server_id = NULL, *seg_lock = NULL, *abandoned = NULL, *id_obj = NULL, *head = NULL, *mid = NULL,
             *entry = NULL, *got = NULL;
    unsigned char *piece = NULL;
    Py_buffer buffer = {0};
    fwd = attr(plog, "fast_forward");
    if (fwd == NULL || fwd == Py_None)
        goto done;
    if ((flush_lock = attr(plog, "flush_lock")) == NULL || try_lock(flush_lock) != 1)
        goto done;
    flush_locked = 1;

    /* The plog, as _flush_to and _forward read it. */
    core = get(plog, s_core);
    long long committed = attr_n(core, "committed"), written = attr_n(core, "written");
    long long forwarded = attr_n(plog, "forwarded"), n = end - forwarded;
    if (committed < 0 || forwarded != committed || written != end || n <= 0 || n > FORWARD_PIECE_MOST
            || !attr_false(plog, "resync") || !attr_is(plog, "broken", Py_None))
        goto done;
    PyObject *dead = attr(plog, "dead");
    long long dead_n = dead != NULL && PySet_Check(dead) ? (long long)PySet_GET_SIZE(dead) : -1;
    Py_XDECREF(dead);
    if (dead_n < 0 || dead_n != attr_n(fwd, "dead_count"))
        goto done;
    /* The cluster's view: the one the forwarder was made with, still fresh (Server.view). */
    server = attr(fwd, "server");
    view = attr(fwd, "view");
    double view_at = attr_double(server, "_view_at"), ttl = attr_double(fwd, "view_ttl_s");
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    double now = (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
    if (view == NULL || !attr_is(server, "_view", view) || view_at < 0 || ttl < 0 || now - view_at > ttl)
        goto done;
    /* The link: the server's for the copy, as Server._peer finds it, and idle. */
    link = attr(fwd, "link");
    peers = attr(server, "_peers");
    server_id = attr(fwd, "server_id");
    if (link == NULL || peers == NULL || server_id == NULL || !PyDict_Check(peers)
            || PyDict_GetItemWithError(peers, server_id) != link)
        goto done;
    if (!attr_is(link, "_closed", Py_False) || !attr_false(link, "_abandoned") || !attr_false(link, "_undos")
            || !attr_false(link, "_late_gone"))
        goto done;
    double timeout_s = attr_double(link, "timeout_s");
    if (timeout_s <= 0 || attr_double(link, "_bound_s") != timeout_s)
        goto done;
    if ((link_lock = attr(link, "_lock")) == NULL)
        goto done;
    PyObject *owned = PyObject_CallMethodNoArgs(link_lock, name_of("_is_owned"));
    int is_owned = owned == NULL ? -1 : PyObject_IsTrue(owned);
    Py_XDECREF(owned);
    if (is_owned != 0 || try_lock(link_lock) != 1)
        goto done;
    link_locked = 1;
    if (!attr_is(link, "_closed", Py_False) || !attr_false(link, "_abandoned") || !attr_false(link, "_undos"))
        goto done;
    channel = attr(link, "_channel");
    channel_args = channel ? PyObject_CallMethodNoArgs(channel, name_of("compiled_call_args")) : NULL;
    if (channel_args == NULL || !PyTuple_Check(channel_args) || PyTuple_GET_SIZE(channel_args) != 3)
        goto done;
    int fd = (int)PyLong_AsLong(PyTuple_GET_ITEM(channel_args, 0));
    double poll_s = PyFloat_AsDouble(PyTuple_GET_ITEM(channel_args, 2));
    if (PyErr_Occurred() || fd < 0 || peer_hung_up(fd))
        goto done;
    if (PyObject_GetBuffer(PyTuple_GET_ITEM(channel_args, 1), &buffer, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        goto done;
    head = attr(fwd, "head");
    mid = attr(fwd, "mid");
    entry = attr(fwd, "abandoned_entry");
    abandoned = attr(link, "_abandoned");
    if (head == NULL || !PyBytes_Check(head) || mid == NULL || !PyBytes_Check(mid) || entry == NULL
            || abandoned == NULL || !PyDict_Check(abandoned))
        goto done;

    /* The log's bytes, read as LogBytes.read reads them (under the segment's lock). */
    long long file_at;
    Py_ssize_t seg_index;
    if (!one_extent(grant, (uint64_t)forwarded, (uint64_t)n, &file_at, &seg_index))
        goto done;
    if ((piece = PyMem_Malloc((size_t)n)) == NULL) {
        PyErr_NoMemory();
        result = -1;
        goto done;
    }
    int seg_fd = lock_segment(grant, seg_index, &seg_lock, &seg_locked);
    if (seg_fd < 0)
        goto done;
    ssize_t read_n;
    do
        read_n = pread(seg_fd, piece, (size_t)n, (off_t)file_at);
    while (read_n < 0 && errno == EINTR);
    unlock(seg_lock);
    seg_locked = 0;
    if (read_n != (ssize_t)n)
        goto done;

    /* Taken as call_compiled takes it: the next id, given up on until its reply is read. */
    long long request_id = attr_n(link, "_next_id");
    if (request_id < 0 || (id_obj = PyLong_FromLongLong(request_id)) == NULL)
        goto done;
    if (set_n(link, "_next_id", request_id + 1) < 0 || PyDict_SetItem(abandoned, id_obj, entry) < 0)
        goto done;
    long long calls = attr_n(link, "compiled_calls");
    if (calls < 0 || set_n(link, "compiled_calls", calls + 1) < 0)
        PyErr_Clear();

    /* send_forward's request: head, "at" as a u64, "last": true, "data", then the bin of the
     * bytes, budget_s and id (as call_append adds them). */
    unsigned char at_raw[9], bin[5], tail[32];
    at_raw[0] = 0xcf;
    put_be64(at_raw + 1, (uint64_t)forwarded);
    size_t bin_n = bin_header(bin, (uint64_t)n), tail_n = request_tail(tail, timeout_s, (uint64_t)request_id);
    struct iovec out[6] = {{PyBytes_AS_STRING(head), (size_t)PyBytes_GET_SIZE(head)}, {at_raw, sizeof at_raw},
                           {PyBytes_AS_STRING(mid), (size_t)PyBytes_GET_SIZE(mid)}, {bin, bin_n},
                           {piece, (size_t)n}, {tail, tail_n}};
    uint64_t value = 0;
    double waited_s = 0.0;
    int err = 0, interrupted = 0;
    int status = exchange(fd, out, 6, &buffer, poll_s, (unsigned long long)request_id, &value, &waited_s, &err,
                          &interrupted);
    if (status == CALL_REPLY) {      /* the copy's common reply (replica_packet's): 82 "length" end "id" id */
        static const unsigned char prefix[] = {0x82, 0xa6, 'l', 'e', 'n', 'g', 't', 'h'};
        Reader r = {buffer.buf, (const unsigned char *)buffer.buf + value};
        const unsigned char *at, *raw, *key;
        size_t raw_n, key_n;
        uint64_t length, id;
        int neg;
        if (value <= (uint64_t)buffer.len && take(&r, sizeof prefix, &at) && memcmp(at, prefix, sizeof prefix) == 0
                && read_int(&r, &raw, &raw_n, &length, &neg) && !neg && length == (uint64_t)end
                && read_bytes(&r, 's', &key, &key_n) && key_is(key, key_n, "id")
                && read_int(&r, &raw, &raw_n, &id, &neg) && !neg && id == (uint64_t)request_id && r.p == r.end)
            status = CALL_OK;
    }
    PyBuffer_Release(&buffer);
    buffer.obj = NULL;
    if (status < 0 && !interrupted)
        value = (uint64_t)err;               /* failed(): the errno */
    if (status == CALL_OK) {
        /* call_compiled's common case, then _forward's and _flush_to's. */
        if (PyDict_DelItem(abandoned, id_obj) < 0)
            PyErr_Clear();
        got = PyObject_CallMethod(channel, "waited", "d", waited_s);
        Py_XDECREF(got);
        got = NULL;
        PyErr_Clear();
        unlock(link_lock);
        link_locked = 0;
        PyObject *end_obj = PyTuple_GET_ITEM(pending, 2);
        PyObject *plog_lock = get(plog, s_lock);
        int ok = plog_lock != NULL && PyObject_SetAttr(plog, name_of("forwarded"), end_obj) == 0
                 && wait_lock(plog_lock) == 1;
        if (ok) {
            /* PlogLog.commit(end); with nothing written past `end`, as append_one commits */
            PyObject *starts = attr_n(core, "written") == end ? get(core, s_starts) : NULL;
            Py_ssize_t records = starts == NULL ? -1 : PyObject_Length(starts);
            Py_XDECREF(starts);
            if (records >= 0 && attr_n(core, "committed") <= end) {
                ok = set_ll(core, s_committed, end) == 0 && set_ll(core, s_committed_records, records) == 0;
            } else {
                PyErr_Clear();
                got = PyObject_CallMethodOneArg(core, name_of("commit"), end_obj);
                ok = got != NULL;
                Py_XDECREF(got);
                got = NULL;
            }
            unlock(plog_lock);
        }
        Py_XDECREF(plog_lock);
        if (!ok) {
            /* (MemoryError.) Not committed here: Python's _flush_to commits it. */
            if (PyErr_ExceptionMatches(PyExc_MemoryError)) {
                result = -1;
                goto done;
            }
            PyErr_Clear();
            goto done;
        }
        PyObject *counts = attr(grant, "counts");
        Py_buffer cv;
        if (counts != NULL && PyObject_GetBuffer(counts, &cv, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) == 0) {
            if (cv.len >= 32) {      /* (atomic as count_served's: commit_wait adds to [0], [1] without the GIL) */
                uint64_t *c = cv.buf;
                __atomic_fetch_add(&c[2], 1, __ATOMIC_RELAXED);
                __atomic_fetch_add(&c[3], 1, __ATOMIC_RELAXED);
            }
            PyBuffer_Release(&cv);
        }
        Py_XDECREF(counts);
        PyErr_Clear();
        result = 1;
        goto done;
    }
    /* Not the common reply: Python's rules for it (the link's lock released there). */
    PyObject *type = NULL, *exc = NULL, *tb = NULL;
    if (interrupted)
        PyErr_Fetch(&type, &exc, &tb);
    link_locked = 0;
    failed = 1;
    got = PyObject_CallMethod(fwd, "failed", "OiKdLOL", plog, interrupted ? -1 : status,
                              interrupted ? (unsigned long long)EINTR : (unsigned long long)value, waited_s, request_id,
                              PyTuple_GET_ITEM(channel_args, 1), end);
    Py_XDECREF(got);
    if (got == NULL) {
        PyObject *raised, *raised_value, *raised_tb;       /* failed()'s, kept across _is_owned() */
        PyErr_Fetch(&raised, &raised_value, &raised_tb);
        PyObject *held = PyObject_CallMethodNoArgs(link_lock, name_of("_is_owned"));
        if (held != NULL && PyObject_IsTrue(held) == 1)
            unlock(link_lock);                 /* (failed() did not run) */
        Py_XDECREF(held);
        PyErr_Clear();
        PyErr_Restore(raised, raised_value, raised_tb);
        if (interrupted || fatal_error_kept())     /* else SEALED (the plog fenced: _flush_to says so): Python's path */
            result = -1;
    }
    got = NULL;
    if (interrupted) {
        PyErr_Restore(type, exc, tb);
        result = -1;
    }
done:
    (void)failed;
    if (buffer.obj != NULL)
        PyBuffer_Release(&buffer);
    if (seg_locked)
        unlock(seg_lock);
    if (link_locked) {
        /* taken, nothing sent: as call_compiled's `return None` */
        if (id_obj != NULL && abandoned != NULL && PyDict_GetItemWithError(abandoned, id_obj) != NULL)
            PyDict_DelItem(abandoned, id_obj);
        unlock(link_lock);
    }
    if (flush_locked)
        unlock(flush_lock);
    if (result >= 0 && fatal_error_kept())
        result = -1;
    PyMem_Free(piece);
    Py_XDECREF(plog);
    Py_XDECREF(fwd);
    Py_XDECREF(flush_lock);
    Py_XDECREF(core);
    Py_XDECREF(link);
    Py_XDECREF(link_lock);
    Py_XDECREF(channel);
    Py_XDECREF(channel_args);
    Py_XDECREF(server);
    Py_XDECREF(view);
    Py_XDECREF(peers);
    Py_XDECREF(server_id);
    Py_XDECREF(seg_lock);
    Py_XDECREF(abandoned);
    Py_XDECREF(id_obj);
    Py_XDECREF(head);
    Py_XDECREF(mid);
    Py_XDECREF(entry);
    return result;
}
