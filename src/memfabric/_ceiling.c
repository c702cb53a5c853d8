/* memfabric._records.group_commit_ceiling: group commit with no fabric at all, the baseline
 * `memfabric bench --plog` measures beside its pmem appenders (plog/bench.py).
 *
 * Why. Eight processes appending 4 KiB to one pmem plog reach about 2x one process's write +
 * fsync on our 2-core VM, against a target of 5x. A compiled probe with no server (processes
 * writing at reserved offsets of one file and sharing fdatasync) reached only 3.6x to 5.3x
 * there: about 33 us of CPU per append, mostly the kernel's. Measured in the same run as the
 * fabric, that figure says how much of the gap is ours and how much the machine's.
 *
 * How. `threads` threads each loop until `seconds` pass: reserve the next record's place
 * under the mutex, pwrite the record there outside it, then wait until a flush that began
 * after the write ended is done. One waiter at a time leads: it calls fdatasync outside the
 * mutex, and every waiter whose write came before that flush began is covered by it, as a
 * pmem plog's appenders are (_commitgroup.c). Threads, not processes: the kernel's work per
 * append (a write, a share of a flush, a wake-up) is the same.
 *
 * The file's range is written with zeros and flushed once before the clock starts, as a pmem
 * plog's memory is at its creation (plog/service.py): a first write into blocks fallocated
 * but never written is a metadata change that every flush would wait for, which a plog's
 * appends never pay. Records wrap around within that range. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "_ceiling.h"

#define CEILING_THREADS_MOST 64
#define CEILING_MOST_S 60.0
#define CEILING_RECORD_MOST_BYTES (1 << 20)
#define CEILING_RANGE_BYTES (64LL << 20)     /* the file's bytes written; records wrap within them */
#define CEILING_SLICE_NS 20000000L           /* a waiter looks again at least this often */
#define CEILING_WAIT_MOST_S 10.0             /* a flush not done by then fails the run */
#define CEILING_FILL 'r'                     /* each record's bytes (the bench's records) */

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;                       /* on CLOCK_MONOTONIC */
    int fd;
    const char *record;
    long long record_bytes, slots;
    double end_s;
    long long next;                          /* records placed: the next one's slot, modulo slots */
    unsigned long long started, done;        /* flushes begun, and the last one finished */
    int leading;
    int failed;                              /* the first errno: every thread stops */
    unsigned long long records, flushes;
} Ceiling;

static double monotonic_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int write_all(int fd, const char *data, long long n, long long at) {
    while (n > 0) {
        ssize_t wrote = pwrite(fd, data, (size_t)n, (off_t)at);
        if (wrote < 0 && errno == EINTR)
            continue;
        if (wrote <= 0)
            return wrote < 0 ? errno : EIO;
        data += wrote;
        n -= wrote;
        at += wrote;
    }
    return 0;
}

static int datasync(int fd) {
    int rc;
    do
        rc = fdatasync(fd);
    while (rc < 0 && errno == EINTR);
    return rc < 0 ? errno : 0;
}

/* The range allocated, written with zeros and flushed (see the top), before any record. */
static int prepare_range(int fd) {
    int err = posix_fallocate(fd, 0, CEILING_RANGE_BYTES);
    if (err)
        return err;
    long long chunk = 1 << 20;
    char *zeros = calloc(1, (size_t)chunk);
    if (zeros == NULL)
        return ENOMEM;
    for (long long at = 0; at < CEILING_RANGE_BYTES && err == 0; at += chunk)
        err = write_all(fd, zeros, chunk, at);
    free(zeros);
    if (err == 0)
        err = fsync(fd) < 0 ? errno : 0;
    return err;
}

static void wait_a_slice(Ceiling *c) {
    struct timespec until;
    clock_gettime(CLOCK_MONOTONIC, &until);
    until.tv_nsec += CEILING_SLICE_NS;
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec += 1;
        until.tv_nsec -= 1000000000L;
    }
    pthread_cond_timedwait(&c->cv, &c->mu, &until);
}

