/* Between _frames.c's receive loop (serve_packets) and _plogserve.c: the loop's plog appends.
 *
 * serve_append (the capsule memfabric._records.SERVE_APPEND), with the GIL, hands each packet
 * to append_one, append_batch and replica_packet; see its comment in _plogserve.c for what it
 * returns. When it returns APPEND_WAIT (pmem, no copies: the append is written and awaits a
 * flush), `wait` holds what the loop needs to wait for its commit without the GIL, in
 * commit_wait (the capsule memfabric._records.COMMIT_WAIT): group commit without a return to
 * Python for each append. */
#ifndef MEMFABRIC_PLOGWAIT_H
#define MEMFABRIC_PLOGWAIT_H

#include <Python.h>
#include <stdint.h>

#define APPEND_PYTHON 2          /* written; Python commits it and answers (wait->got) */
#define APPEND_WAIT 3            /* written; the loop waits for its commit (commit_wait) */

typedef struct {
    PyObject *got;               /* append_one's tuple: Python's if the wait hands it back */
    void *group;                 /* the plog's CommitGroup, kept alive by got's grant */
    long long end;               /* the log's end with this append */
    uint64_t *counts;            /* the grant's counts (appends, payload bytes) */
    uint64_t records, payload_bytes;
} AppendWait;

typedef int (*serve_append_fn)(const unsigned char *packet, size_t n, PyObject *grants, PyObject *conn,
                               unsigned char *reply, size_t room, size_t *reply_n, AppendWait *wait);
/* Without the GIL (*save: the thread's state, the GIL taken and let go again through it):
 * 1 once the append is committed (counted), 0 when Python must commit it (wait->got). */
typedef int (*commit_wait_fn)(AppendWait *wait, PyThreadState **save);

#endif
