/* memfabric._records: MemPlog's compiled paths, one module; this file defines it (its functions'
 * table, its constants and capsules) and holds the little that is no other file's job:
 *
 *   _crc32c.c       CRC-32C (hardware in three streams, or a table): every frame's checksum
 *   _framing.c      a batch of records framed in one call (frame_batch), a batch's arithmetic
 *                   (gather_into, lengths_total, frame_starts, buffer_lengths), a same-host
 *                   reader's record checked in one call (read_frame)
 *   _plogserve.c    the server's appends in a connection's receive loop (serve_append: append_one,
 *                   append_batch, a copy's replica_one)
 *   _plogforward.c  a home's forward of such an append to its one live copy (forward_served)
 *   _plogcall.c     a same-host client's append sent and answered in one call (call_append)
 *   _commitgroup.c  a pmem plog's group commit (CommitGroup, commit_wait)
 *   _ceiling.c      group commit with no fabric, bench --plog's baseline (group_commit_ceiling)
 *
 * dup_fd(fd), datasync_close(fd): a file segment's flush (media/files.py FileSegment.sync) in
 * two calls that let the GIL go once, not three times (below).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

#include "_ceiling.h"
#include "_crc32c.h"
#include "_framing.h"
#include "_plogcall.h"
#include "_plogserve.h"

PyObject *s_acquire, *s_release, *s_append, *s_plog, *s_core, *s_sec, *s_plog_id, *s_proven, *s_verified,
    *s_vkey, *s_deleted, *s_broken, *s_state, *s_open, *s_written, *s_committed, *s_committed_records, *s_starts,
    *s_lengths, *s_nonce, *s_reach, *s_extents, *s_segments, *s_fd, *s_lock, *s_touched, *s_python_commits,
    *s_gone, *s_seg_ids, *s_seg_lock, *s_role, *s_replica, *s_stale, *s_receiving, *s_services, *s_mapping, *s_size,
    *s_frombytes, *s_stage_kept_bytes, *s_group, *s_counts;

int intern_names(void) {
#define NAME(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return -1;
    NAME(s_acquire, "acquire") NAME(s_release, "release") NAME(s_append, "append") NAME(s_plog, "plog")
    NAME(s_core, "core") NAME(s_sec, "sec") NAME(s_plog_id, "plog_id") NAME(s_proven, "proven")
    NAME(s_verified, "verified") NAME(s_vkey, "vkey") NAME(s_deleted, "deleted") NAME(s_broken, "broken")
    NAME(s_state, "state") NAME(s_open, "open") NAME(s_written, "written") NAME(s_committed, "committed")
    NAME(s_committed_records, "_committed_records") NAME(s_starts, "starts") NAME(s_lengths, "_lengths")
    NAME(s_nonce, "nonce") NAME(s_reach, "reach") NAME(s_extents, "extents") NAME(s_segments, "segments")
    NAME(s_fd, "fd") NAME(s_lock, "lock") NAME(s_touched, "touched") NAME(s_python_commits, "python_commits")
    NAME(s_gone, "gone") NAME(s_seg_ids, "seg_ids")
    NAME(s_seg_lock, "_lock")
    NAME(s_role, "role") NAME(s_replica, "replica") NAME(s_stale, "stale") NAME(s_receiving, "receiving")
    NAME(s_services, "services") NAME(s_mapping, "mapping") NAME(s_size, "size") NAME(s_frombytes, "frombytes")
    NAME(s_stage_kept_bytes, "stage_kept_bytes") NAME(s_group, "group") NAME(s_counts, "counts")
#undef NAME
    return 0;
}


/* ---- a segment's flush (media/files.py FileSegment.sync) with fewer switches of the GIL ------
 *
 * dup_fd(fd): a copy of fd, made with the GIL kept (os.dup lets it go, and the segment's
 * lock, held meanwhile, then makes the next append's write wait). datasync_close(fd):
 * fdatasync, then close, in one stretch without the GIL (os.fdatasync and os.close let it go
 * and take it back once each: under load each taking back is a wait). Both raise OSError. */

