/* memfabric._records.CommitGroup and commit_wait: a pmem plog's group commit inside the
 * connections' receive loops (_frames.c serve_packets), without a return to Python for each
 * append.
 *
 * Why. Eight same-host appenders to one pmem plog made the server spend about 95 us of CPU
 * per append against 23 on ramdisk: each append written in the loop went back to Python
 * (fast_finish, _flush_to), queued on the plog's flush lock and took the GIL in turn, one
 * wake-up and one GIL hand-off after another, while a flush covered four appends. Here a
 * written append waits without the GIL on the plog's CommitGroup: one waiter at a time (the
 * leader) takes the GIL and calls Python's flush (the grant's `flush`: PlogService._flush_to,
 * which flushes and commits everything written so far), and every waiter it covers wakes at
 * once and answers from its loop.
 *
 * Python stays the authority. `committed` is a copy of the log's committed end, taken by a
 * leader from Python's answer after its flush, and only grows; a waiter it does not cover
 * leads in turn, and Python's flush says what becomes of its append. Anything unusual hands
 * the append back to Python (fast_finish), which commits or fails it as before: the flush
 * raised (a failed flush, a deleted plog), or the wait passed COMMIT_WAIT_MOST_S. Each sleep
 * is a bounded slice.
 */
#include <Python.h>
#include <pthread.h>
#include <time.h>

#include "_plogwait.h"

#define COMMIT_SLICE_NS 20000000L      /* a sleeper looks again at least this often */
#define COMMIT_WAIT_MOST_S 1.0         /* then Python's (fast_finish waits on the flush lock) */

typedef struct {
    PyObject_HEAD
    pthread_mutex_t mu;                /* never taken with the GIL held */
    pthread_cond_t cv;                 /* on CLOCK_MONOTONIC */
    long long committed;
    int leading;                       /* a waiter is in Python's flush */
    unsigned long long flushes, covered;   /* leaders' flushes; waits another's flush answered */
} CommitGroup;

static PyObject *group_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *names[] = {NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, ":CommitGroup", names))
        return NULL;
    CommitGroup *g = (CommitGroup *)type->tp_alloc(type, 0);
    if (g == NULL)
        return NULL;
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&g->cv, &attr);
    pthread_condattr_destroy(&attr);
    pthread_mutex_init(&g->mu, NULL);
    return (PyObject *)g;
}

static void group_dealloc(CommitGroup *g) {
    pthread_cond_destroy(&g->cv);      /* no waiter left: each held a reference (its grant's) */
    pthread_mutex_destroy(&g->mu);
    Py_TYPE(g)->tp_free((PyObject *)g);
}

static PyObject *group_counts(CommitGroup *g, PyObject *Py_UNUSED(ignored)) {
    long long committed;
    unsigned long long flushes, covered;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&g->mu);
    committed = g->committed;
    flushes = g->flushes;
    covered = g->covered;
    pthread_mutex_unlock(&g->mu);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("{sLsKsK}", "committed", committed, "flushes", flushes, "covered", covered);
}

static PyMethodDef group_methods[] = {
    {"counts", (PyCFunction)group_counts, METH_NOARGS,
     "counts() -> {committed, flushes, covered}: its copy of the committed end, leaders' flushes, waits "
     "answered by another's flush"},
    {NULL, NULL, 0, NULL},
};

PyTypeObject CommitGroupType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "memfabric._records.CommitGroup",
    .tp_basicsize = sizeof(CommitGroup),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "CommitGroup(): where a pmem plog's appends written in receive loops wait for their commit "
              "(_commitgroup.c)",
    .tp_new = group_new,
    .tp_dealloc = (destructor)group_dealloc,
    .tp_methods = group_methods,
};

static double monotonic_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void sleep_a_slice(CommitGroup *g) {
    struct timespec until;
    clock_gettime(CLOCK_MONOTONIC, &until);
    until.tv_nsec += COMMIT_SLICE_NS;
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec += 1;
        until.tv_nsec -= 1000000000L;
    }
    pthread_cond_timedwait(&g->cv, &g->mu, &until);
}

/* The leader's flush: Python's (the grant's `flush(end)`, returning the log's committed end),
 * with the GIL; -1 when it raised (cleared: Python's fast_finish raises it again, and answers).
 * Whatever it raised is cleared, a KeyboardInterrupt too: connection threads are never the
 * main thread, where signal handlers run. */
static long long python_flush(PyObject *grant, long long end, PyThreadState **save) {
    PyEval_RestoreThread(*save);
    long long committed = -1;
    PyObject *got = PyObject_CallMethod(grant, "flush", "L", end);
    if (got != NULL) {
        committed = PyLong_AsLongLong(got);
        Py_DECREF(got);
    }
    if (PyErr_Occurred()) {
        PyErr_Clear();
        committed = -1;
    }
    *save = PyEval_SaveThread();
    return committed;
}

int commit_wait(AppendWait *wait, PyThreadState **save) {
    CommitGroup *g = wait->group;
    double give_up = monotonic_s() + COMMIT_WAIT_MOST_S;
    int covered = 0;
    pthread_mutex_lock(&g->mu);
    for (;;) {
        if (g->committed >= wait->end) {
            g->covered++;
            covered = 1;                  /* another's flush covered it */
            break;
        }
        if (!g->leading) {
            g->leading = 1;
            pthread_mutex_unlock(&g->mu);
            long long committed = python_flush(PyTuple_GET_ITEM(wait->got, 1), wait->end, save);
            pthread_mutex_lock(&g->mu);
            g->leading = 0;
            g->flushes++;
            if (committed > g->committed)
                g->committed = committed;
            pthread_cond_broadcast(&g->cv);
            covered = committed >= wait->end;
            break;
        }
        if (monotonic_s() > give_up)
            break;
        sleep_a_slice(g);
    }
    pthread_mutex_unlock(&g->mu);
    if (covered && wait->counts != NULL) {
        __atomic_fetch_add(&wait->counts[0], wait->records, __ATOMIC_RELAXED);
        __atomic_fetch_add(&wait->counts[1], wait->payload_bytes, __ATOMIC_RELAXED);
    }
    return covered;
}
