/* What the server's compiled MemPlog paths share: _plogserve.c (append_one, append_batch,
 * replica_one, serve_append), _plogforward.c (forward_served) and _records.c (the module: the
 * names below interned, the constants and capsules given to Python). */
#ifndef MEMFABRIC_PLOGSERVE_H
#define MEMFABRIC_PLOGSERVE_H

#include <Python.h>
#include <stddef.h>
#include <stdint.h>

#include "_plogwait.h"

#pragma GCC visibility push(hidden)       /* (the module's own: see _crc32c.h) */

/* The attributes and methods the compiled paths read and call by name, interned once
 * (_records.c intern_names, from PyInit__records). */
extern PyObject *s_acquire, *s_release, *s_append, *s_plog, *s_core, *s_sec, *s_plog_id, *s_proven, *s_verified,
    *s_vkey, *s_deleted, *s_broken, *s_state, *s_open, *s_written, *s_committed, *s_committed_records, *s_starts,
    *s_lengths, *s_nonce, *s_reach, *s_extents, *s_segments, *s_fd, *s_lock, *s_touched, *s_python_commits,
    *s_gone, *s_seg_ids, *s_seg_lock, *s_role, *s_replica, *s_stale, *s_receiving, *s_services, *s_mapping, *s_size,
    *s_frombytes, *s_stage_kept_bytes, *s_group, *s_counts;

int intern_names(void);

#define BATCH_MOST 4096                         /* limits.py MAX_PLOG_BATCH (fast_append.py checks) */
#define RECORD_MOST_BYTES (32u << 20)           /* limits.py MAX_PLOG_RECORD_BYTES */
#define BATCH_FRAMES_MOST_BYTES (1u << 20)      /* service.py JOIN_BELOW_BYTES: larger ones, Python's */

/* _plogserve.c: the receive loop's entry (SERVE_APPEND, _plogwait.h) and what _plogforward.c
 * takes from it (their comments there); replica_frames, a Python function for the tests. */
int serve_append(const unsigned char *packet, size_t n, PyObject *grants, PyObject *conn, unsigned char *reply,
                 size_t room, size_t *reply_n, AppendWait *wait);
int one_extent(PyObject *grant, uint64_t at, uint64_t n, long long *file_at, Py_ssize_t *index);
int lock_segment(PyObject *grant, Py_ssize_t index, PyObject **seg_lock, int *locked);
PyObject *replica_frames(PyObject *self, PyObject *args);

/* _plogforward.c: a home's forward to its one live same-host copy, from serve_append. */
#define FORWARD_PIECE_MOST (240u << 10)     /* limits.py PLOG_REPLICA_PIECE_BYTES (checked there) */
int forward_served(PyObject *pending);

#pragma GCC visibility pop

/* _commitgroup.c: a pmem plog's group commit (COMMIT_WAIT, _plogwait.h). */
extern PyTypeObject CommitGroupType;
int commit_wait(AppendWait *wait, PyThreadState **save);

/* ---- the Python locks and attributes the compiled paths take and read ---------------------- */

/* A Python lock taken without waiting: 1 taken, 0 held elsewhere, -1 error. */
static inline int try_lock(PyObject *lock) {
    PyObject *got = PyObject_CallMethodOneArg(lock, s_acquire, Py_False);
    if (got == NULL)
        return -1;
    int taken = PyObject_IsTrue(got);
    Py_DECREF(got);
    return taken;
}

/* A Python lock waited for as Python waits (the GIL let go meanwhile): 1 taken, -1 error. */
static inline int wait_lock(PyObject *lock) {
    PyObject *got = PyObject_CallMethodNoArgs(lock, s_acquire);
    if (got == NULL)
        return -1;
    int taken = PyObject_IsTrue(got);
    Py_DECREF(got);
    return taken == 1 ? 1 : -1;
}

/* On a compiled path's way out: 1 when the error pending is one to raise (MemoryError,
 * KeyboardInterrupt), kept; else any other is cleared (a rule not as expected: Python serves
 * the request, and says what is wrong) and 0. */
static inline int fatal_error_kept(void) {
    if (!PyErr_Occurred())
        return 0;
    if (PyErr_ExceptionMatches(PyExc_MemoryError) || PyErr_ExceptionMatches(PyExc_KeyboardInterrupt))
        return 1;
    PyErr_Clear();
    return 0;
}

/* Released with an exception perhaps pending (a path on its way out with an error): kept across
 * the call, which would otherwise replace it with a SystemError. */
static inline void unlock(PyObject *lock) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *r = PyObject_CallMethodNoArgs(lock, s_release);
    Py_XDECREF(r);
    if (r == NULL)
        PyErr_Clear();      /* ours, taken above: cannot fail */
    PyErr_Restore(type, value, tb);
}

static inline PyObject *get(PyObject *o, PyObject *name) {
    return o == NULL ? NULL : PyObject_GetAttr(o, name);
}

#endif
