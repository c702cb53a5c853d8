/* The server's compiled MemPlog appends, for memfabric._records: served in a connection's
 * receive loop (_frames.c serve_packets) with the GIL held, through serve_append (the capsule
 * SERVE_APPEND, _plogwait.h). append_one: a same-host client's plog_append of one inline record
 * (plog/fast_append.py says when and why; below, what it checks); append_batch: a same-host
 * append_many from the connection's shared stage; replica_one: a same-host home's forward of
 * whole records to a copy here. A home's forward of its own append to its copy is
 * _plogforward.c's (forward_served, called from serve_append).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "_crc32c.h"
#include "_framing.h"
#include "_msgpack.h"
#include "_plogwait.h"
#include "_pyattr.h"
#include "_plogserve.h"

/* ---- append_one: the common same-host append, served without Python ------------------------
 *
 * Python stays the authority (plog/service.py): it grants a connection a plog after serving an
 * append of it there with the secId checked (plog/fast_append.py: FastGrant), and every rule
 * is read from its objects on each call, under the plog's own lock (waited for as Python
 * waits, the GIL let go; the grant checked again after a wait). Only the common case is
 * served here: a map of exactly op = "plog_append", pool, ns, sec, name, plog_id, records (one
 * bin), id and optionally budget_s; the plog open, not deleted, not broken; the connection owes
 * no "gone" notice; the frame inside one extent and the log's reach. Anything else returns None,
 * having changed nothing, and Python serves the request as it always did.
 *
 * The frame (header, payload straight from the packet, zeros) is written with one pwritev
 * under the segment's lock, then marked written in the plog's rules (PlogLog: starts,
 * _lengths, written) and its segment touched. When the grant leaves the commit to C (no flush,
 * no copies) and nothing else awaits commit, it is committed here too; else Python's _flush_to
 * commits it (forwarded to the copies; on pmem a flush without the GIL: group commit).
 *
 * append_packet returns NULL (not one of its: Python's), or (reply: bytes, grant, end, committed,
 * payload_bytes, request_id). */

/* Whether the grant's proof still stands: the connection's verified entry is the one the
 * grant saw, and the connection owes no "gone" notice. */
static int proof_stands(PyObject *conn, PyObject *grant) {
    PyObject *verified = get(conn, s_verified), *vkey = get(grant, s_vkey), *proven = get(grant, s_proven);
    PyObject *now = verified && vkey && PyDict_Check(verified) ? PyDict_GetItemWithError(verified, vkey) : NULL;
    int stands = now != NULL && now == proven;
    Py_XDECREF(verified);
    Py_XDECREF(vkey);
    Py_XDECREF(proven);
    if (!stands)
        return 0;
    PyObject *gone = get(conn, s_gone);
    int owes = gone == NULL || !PyList_Check(gone) || PyList_GET_SIZE(gone) != 0;
    Py_XDECREF(gone);
    return !owes;
}

/* The grant of `grants` for this pool, namespace and name whose secId and plog id are these:
 * a new reference (and its key's in *key), or NULL (an error set only for MemoryError). */
static PyObject *granted(PyObject *grants, char prefix, const unsigned char *pool, size_t pool_n,
                         const unsigned char *ns, size_t ns_n, const unsigned char *name, size_t name_n,
                         const unsigned char *sec, size_t sec_n, uint64_t plog_id, PyObject **key) {
    size_t skip = prefix != 0;
    *key = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(skip + pool_n + ns_n + name_n + 2));
    if (*key == NULL)
        return NULL;
    char *kp = PyBytes_AS_STRING(*key);
    kp[0] = prefix;                   /* (overwritten by the pool's first byte when there is none) */
    kp += skip;
    memcpy(kp, pool, pool_n);
    kp[pool_n] = 0;
    memcpy(kp + pool_n + 1, ns, ns_n);
    kp[pool_n + 1 + ns_n] = 0;
    memcpy(kp + pool_n + ns_n + 2, name, name_n);
    PyObject *grant = PyDict_GetItemWithError(grants, *key);
    if (grant == NULL)
        return NULL;
    Py_INCREF(grant);
    PyObject *want_sec = PyObject_GetAttr(grant, s_sec);
    int same = want_sec != NULL && PyBytes_Check(want_sec) && (size_t)PyBytes_GET_SIZE(want_sec) == sec_n;
    if (same) {        /* every byte compared: no timing says how much of a guess was right */
        unsigned char diff = 0;
        const unsigned char *w = (const unsigned char *)PyBytes_AS_STRING(want_sec);
        for (size_t i = 0; i < sec_n; i++)
            diff |= (unsigned char)(w[i] ^ sec[i]);
        same = diff == 0;
    }
    Py_XDECREF(want_sec);
    if (same && ((uint64_t)attr_ll(grant, s_plog_id) != plog_id || PyErr_Occurred()))
        same = 0;
    if (!same) {
        Py_DECREF(grant);
        return NULL;
    }
    return grant;
}

/* The plog's lock taken (1), or not (0). Another appender holds it: waited for as Python waits
 * (sending the request to Python instead, with 8 appenders on pmem, sent a fifth of them there,
 * where each holds the lock longer), then the grant and its proof checked again: they may have
 * gone meanwhile (*stale set, the lock held). */
static int lock_plog(PyObject *plog_lock, PyObject *grants, PyObject *key, PyObject *grant, PyObject *conn,
                     int *stale) {
    *stale = 0;
    int taken = try_lock(plog_lock);
    if (taken == 0) {
        taken = wait_lock(plog_lock);
        if (taken == 1 && (PyDict_GetItemWithError(grants, key) != grant || !proof_stands(conn, grant)))
            *stale = 1;
    }
    return taken == 1;
}

/* Whether the plog takes appends, read under its lock: not deleted, not broken, open. */
static int plog_open(PyObject *plog, PyObject *core) {
    PyObject *deleted = get(plog, s_deleted), *broken = get(plog, s_broken), *state = get(core, s_state);
    int ok = deleted == Py_False && broken == Py_None && state != NULL && PyUnicode_Check(state)
             && PyUnicode_Compare(state, s_open) == 0;
    Py_XDECREF(deleted);
    Py_XDECREF(broken);
    Py_XDECREF(state);
    return ok;
}

/* The log's ends, its reach (the plog's `reach`: how far it may be written here, within its
 * capacity; past it, Python raises the reach or refuses) and its nonce, read under the plog's
 * lock: 1, or 0 when one is not as expected (Python serves the request). */