static PyObject *dup_fd(PyObject *Py_UNUSED(self), PyObject *args) {
    int fd;
    if (!PyArg_ParseTuple(args, "i", &fd))
        return NULL;
    int copy = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (copy < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(copy);
}

static PyObject *datasync_close(PyObject *Py_UNUSED(self), PyObject *args) {
    int fd, rc, err = 0;
    if (!PyArg_ParseTuple(args, "i", &fd))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    do
        rc = fdatasync(fd);
    while (rc < 0 && errno == EINTR);
    if (rc < 0)
        err = errno;
    close(fd);
    Py_END_ALLOW_THREADS
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"replica_frames", replica_frames, METH_VARARGS, "replica_frames(data, nonce, first_index) -> int"},
    {"dup_fd", dup_fd, METH_VARARGS, "dup_fd(fd) -> int: a copy of fd (close-on-exec), the GIL kept"},
    {"datasync_close", datasync_close, METH_VARARGS, "datasync_close(fd): fdatasync(fd), then close(fd), without the GIL"},
    {"call_append", call_append, METH_VARARGS,
     "call_append(fd, head, record, budget_s, request_id, buffer, poll_s) -> (status, value, waited_s)"},
    {"gather_into", gather_into, METH_VARARGS,
     "gather_into(dst, parts, lengths=None) -> int: the parts (each of its length) copied back to back"},
    {"lengths_total", lengths_total, METH_VARARGS, "lengths_total(lengths, most) -> int: their sum, or -1"},
    {"frame_starts", frame_starts, METH_VARARGS, "frame_starts(at, lengths) -> (starts, end)"},
    {"buffer_lengths", buffer_lengths, METH_VARARGS, "buffer_lengths(parts) -> list[int] | None"},
    {"read_frame", read_frame, METH_VARARGS,
     "read_frame(view, at, length, nonce, index) -> bytes | None: record index's payload, if its frame checks"},
    {"group_commit_ceiling", group_commit_ceiling, METH_VARARGS,
     "group_commit_ceiling(fd, threads, seconds, record_bytes) -> (records, flushes): threads appending records "
     "to fd's file at reserved places, sharing fdatasync, for seconds, without the GIL (_ceiling.c)"},
    {"crc32c_of", crc32c_of, METH_VARARGS, "crc32c_of(data, value=0, table=False) -> int"},
    {"frame_batch", frame_batch, METH_VARARGS,
     "frame_batch(nonce, first_index, data, lengths, into=None) -> bytes | int: the records' frames, back to "
     "back (into `into`: their length)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "memfabric._records",
                                    "MemPlog record batches framed in one call (see plog/record.py).", -1, methods};

PyMODINIT_FUNC PyInit__records(void) {
    crc32c_init();
    if (intern_names() < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "CALL_OK", CALL_OK) < 0 || PyModule_AddIntConstant(m, "CALL_REPLY", CALL_REPLY) < 0
            || PyModule_AddIntConstant(m, "CALL_UNSENT", CALL_UNSENT) < 0
            || PyModule_AddIntConstant(m, "CALL_TIMEOUT", CALL_TIMEOUT) < 0
            || PyModule_AddIntConstant(m, "CALL_CLOSED", CALL_CLOSED) < 0
            || PyModule_AddIntConstant(m, "CALL_BAD", CALL_BAD) < 0
            || PyModule_AddIntConstant(m, "BATCH_MOST", BATCH_MOST) < 0
            || PyModule_AddIntConstant(m, "RECORD_MOST_BYTES", RECORD_MOST_BYTES) < 0
            || PyModule_AddIntConstant(m, "BATCH_FRAMES_MOST_BYTES", BATCH_FRAMES_MOST_BYTES) < 0
            || PyModule_AddIntConstant(m, "FORWARD_PIECE_MOST", FORWARD_PIECE_MOST) < 0
            || PyModule_AddObject(m, "SERVE_APPEND", PyCapsule_New((void *)serve_append, "memfabric._records.SERVE_APPEND",
                                                                   NULL)) < 0
            || PyModule_AddObject(m, "COMMIT_WAIT", PyCapsule_New((void *)commit_wait, "memfabric._records.COMMIT_WAIT",
                                                                  NULL)) < 0
            || PyType_Ready(&CommitGroupType) < 0
            || PyModule_AddObjectRef(m, "CommitGroup", (PyObject *)&CommitGroupType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