/* One appender: records until the end, each answered once a flush covers it. */
static void *append_loop(void *arg) {
    Ceiling *c = arg;
    for (;;) {
        pthread_mutex_lock(&c->mu);
        if (c->failed || monotonic_s() >= c->end_s) {
            pthread_mutex_unlock(&c->mu);
            return NULL;
        }
        long long at = (c->next++ % c->slots) * c->record_bytes;
        pthread_mutex_unlock(&c->mu);

        int err = write_all(c->fd, c->record, c->record_bytes, at);

        pthread_mutex_lock(&c->mu);
        if (err && !c->failed)
            c->failed = err;
        unsigned long long need = c->started + 1;     /* a flush begun after the write ended */
        double give_up = monotonic_s() + CEILING_WAIT_MOST_S;
        while (c->done < need && !c->failed) {
            if (!c->leading) {
                c->leading = 1;
                unsigned long long mine = ++c->started;
                pthread_mutex_unlock(&c->mu);
                err = datasync(c->fd);
                pthread_mutex_lock(&c->mu);
                c->leading = 0;
                c->flushes++;
                if (err && !c->failed)
                    c->failed = err;
                c->done = mine;
                pthread_cond_broadcast(&c->cv);
            } else if (monotonic_s() > give_up) {
                c->failed = ETIMEDOUT;
                pthread_cond_broadcast(&c->cv);
            } else {
                wait_a_slice(c);
            }
        }
        if (!c->failed)
            c->records++;
        pthread_mutex_unlock(&c->mu);
    }
}

/* The appenders started and joined; 0, or the first errno of the run. */
static int run(Ceiling *c, int threads, double seconds) {
    pthread_t ids[CEILING_THREADS_MOST];
    int started = 0, err = prepare_range(c->fd);
    c->end_s = monotonic_s() + seconds;
    for (; started < threads && err == 0; started++) {
        err = pthread_create(&ids[started], NULL, append_loop, c);
        if (err) {
            pthread_mutex_lock(&c->mu);
            c->failed = err;                      /* those already started stop */
            pthread_mutex_unlock(&c->mu);
            break;
        }
    }
    for (int i = 0; i < started; i++)
        pthread_join(ids[i], NULL);
    return err ? err : c->failed;
}

PyObject *group_commit_ceiling(PyObject *Py_UNUSED(self), PyObject *args) {
    int fd, threads;
    double seconds;
    Py_ssize_t record_bytes;
    if (!PyArg_ParseTuple(args, "iidn:group_commit_ceiling", &fd, &threads, &seconds, &record_bytes))
        return NULL;
    if (threads < 1 || threads > CEILING_THREADS_MOST)
        return PyErr_Format(PyExc_ValueError, "threads must be 1 to %d, not %d", CEILING_THREADS_MOST, threads);
    if (!(seconds > 0 && seconds <= CEILING_MOST_S))       /* NaN too */
        return PyErr_Format(PyExc_ValueError, "seconds must be above 0 and at most %g, not %R",
                            CEILING_MOST_S, PyTuple_GET_ITEM(args, 2));
    if (record_bytes < 1 || record_bytes > CEILING_RECORD_MOST_BYTES)
        return PyErr_Format(PyExc_ValueError, "record_bytes must be 1 to %d, not %zd", CEILING_RECORD_MOST_BYTES,
                            record_bytes);
    struct stat st;
    int flags = fd < 0 ? -1 : fcntl(fd, F_GETFL);
    if (flags < 0 || fstat(fd, &st) < 0 || !S_ISREG(st.st_mode))
        return PyErr_Format(PyExc_ValueError, "fd %d is not an open regular file (the records are written in one)",
                            fd);
    /* O_APPEND: Linux's pwrite would append, past the bounded range */
    if ((flags & O_ACCMODE) == O_RDONLY || (flags & O_APPEND))
        return PyErr_Format(PyExc_ValueError, "fd %d must be open for writing, without O_APPEND", fd);

    char *record = malloc((size_t)record_bytes);
    if (record == NULL)
        return PyErr_NoMemory();
    memset(record, CEILING_FILL, (size_t)record_bytes);
    Ceiling c = {.fd = fd, .record = record, .record_bytes = record_bytes,
                 .slots = CEILING_RANGE_BYTES / record_bytes};
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&c.cv, &attr);
    pthread_condattr_destroy(&attr);
    pthread_mutex_init(&c.mu, NULL);

    int err;
    Py_BEGIN_ALLOW_THREADS
    err = run(&c, threads, seconds);
    Py_END_ALLOW_THREADS

    pthread_cond_destroy(&c.cv);
    pthread_mutex_destroy(&c.mu);
    free(record);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return Py_BuildValue("(KK)", c.records, c.flushes);
}