typedef struct {
    long long written, committed, reach;
    unsigned long long nonce;
} LogState;

static int log_state(PyObject *core, PyObject *plog, LogState *log) {
    log->written = attr_ll(core, s_written);
    log->committed = attr_ll(core, s_committed);
    log->reach = attr_ll(plog, s_reach);
    PyObject *nonce = get(core, s_nonce);
    log->nonce = nonce && PyLong_Check(nonce) ? PyLong_AsUnsignedLongLong(nonce) : (unsigned long long)-1;
    Py_XDECREF(nonce);
    return log->written >= 0 && log->committed >= 0 && log->reach >= 0 && !PyErr_Occurred();
}

/* The first of `count` extents (grant.extents: (end, file offset) pairs as u64, in log order)
 * ending past log offset `at` (count when none). */
static Py_ssize_t extent_at(const uint64_t *e, Py_ssize_t count, uint64_t at) {
    Py_ssize_t lo = 0, hi = count;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (e[2 * mid] <= at)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* The grant's plog locked (*locked set: the caller unlocks) and its log's state read, when the
 * grant still stands and the plog takes appends: 1; else 0 (Python's). What was got is set for
 * the caller to release. */
static int take_plog(PyObject *grants, PyObject *key, PyObject *grant, PyObject *conn, PyObject **plog,
                     PyObject **core, PyObject **plog_lock, int *locked, LogState *log) {
    *plog = get(grant, s_plog);
    *core = get(*plog, s_core);
    *plog_lock = get(*plog, s_lock);
    int stale;
    if (*core == NULL || *plog_lock == NULL || !lock_plog(*plog_lock, grants, key, grant, conn, &stale))
        return 0;
    *locked = 1;
    return !stale && plog_open(*plog, *core) && log_state(*core, *plog, log);
}

/* Where `n` bytes from log offset `at` lie, when one extent holds them all: 1 with the file
 * offset and the extent's index set; 0 otherwise (Python writes across extents). */
int one_extent(PyObject *grant, uint64_t at, uint64_t n, long long *file_at, Py_ssize_t *index) {
    PyObject *extents = get(grant, s_extents);
    if (extents == NULL || !PyBytes_Check(extents)) {
        Py_XDECREF(extents);
        return 0;
    }
    const uint64_t *e = (const uint64_t *)PyBytes_AS_STRING(extents);
    Py_ssize_t count = PyBytes_GET_SIZE(extents) / 16, lo = extent_at(e, count, at);
    int fits = lo < count && at + n <= e[2 * lo];
    if (fits) {
        *file_at = (long long)(e[2 * lo + 1] + (at - (lo == 0 ? 0 : e[2 * (lo - 1)])));
        *index = lo;
    }
    Py_DECREF(extents);
    return fits;
}

/* The lock of extent `index`'s segment (a FileSegment's: its fd stays open meanwhile) taken,
 * in Python's order (the plog's first): its fd, with *seg_lock set (a new reference, taken);
 * -1 when it cannot be (destroyed: Python says what happened), *seg_lock NULL or not taken. */
int lock_segment(PyObject *grant, Py_ssize_t index, PyObject **seg_lock, int *locked) {
    *seg_lock = NULL;
    *locked = 0;
    PyObject *segments = get(grant, s_segments);
    if (segments == NULL || !PyList_Check(segments) || index >= PyList_GET_SIZE(segments)) {
        Py_XDECREF(segments);
        return -1;
    }
    PyObject *segment = PyList_GET_ITEM(segments, index);
    Py_INCREF(segment);
    Py_DECREF(segments);
    *seg_lock = get(segment, s_seg_lock);
    if (*seg_lock == NULL || wait_lock(*seg_lock) <= 0) {
        Py_DECREF(segment);
        return -1;
    }
    *locked = 1;
    int fd = (int)attr_ll(segment, s_fd);
    Py_DECREF(segment);
    return fd < 0 || PyErr_Occurred() ? -1 : fd;
}

/* Records marked written in the log's rules (PlogLog.starts and _lengths, arrays of u64), as
 * mark_written does: `starts_raw` and `lengths_raw` (bytes of u64 each) appended to them whole,
 * or not at all (1 done; 0 with MemoryError set, the arrays as they were: `index_now` long). */
static int mark_records(PyObject *starts, PyObject *lengths, PyObject *starts_raw, PyObject *lengths_raw,
                        Py_ssize_t index_now) {
    PyObject *got = PyObject_CallMethodOneArg(starts, s_frombytes, starts_raw);
    if (got == NULL)
        return 0;
    Py_DECREF(got);
    got = PyObject_CallMethodOneArg(lengths, s_frombytes, lengths_raw);
    if (got == NULL) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        if (PySequence_DelSlice(starts, index_now, PY_SSIZE_T_MAX) < 0)
            PyErr_Clear();
        PyErr_Restore(type, value, tb);
        return 0;
    }
    Py_DECREF(got);
    return 1;
}

/* append_one's work on a received packet: a new reference to its tuple, or NULL (with an
 * error set only for MemoryError and KeyboardInterrupt: otherwise Python's to serve). */
static PyObject *append_packet(const unsigned char *packet_buf, size_t packet_len, PyObject *grants, PyObject *conn) {
    PyObject *result = NULL;           /* NULL with no error set: answer None */
    PyObject *grant = NULL, *plog = NULL, *core = NULL, *plog_lock = NULL, *seg_lock = NULL, *key = NULL;
    int plog_locked = 0, seg_locked = 0;

    /* The request: exactly the keys of the common case, each once. */
    Field f[] = {
        {"op", F_IS, 1, "plog_append"}, {"pool", F_STR, 1}, {"ns", F_STR, 1}, {"sec", F_BIN, 1},
        {"name", F_STR, 1}, {"plog_id", F_INT, 1}, {"records", F_ONE_BIN, 1}, {"id", F_INT, 1},
        {"budget_s", F_POSITIVE, 0},
    };
    if (!read_request(packet_buf, packet_len, f, 9) || f[6].n > UINT32_MAX)
        goto done;
    const unsigned char *pool = f[1].at, *ns = f[2].at, *sec = f[3].at, *name = f[4].at, *record = f[6].at;
    size_t pool_n = f[1].n, ns_n = f[2].n, sec_n = f[3].n, name_n = f[4].n, record_n = f[6].n;
    const unsigned char *id_raw = f[7].at;
    size_t id_n = f[7].n;
    uint64_t plog_id = f[5].value, request_id = f[7].value;

    /* The grant: this connection proved the secId for this plog (Python). */
    if ((grant = granted(grants, 0, pool, pool_n, ns, ns_n, name, name_n, sec, sec_n, plog_id, &key)) == NULL)
        goto done;
    if (!proof_stands(conn, grant))
        goto done;
    /* The plog's rules, read under its lock. */
    LogState log;
    if (!take_plog(grants, key, grant, conn, &plog, &core, &plog_lock, &plog_locked, &log))
        goto done;
    long long written = log.written, committed = log.committed, reach = log.reach;
    unsigned long long nonce = log.nonce;
    size_t padded = (record_n + ALIGN_BYTES - 1) / ALIGN_BYTES * ALIGN_BYTES;
    long long frame = HEADER_BYTES + (long long)padded;
    if (written + frame > reach)
        goto done;                        /* OUT_OF_SPACE: Python says so */

    /* Where: the extent holding the frame's first byte (grant.extents: (end, file offset) pairs
     * as u64, in log order), which must hold all of it. */
    Py_ssize_t index_now, seg_index;
    int fd;
    long long file_at;
    if (!one_extent(grant, (uint64_t)written, (uint64_t)frame, &file_at, &seg_index))
        goto done;
    if ((fd = lock_segment(grant, seg_index, &seg_lock, &seg_locked)) < 0)
        goto done;
    PyObject *starts = get(core, s_starts);
    index_now = starts == NULL ? -1 : PyObject_Length(starts);
    if (index_now < 0) {
        Py_XDECREF(starts);
        goto done;
    }

    /* The frame, written in one call: header, payload from the packet, zeros. */
    unsigned char header[HEADER_BYTES], seed[20];
    static const unsigned char zeros[HEADER_BYTES];
    uint64_t index = (uint64_t)index_now;
    put64(seed, nonce);
    put64(seed + 8, index);
    put32(seed + 16, (uint32_t)record_n);
    memcpy(header, "PLG1", 4);
    put32(header + 4, (uint32_t)record_n);
    put32(header + 8, (uint32_t)(index & 0xFFFFFFFFu));
    put32(header + 12, crc32c(crc32c(0, seed, sizeof seed), record, record_n));
    struct iovec parts[3] = {{header, HEADER_BYTES}, {(void *)record, record_n}, {(void *)zeros, padded - record_n}};
    ssize_t done_n;
    do
        done_n = pwritev(fd, parts, 3, (off_t)file_at);
    while (done_n < 0 && errno == EINTR);
    if (done_n != (ssize_t)frame) {
        /* Part of it may be in: no header that checks stays (Python writes it again, and says
         * what failed if it fails again). */
        ssize_t ignored = pwrite(fd, zeros, HEADER_BYTES, (off_t)file_at);
        (void)ignored;
        Py_DECREF(starts);
        goto done;
    }

    /* Marked written, as PlogLog.mark_written does; the segment touched for the next flush. */
    long long end = written + frame;
    {
        PyObject *lengths = get(core, s_lengths), *at = PyLong_FromLongLong(written), *n = PyLong_FromSize_t(record_n);
        PyObject *end_obj = PyLong_FromLongLong(end);
        int failed = lengths == NULL || at == NULL || n == NULL || end_obj == NULL;
        PyObject *got = failed ? NULL : PyObject_CallMethodOneArg(starts, s_append, at);
        failed = failed || got == NULL;
        Py_XDECREF(got);
        if (!failed) {
            got = PyObject_CallMethodOneArg(lengths, s_append, n);
            if (got == NULL) {             /* undone: the rules stay as they were */
                PyObject *popped = PyObject_CallMethod(starts, "pop", NULL);
                Py_XDECREF(popped);
                failed = 1;
            }
            Py_XDECREF(got);
        }
        if (!failed && PyObject_SetAttr(core, s_written, end_obj) < 0) {
            PyObject *popped = PyObject_CallMethod(starts, "pop", NULL);
            Py_XDECREF(popped);
            popped = PyObject_CallMethod(lengths, "pop", NULL);
            Py_XDECREF(popped);
            failed = 1;
        }
        Py_XDECREF(lengths);
        Py_XDECREF(at);
        Py_XDECREF(n);
        Py_XDECREF(end_obj);
        if (failed) {
            /* (A MemoryError.) Not marked: its header goes, as a failed write's does. */
            ssize_t ignored = pwrite(fd, zeros, HEADER_BYTES, (off_t)file_at);
            (void)ignored;
            Py_DECREF(starts);
            goto done;
        }
    }
    unlock(seg_lock);
    seg_locked = 0;
    int commit_here = 0;
    {
        PyObject *touched = get(plog, s_touched), *seg_ids = get(grant, s_seg_ids);
        PyObject *seg_id = seg_ids && PyList_Check(seg_ids) && seg_index < PyList_GET_SIZE(seg_ids)
                               ? PyList_GET_ITEM(seg_ids, seg_index) : NULL;
        int ok = touched != NULL && seg_id != NULL && PySet_Check(touched) && PySet_Add(touched, seg_id) == 0;
        Py_XDECREF(touched);
        Py_XDECREF(seg_ids);
        /* With nothing else written and not committed, no flusher is between taking its target
         * and committing it (_flush_to): committing here cannot undercut one. */
        PyObject *python_commits = get(grant, s_python_commits);
        commit_here = ok && python_commits == Py_False && committed == written;
        Py_XDECREF(python_commits);
        if (commit_here) {
            Py_ssize_t records = PyObject_Length(starts);
            if (records < 0 || set_ll(core, s_committed, end) < 0 || set_ll(core, s_committed_records, records) < 0)
                commit_here = 0;
        }
        PyErr_Clear();     /* not committed here: Python's flush commits it */
    }
    Py_DECREF(starts);

    /* {"offsets": [payload offset], "id": id} */
    unsigned char reply[64];
    size_t at = 0;
    reply[at++] = 0x82;
    at += put_key(reply + at, "offsets");
    reply[at++] = 0x91;
    at += put_uint(reply + at, (uint64_t)written + HEADER_BYTES);
    at += put_key(reply + at, "id");
    memcpy(reply + at, id_raw, id_n);
    at += id_n;
    result = Py_BuildValue("(y#OLNKK)", (const char *)reply, (Py_ssize_t)at, grant, end, PyBool_FromLong(commit_here),
                           (unsigned long long)record_n, (unsigned long long)request_id);
done:
    if (seg_locked)
        unlock(seg_lock);
    if (plog_locked)
        unlock(plog_lock);
    Py_XDECREF(seg_lock);
    Py_XDECREF(plog_lock);
    Py_XDECREF(core);
    Py_XDECREF(plog);
    Py_XDECREF(grant);
    Py_XDECREF(key);
    if (result == NULL)
        fatal_error_kept();
    return result;
}

/* ---- replica_one: a home's forward of whole records to a copy here, served without Python ----
 *
 * The copy's side of PlogService._forward, for a same-host home (its peer connection's receive
 * loop). Python stays the authority as for append_one: the peer connection is granted the copy
 * (fast_append.grant_replica, its key REPLICA_KEY_PREFIX + pool\0ns\0name) only after Python
 * served a forward of it there, on a medium that needs no flush (ramdisk). Served here only: a
 * map of exactly op = "plog_replica_append", pool, ns, sec, name, plog_id, at, data (one bin,
 * at most one forward piece), last = true, id and optionally budget_s; under the plog's lock,
 * the plog a copy, not stale, not deleted, not broken, open, nothing written but not committed,
 * `at` its log's end (unfinished pieces dropped, as Python does), the bytes within its reach
 * and one extent, and whole frames that check (magic, index, length, CRC with the plog's
 * nonce), as rec.scan checks them. Then one pwrite, marked written and committed (no flush:
 * the medium has none). Anything else changes nothing and Python serves it (and says why).
 *
 * Returns 1 with the reply {"length": end, "id": id} in `reply` (`room` bytes, at least 64), 0
 * for Python, -1 with MemoryError or KeyboardInterrupt set. */

#define REPLICA_PIECE_BYTES FORWARD_PIECE_MOST     /* limits.PLOG_REPLICA_PIECE_BYTES: bounds the records too */
#define REPLICA_KEY_PREFIX 1                /* fast_append.REPLICA_KEY_PREFIX */

/* Whether the frames of b[0..n) are whole records that check from `index` on: how many, else 0. */
static Py_ssize_t frames_check(const unsigned char *b, size_t n, uint64_t nonce, uint64_t index) {
    size_t at = 0;
    Py_ssize_t count = 0;
    while (at < n) {
        if (n - at < HEADER_BYTES || memcmp(b + at, "PLG1", 4) != 0)
            return 0;
        uint32_t length = get32(b + at + 4), low = get32(b + at + 8), crc = get32(b + at + 12);
        size_t frame = frame_of(length);
        if (low != (uint32_t)(index & 0xFFFFFFFFu) || frame > n - at)
            return 0;
        unsigned char seed[20];
        put64(seed, nonce);
        put64(seed + 8, index);
        put32(seed + 16, length);
        if (crc32c(crc32c(0, seed, sizeof seed), b + at + HEADER_BYTES, length) != crc)
            return 0;
        at += frame;
        index++;
        count++;
    }
    return count;
}

static int replica_packet(const unsigned char *packet_buf, size_t packet_len, PyObject *grants, PyObject *conn,
                          unsigned char *reply, size_t room, size_t *reply_n) {
    int answered = 0;
    PyObject *grant = NULL, *plog = NULL, *core = NULL, *plog_lock = NULL, *seg_lock = NULL, *key = NULL;
    PyObject *starts = NULL, *lengths = NULL;
    int plog_locked = 0, seg_locked = 0;

    Field f[] = {
        {"op", F_IS, 1, "plog_replica_append"}, {"pool", F_STR, 1}, {"ns", F_STR, 1}, {"sec", F_BIN, 1},
        {"name", F_STR, 1}, {"plog_id", F_INT, 1}, {"at", F_INT, 1}, {"data", F_BIN, 1}, {"last", F_TRUE, 1},
        {"id", F_INT, 1}, {"budget_s", F_POSITIVE, 0},
    };
    if (room < 64 || !read_request(packet_buf, packet_len, f, 11) || f[7].n == 0 || f[7].n > REPLICA_PIECE_BYTES
            || f[9].n > 9)
        goto done;
    const unsigned char *pool = f[1].at, *ns = f[2].at, *sec = f[3].at, *name = f[4].at, *data = f[7].at;
    size_t pool_n = f[1].n, ns_n = f[2].n, sec_n = f[3].n, name_n = f[4].n, data_n = f[7].n;
    uint64_t plog_id = f[5].value, at_log = f[6].value;

    /* The grant: Python served a forward of this copy on this peer connection. */
    if ((grant = granted(grants, REPLICA_KEY_PREFIX, pool, pool_n, ns, ns_n, name, name_n, sec, sec_n, plog_id,
                         &key)) == NULL || !proof_stands(conn, grant))
        goto done;

    /* The copy's rules, read under its lock (op_plog_replica_append's). */
    LogState log;
    if (!take_plog(grants, key, grant, conn, &plog, &core, &plog_lock, &plog_locked, &log)
            || log.committed != log.written)
        goto done;
    {
        PyObject *role = get(plog, s_role), *stale_copy = get(plog, s_stale);
        int ok = role != NULL && PyUnicode_Check(role) && PyUnicode_Compare(role, s_replica) == 0
                 && stale_copy == Py_False;
        Py_XDECREF(role);
        Py_XDECREF(stale_copy);
        if (!ok)
            goto done;
    }
    long long written = log.written, committed = log.committed, reach = log.reach;
    unsigned long long nonce = log.nonce;
    if (at_log != (uint64_t)written || (uint64_t)written + data_n > (uint64_t)reach)
        goto done;                        /* a gap, or past the reach: Python's */
    starts = get(core, s_starts);
    lengths = get(core, s_lengths);
    Py_ssize_t index_now = starts == NULL || lengths == NULL ? -1 : PyObject_Length(starts);    /* (arrays) */
    if (index_now < 0 || PyObject_Length(lengths) != index_now)
        goto done;
    Py_ssize_t records = frames_check(data, data_n, nonce, (uint64_t)index_now);
    if (records == 0)
        goto done;                        /* not whole records that check: Python refuses them */

    /* Where: the extent holding the first byte, which must hold all of it (as append_one). */
    long long file_at;
    Py_ssize_t seg_index;
    if (!one_extent(grant, (uint64_t)written, data_n, &file_at, &seg_index))
        goto done;
    int fd = lock_segment(grant, seg_index, &seg_lock, &seg_locked);
    if (fd < 0)
        goto done;

    static const unsigned char zeros[HEADER_BYTES];
    ssize_t done_n;
    do
        done_n = pwrite(fd, data, data_n, (off_t)file_at);
    while (done_n < 0 && errno == EINTR);
    if (done_n != (ssize_t)data_n) {
        ssize_t ignored = pwrite(fd, zeros, HEADER_BYTES, (off_t)file_at);     /* no header that checks stays */
        (void)ignored;
        goto done;
    }

    /* Marked written and committed, as mark_written and commit do; undone whole on a failure. */
    long long end = written + (long long)data_n;
    {
        PyObject *starts_raw = PyBytes_FromStringAndSize(NULL, records * 8);
        PyObject *lengths_raw = PyBytes_FromStringAndSize(NULL, records * 8);
        int failed = starts_raw == NULL || lengths_raw == NULL;
        if (!failed) {
            uint64_t *start_out = (uint64_t *)PyBytes_AS_STRING(starts_raw);
            uint64_t *length_out = (uint64_t *)PyBytes_AS_STRING(lengths_raw);
            size_t at = 0;
            for (Py_ssize_t r = 0; r < records; r++) {
                uint32_t length = get32(data + at + 4);
                start_out[r] = (uint64_t)written + at;
                length_out[r] = length;
                at += frame_of(length);
            }
            failed = !mark_records(starts, lengths, starts_raw, lengths_raw, index_now);
        }
        Py_XDECREF(starts_raw);
        Py_XDECREF(lengths_raw);
        if (!failed && (set_ll(core, s_written, end) < 0 || set_ll(plog, s_receiving, end) < 0
                        || set_ll(core, s_committed, end) < 0
                        || set_ll(core, s_committed_records, index_now + records) < 0))
            failed = 1;
        if (failed) {
            /* (A MemoryError.) The rules as they were, and the header gone, as Python's failure does. */
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            PySequence_DelSlice(starts, index_now, PY_SSIZE_T_MAX);
            PySequence_DelSlice(lengths, index_now, PY_SSIZE_T_MAX);
            set_ll(core, s_written, written);
            set_ll(plog, s_receiving, written);
            set_ll(core, s_committed, committed);
            set_ll(core, s_committed_records, index_now);
            PyErr_Clear();
            PyErr_Restore(type, value, tb);
            ssize_t ignored = pwrite(fd, zeros, HEADER_BYTES, (off_t)file_at);
            (void)ignored;
            goto done;
        }
    }

    size_t r_at = 0;
    reply[r_at++] = 0x82;
    r_at += put_key(reply + r_at, "length");
    r_at += put_uint(reply + r_at, (uint64_t)end);
    r_at += put_key(reply + r_at, "id");
    memcpy(reply + r_at, f[9].at, f[9].n);
    r_at += f[9].n;
    *reply_n = r_at;
    answered = 1;
done:
    if (seg_locked)
        unlock(seg_lock);
    if (plog_locked)
        unlock(plog_lock);
    Py_XDECREF(starts);
    Py_XDECREF(lengths);
    Py_XDECREF(seg_lock);
    Py_XDECREF(plog_lock);
    Py_XDECREF(core);
    Py_XDECREF(plog);
    Py_XDECREF(grant);
    Py_XDECREF(key);
    if (!answered && fatal_error_kept())
        return -1;
    return answered;
}

/* replica_frames(data, nonce, first_index) -> int: how many whole records that check
 * replica_packet sees in `data` (0: it leaves them to Python). For the tests: rec.scan's twin. */
PyObject *replica_frames(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer data;
    unsigned long long nonce, first_index;
    if (!PyArg_ParseTuple(args, "y*KK", &data, &nonce, &first_index))
        return NULL;
    Py_ssize_t count = frames_check(data.buf, (size_t)data.len, nonce, first_index);
    PyBuffer_Release(&data);
    return PyLong_FromSsize_t(count);
}

/* ---- append_batch: a same-host append_many from the connection's shared stage ---------------
 *
 * An append_many of 100 x 4 KiB spent ~30% of the server's CPU in Python (decode, dispatch,
 * checks, plan, reply) on top of framing and the write; its common case needs none of that. So
 * it is served here like append_one, under the same grant (plog/fast_append.py), every check of
 * append_one made the same way, and more: a map of exactly op = "plog_append", pool, ns, sec,
 * name, plog_id, shared (a stage of this connection, kept after the batch: no larger than
 * stage_kept_bytes), lengths (1 to BATCH_MOST ints, each at most RECORD_MOST_BYTES, their sum
 * within the stage), id and optionally budget_s; frames of at most BATCH_FRAMES_MOST_BYTES in
 * one extent; a plog this loop commits (no flush, no copies, nothing else awaiting commit); the
 * reply within the loop's room. Anything else returns NULL, having changed nothing, and Python
 * serves it (and says what was wrong).
 *
 * The client may write its stage at any moment: each payload is copied into a private buffer
 * and its CRC computed over the copy (as frame_batch), the whole batch written with one
 * pwrite, then marked written and committed as PlogLog.mark_written and commit do: all of the
 * batch, or nothing of it (a failed write leaves no first header that checks).
 *
 * Returns (reply, grant, end, True, payload_bytes, request_id, records), or NULL. */

/* (BATCH_MOST, RECORD_MOST_BYTES, BATCH_FRAMES_MOST_BYTES: _plogserve.h, the module's constants too.) */
#define FRAME_BUFFERS_KEPT 4
#define BATCH_PIECES_MOST 16                    /* extents one batch may span */
_Static_assert(BATCH_MOST <= 0xffff, "a reply's offsets: one array 16");

/* Buffers a batch is framed into, kept for the next (a new one faults in its pages each time);
 * taken and given with the GIL held. */
static unsigned char *frame_buffers[FRAME_BUFFERS_KEPT];
static int frame_buffers_n;

static unsigned char *take_frame_buffer(void) {
    return frame_buffers_n > 0 ? frame_buffers[--frame_buffers_n] : malloc(BATCH_FRAMES_MOST_BYTES);
}

static void give_frame_buffer(unsigned char *b) {
    if (b != NULL && frame_buffers_n < FRAME_BUFFERS_KEPT)
        frame_buffers[frame_buffers_n++] = b;
    else
        free(b);
}

/* `n` bytes written at `file_at` of a FileSegment under its lock: 1 done, 0 not (its fd gone, a
 * failed or short write), -1 an error set (MemoryError, KeyboardInterrupt while waiting). */
static int write_piece(PyObject *segment, const unsigned char *from, size_t n, long long file_at) {
    PyObject *seg_lock = get(segment, s_seg_lock);
    if (seg_lock == NULL || wait_lock(seg_lock) <= 0) {
        Py_XDECREF(seg_lock);
        return -1;
    }
    int fd = (int)attr_ll(segment, s_fd);
    size_t done_n = 0;
    while (fd >= 0 && !PyErr_Occurred() && done_n < n) {
        ssize_t w = pwrite(fd, from + done_n, n - done_n, (off_t)(file_at + (long long)done_n));
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            break;
        done_n += (size_t)w;
    }
    unlock(seg_lock);
    Py_DECREF(seg_lock);
    return PyErr_Occurred() ? -1 : done_n == n;
}

/* A batch's first header zeroed (its write failed, or its marking): no scan after a crash
 * finds a record of an append that failed. The error set, if any, kept for the caller. */
static void unwrite(PyObject *segment, long long file_at) {
    static const unsigned char zeros[HEADER_BYTES];
    PyObject *type, *value, *trace;
    PyErr_Fetch(&type, &value, &trace);
    if (write_piece(segment, zeros, HEADER_BYTES, file_at) < 0)
        PyErr_Clear();
    PyErr_Restore(type, value, trace);
}

static PyObject *append_batch_packet(const unsigned char *packet_buf, size_t packet_len, PyObject *grants,
                                     PyObject *conn, size_t room) {
    PyObject *result = NULL;
    PyObject *grant = NULL, *plog = NULL, *core = NULL, *plog_lock = NULL, *key = NULL;
    PyObject *stage = NULL, *mapping = NULL, *starts = NULL, *lengths = NULL, *segments = NULL;
    PyObject *starts_raw = NULL, *lengths_raw = NULL, *reply = NULL;
    int plog_locked = 0;
    uint64_t *sizes = NULL;
    unsigned char *frames = NULL;

    Field f[] = {
        {"op", F_IS, 1, "plog_append"}, {"pool", F_STR, 1}, {"ns", F_STR, 1}, {"sec", F_BIN, 1},
        {"name", F_STR, 1}, {"plog_id", F_INT, 1}, {"shared", F_INT, 1}, {"lengths", F_UINTS, 1, NULL, BATCH_MOST},
        {"id", F_INT, 1}, {"budget_s", F_POSITIVE, 0},
    };
    if (!read_request(packet_buf, packet_len, f, 10))
        goto done;
    size_t count = f[7].n;
    uint64_t plog_id = f[5].value, token = f[6].value, request_id = f[8].value;
    const unsigned char *id_raw = f[8].at;
    size_t id_n = f[8].n;

    /* The lengths (read_request checked each is an int), and what the batch comes to. */
    if ((sizes = PyMem_Malloc(count * sizeof *sizes)) == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    uint64_t payload_bytes = 0, frames_bytes = 0;
    {
        Reader r = {f[7].at, packet_buf + packet_len};
        for (size_t i = 0; i < count; i++) {
            const unsigned char *raw;
            size_t raw_n;
            int neg;
            if (!read_int(&r, &raw, &raw_n, &sizes[i], &neg) || neg || sizes[i] > RECORD_MOST_BYTES)
                goto done;
            payload_bytes += sizes[i];
            frames_bytes += frame_of(sizes[i]);
        }
    }
    if (frames_bytes > BATCH_FRAMES_MOST_BYTES)
        goto done;

    if ((grant = granted(grants, 0, f[1].at, f[1].n, f[2].at, f[2].n, f[4].at, f[4].n, f[3].at, f[3].n, plog_id,
                         &key)) == NULL)
        goto done;
    if (!proof_stands(conn, grant))
        goto done;
    {
        PyObject *python_commits = get(grant, s_python_commits);
        int ours = python_commits == Py_False;      /* a flush or copies: Python's (_flush_to) */
        Py_XDECREF(python_commits);
        if (!ours)
            goto done;
    }

    /* The stage: this connection's, one it keeps (a larger one Python drops after its batch). */
    {
        PyObject *services = get(conn, s_services);
        PyObject *stages = services && PyDict_Check(services) ? PyDict_GetItemWithError(services, s_plog) : NULL;
        PyObject *token_obj = stages && PyDict_Check(stages) ? PyLong_FromUnsignedLongLong(token) : NULL;
        stage = token_obj ? PyDict_GetItemWithError(stages, token_obj) : NULL;
        Py_XINCREF(stage);
        Py_XDECREF(token_obj);
        Py_XDECREF(services);
    }
    if (stage == NULL)
        goto done;
    long long stage_bytes = attr_ll(stage, s_size), kept_bytes = attr_ll(grant, s_stage_kept_bytes);
    if (PyErr_Occurred() || stage_bytes < 0 || kept_bytes < 0 || stage_bytes > kept_bytes
            || payload_bytes > (uint64_t)stage_bytes)
        goto done;
    if ((mapping = get(stage, s_mapping)) == NULL)
        goto done;

    /* The plog's rules, read under its lock. */
    LogState log;
    if (!take_plog(grants, key, grant, conn, &plog, &core, &plog_lock, &plog_locked, &log))
        goto done;
    long long written = log.written, committed = log.committed, reach = log.reach;
    unsigned long long nonce = log.nonce;
    /* Another append awaiting its commit: Python's (a commit here could undercut its flusher). */
    if (committed != written)
        goto done;
    if ((uint64_t)written + frames_bytes > (uint64_t)reach)
        goto done;                        /* OUT_OF_SPACE: Python says so */

    /* The reply must fit the loop's room: measured before anything is written. */
    size_t reply_n;
    {
        reply_n = 1 + 8 + (count < 16 ? 1 : 3) + 3 + id_n;     /* map, "offsets", array, "id", id */
        uint64_t at = (uint64_t)written;
        unsigned char scratch[9];
        for (size_t i = 0; i < count; i++) {
            reply_n += put_uint(scratch, at + HEADER_BYTES);
            at += frame_of(sizes[i]);
        }
        if (reply_n > room)
            goto done;
    }

    /* Where: the pieces of the batch in the extents it spans (grant.extents: (end, file offset)
     * pairs as u64, in log order), as LogBytes.write cuts it. */
    struct {
        long long file_at;
        size_t n;
        Py_ssize_t seg;
    } pieces[BATCH_PIECES_MOST];
    int piece_n = 0;
    {
        PyObject *extents = get(grant, s_extents);
        if (extents == NULL || !PyBytes_Check(extents)) {
            Py_XDECREF(extents);
            goto done;
        }
        const uint64_t *e = (const uint64_t *)PyBytes_AS_STRING(extents);
        Py_ssize_t n_ext = PyBytes_GET_SIZE(extents) / 16, lo = extent_at(e, n_ext, (uint64_t)written);
        uint64_t at = (uint64_t)written, left = frames_bytes;
        while (left > 0 && lo < n_ext && piece_n < BATCH_PIECES_MOST) {
            uint64_t start = lo == 0 ? 0 : e[2 * (lo - 1)], n = e[2 * lo] - at < left ? e[2 * lo] - at : left;
            pieces[piece_n].file_at = (long long)(e[2 * lo + 1] + (at - start));
            pieces[piece_n].n = (size_t)n;
            pieces[piece_n++].seg = lo++;
            at += n;
            left -= n;
        }
        Py_DECREF(extents);
        /* Too many pieces, or a first header cut in two (undoing it would take two writes):
         * Python's. */
        if (left > 0 || pieces[0].n < HEADER_BYTES)
            goto done;
    }
    segments = get(grant, s_segments);
    if (segments == NULL || !PyList_Check(segments) || pieces[piece_n - 1].seg >= PyList_GET_SIZE(segments))
        goto done;
    starts = get(core, s_starts);
    lengths = get(core, s_lengths);
    Py_ssize_t index_now = starts == NULL ? -1 : PyObject_Length(starts);
    if (index_now < 0 || lengths == NULL)
        goto done;
    starts_raw = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(count * 8));
    lengths_raw = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(count * 8));
    reply = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)reply_n);     /* before the write: it cannot fail after */
    if (starts_raw == NULL || lengths_raw == NULL || reply == NULL || (frames = take_frame_buffer()) == NULL) {
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        goto done;
    }

    /* The frames, each payload copied out of the stage before its CRC (the GIL held from the
     * view taken to its release: nothing closes the stage meanwhile). */
    {
        Py_buffer view;
        if (PyObject_GetBuffer(mapping, &view, PyBUF_SIMPLE) < 0)
            goto done;
        if ((uint64_t)view.len < payload_bytes) {
            PyBuffer_Release(&view);
            goto done;
        }
        const unsigned char *payload = view.buf;
        unsigned char *at = frames;
        uint64_t *start_out = (uint64_t *)PyBytes_AS_STRING(starts_raw);
        uint64_t *length_out = (uint64_t *)PyBytes_AS_STRING(lengths_raw);
        uint64_t log_at = (uint64_t)written;
        for (size_t i = 0; i < count; i++) {
            size_t n = (size_t)sizes[i], padded = frame_of(n) - HEADER_BYTES;
            uint64_t index = (uint64_t)index_now + i;
            unsigned char seed[20];
            put64(seed, nonce);
            put64(seed + 8, index);
            put32(seed + 16, (uint32_t)n);
            uint32_t crc = crc32c_copy(crc32c(0, seed, sizeof seed), at + HEADER_BYTES, payload, n);
            memcpy(at, "PLG1", 4);
            put32(at + 4, (uint32_t)n);
            put32(at + 8, (uint32_t)(index & 0xFFFFFFFFu));
            put32(at + 12, crc);
            memset(at + HEADER_BYTES + n, 0, padded - n);
            start_out[i] = log_at;
            length_out[i] = n;
            log_at += HEADER_BYTES + padded;
            at += HEADER_BYTES + padded;
            payload += n;
        }
        PyBuffer_Release(&view);
    }

    /* Each piece written under its segment's lock (in Python's order: plog, then segment;
     * FileSegment's lock keeps its fd open meanwhile). A failed or short write leaves no first
     * header that checks (Python writes the batch again, and says what failed if it fails
     * again). */
    {
        int rc = 1;
        size_t from = 0;
        for (int k = 0; k < piece_n && rc == 1; k++) {
            rc = write_piece(PyList_GET_ITEM(segments, pieces[k].seg), frames + from, pieces[k].n, pieces[k].file_at);
            from += pieces[k].n;
        }
        if (rc != 1) {
            unwrite(PyList_GET_ITEM(segments, pieces[0].seg), pieces[0].file_at);
            goto done;
        }
    }

    /* Marked written, as PlogLog.mark_written does: all of the batch, or none of it. */
    long long end = written + (long long)frames_bytes;
    {
        int failed = !mark_records(starts, lengths, starts_raw, lengths_raw, index_now);
        if (!failed && set_ll(core, s_written, end) < 0) {
            PySequence_DelSlice(starts, index_now, PY_SSIZE_T_MAX);
            PySequence_DelSlice(lengths, index_now, PY_SSIZE_T_MAX);
            failed = 1;
        }
        if (failed) {
            unwrite(PyList_GET_ITEM(segments, pieces[0].seg), pieces[0].file_at);
            goto done;
        }
    }
    {
        /* Touched for the next flush, then committed (nothing else awaited commit: checked
         * above, under the lock held since). Should either fail (MemoryError), Python's flush
         * commits it: the tuple says not committed. */
        PyObject *touched = get(plog, s_touched), *seg_ids = get(grant, s_seg_ids);
        int ok = touched != NULL && PySet_Check(touched) && seg_ids != NULL && PyList_Check(seg_ids)
                 && pieces[piece_n - 1].seg < PyList_GET_SIZE(seg_ids);
        for (int k = 0; ok && k < piece_n; k++)
            ok = PySet_Add(touched, PyList_GET_ITEM(seg_ids, pieces[k].seg)) == 0;
        Py_XDECREF(touched);
        Py_XDECREF(seg_ids);
        int commit_here = ok && set_ll(core, s_committed, end) == 0
                          && set_ll(core, s_committed_records, index_now + (Py_ssize_t)count) == 0;
        PyErr_Clear();

        /* {"offsets": [payload offsets], "id": id} */
        unsigned char *r = (unsigned char *)PyBytes_AS_STRING(reply);
        size_t at = 0;
        r[at++] = 0x82;
        at += put_key(r + at, "offsets");
        if (count < 16) {
            r[at++] = (unsigned char)(0x90 | count);
        } else {                           /* count <= BATCH_MOST: an array 16 */
            r[at++] = 0xdc;
            r[at++] = (unsigned char)(count >> 8);
            r[at++] = (unsigned char)count;
        }
        const uint64_t *start_of = (const uint64_t *)PyBytes_AS_STRING(starts_raw);
        for (size_t i = 0; i < count; i++)
            at += put_uint(r + at, start_of[i] + HEADER_BYTES);
        at += put_key(r + at, "id");
        memcpy(r + at, id_raw, id_n);
        at += id_n;
        assert(at == reply_n);
        result = Py_BuildValue("(OOLNKKn)", reply, grant, end, PyBool_FromLong(commit_here),
                               (unsigned long long)payload_bytes, (unsigned long long)request_id, (Py_ssize_t)count);
    }
done:
    give_frame_buffer(frames);
    if (plog_locked)
        unlock(plog_lock);
    PyMem_Free(sizes);
    Py_XDECREF(reply);
    Py_XDECREF(starts_raw);
    Py_XDECREF(lengths_raw);
    Py_XDECREF(starts);
    Py_XDECREF(lengths);
    Py_XDECREF(mapping);
    Py_XDECREF(stage);
    Py_XDECREF(segments);
    Py_XDECREF(plog_lock);
    Py_XDECREF(core);
    Py_XDECREF(plog);
    Py_XDECREF(grant);
    Py_XDECREF(key);
    if (result == NULL)
        fatal_error_kept();
    return result;
}

/* ---- serve_append: append_one inside a connection's receive loop (_frames.c serve_packets) ----
 *
 * Exported as the capsule memfabric._records.SERVE_APPEND (_plogwait.h): the loop hands it each
 * packet; a plain append committed here (a medium that needs no flush) is answered by the loop
 * without a return to Python, and counted in the grant's `counts` (an array of two u64:
 * appends, payload bytes; PlogService adds them to its own). Returns, with the GIL:
 *   0              not one of append_one's: Python serves it (nothing changed)
 *   1              appended and committed: the reply's bytes in `reply` (`room` bytes at least 64)
 *   APPEND_PYTHON  appended, to be committed by Python (copies): wait->got holds append_one's tuple
 *   APPEND_WAIT    appended, awaiting a flush its grant's CommitGroup shares (pmem, no copies):
 *                  `wait` filled and the reply in `reply`, for the loop's commit_wait
 *  -1              MemoryError or KeyboardInterrupt, set. */

/* The grant's counts (two u64), or NULL. The array lives as long as the service and is never
 * resized, so its memory stays where it is (a loop adds to it without the GIL: atomically). */
static uint64_t *counts_of(PyObject *grant) {
    PyObject *counts = PyObject_GetAttr(grant, s_counts);
    Py_buffer view;
    if (counts == NULL || PyObject_GetBuffer(counts, &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        Py_XDECREF(counts);
        PyErr_Clear();
        return NULL;
    }
    uint64_t *c = view.len >= 16 ? view.buf : NULL;
    PyBuffer_Release(&view);
    Py_DECREF(counts);
    return c;
}

static int count_served(PyObject *grant, uint64_t records, uint64_t payload_bytes) {
    uint64_t *c = counts_of(grant);
    if (c == NULL)
        return 0;
    __atomic_fetch_add(&c[0], records, __ATOMIC_RELAXED);
    __atomic_fetch_add(&c[1], payload_bytes, __ATOMIC_RELAXED);
    return 1;
}

int serve_append(const unsigned char *packet, size_t n, PyObject *grants, PyObject *conn, unsigned char *reply,
                 size_t room, size_t *reply_n, AppendWait *wait) {
    wait->got = NULL;
    PyObject *got = append_packet(packet, n, grants, conn);
    if (got == NULL && !PyErr_Occurred())
        got = append_batch_packet(packet, n, grants, conn, room);
    if (got == NULL)    /* not an append of its: a copy's forward perhaps (replica_packet) */
        return PyErr_Occurred() ? -1 : replica_packet(packet, n, grants, conn, reply, room, reply_n);
    /* (reply, grant, end, committed, payload_bytes, request_id[, records]), as built above */
    PyObject *reply_obj = PyTuple_GET_ITEM(got, 0), *grant = PyTuple_GET_ITEM(got, 1);
    uint64_t records = PyTuple_GET_SIZE(got) > 6 ? (uint64_t)PyLong_AsSsize_t(PyTuple_GET_ITEM(got, 6)) : 1;
    uint64_t payload_bytes = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(got, 4));
    int fits = (size_t)PyBytes_GET_SIZE(reply_obj) <= room && !PyErr_Occurred();
    PyErr_Clear();
    int committed = PyTuple_GET_ITEM(got, 3) == Py_True;
    if (!committed && fits) {          /* its copy's to hold first: forwarded here when Python let it */
        int forwarded = forward_served(got);
        if (forwarded < 0) {
            Py_DECREF(got);
            return -1;
        }
        committed = forwarded == 1;
    }
    if (fits && committed && count_served(grant, records, payload_bytes)) {
        *reply_n = (size_t)PyBytes_GET_SIZE(reply_obj);
        memcpy(reply, PyBytes_AS_STRING(reply_obj), *reply_n);
        Py_DECREF(got);
        return 1;
    }
    wait->got = got;
    PyObject *group = fits ? PyObject_GetAttr(grant, s_group) : NULL;
    long long end = PyLong_AsLongLong(PyTuple_GET_ITEM(got, 2));
    uint64_t *counts = counts_of(grant);
    PyErr_Clear();
    int waits = group != NULL && Py_IS_TYPE(group, &CommitGroupType) && end > 0 && counts != NULL;
    Py_XDECREF(group);           /* the grant keeps it, and `got` the grant */
    if (!waits)
        return APPEND_PYTHON;
    *wait = (AppendWait){got, group, end, counts, records, payload_bytes};
    *reply_n = (size_t)PyBytes_GET_SIZE(reply_obj);
    memcpy(reply, PyBytes_AS_STRING(reply_obj), *reply_n);
    return APPEND_WAIT;
}
