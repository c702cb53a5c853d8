/* ---- call_append: a same-host client's append of one record, sent and answered in one call ----
 *
 * call_append(fd, head, record, budget_s, request_id, buffer, poll_s) -> (status, value, waited_s)
 *
 * The request is `head` (plog/client.py: the map's header and every entry but the record's
 * bytes, budget_s and id, ending with "records" and its one-item array), the record as a bin,
 * then budget_s and id: sent as one SEQPACKET message straight from the caller's buffer, then
 * the reply received into `buffer` (polling without sleeping until poll_s, then blocking,
 * bounded by the socket's SO_RCVTIMEO and SO_SNDTIMEO), all without the GIL. The link
 * (datapath/link.py call_compiled) keeps its rules: one request at a time, ids, replies given
 * up on. Statuses:
 *   CALL_OK          the reply was {"offsets": [value], "id": request_id}
 *   CALL_REPLY       another reply (an error, a "gone" notice): value bytes of it in `buffer`
 *   CALL_UNSENT      SO_SNDTIMEO ran out: nothing was sent
 *   CALL_TIMEOUT     sent; no reply within SO_RCVTIMEO
 *   CALL_CLOSED      the server closed the connection
 *   CALL_BAD         a reply over the buffer, or with fds: the stream cannot be trusted
 * A signal's handler that raises (Ctrl-C) raises here, the request perhaps sent. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "_msgpack.h"
#include "_plogcall.h"

/* (The CALL_ statuses: _plogcall.h, the module's constants too; _plogforward.c reads them.) */

static double clock_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* Run the signal handlers (the GIL taken for it): -1 when one raised. */
static int signals_raised(PyThreadState **save) {
    PyEval_RestoreThread(*save);
    int raised = PyErr_CheckSignals() < 0;
    *save = PyEval_SaveThread();
    return raised ? -1 : 0;
}

/* The request in `out` sent as one SEQPACKET message and its reply received into `buffer`
 * (polling until poll_s, then blocking; the GIL let go meanwhile): a CALL_ status, with *value
 * (CALL_OK: the reply's offset; CALL_REPLY: its length) and *waited_s set; -1 with *err (an
 * errno) or *interrupted (a signal's handler raised: its exception set) instead. */
int exchange(int fd, struct iovec *out, int out_n, Py_buffer *buffer, double poll_s,
             unsigned long long request_id, uint64_t *value, double *waited_s, int *err_out,
             int *interrupted_out) {
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = out;
    msg.msg_iovlen = (size_t)out_n;
    int status = -1, err = 0, interrupted = 0;
    ssize_t got = -1;
    double waited_s_ = 0.0;
    PyThreadState *save = PyEval_SaveThread();
    for (;;) {
        if (sendmsg(fd, &msg, MSG_NOSIGNAL) >= 0)
            break;
        if (errno == EINTR) {
            if (signals_raised(&save) < 0) {
                interrupted = 1;
                break;
            }
            continue;
        }
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            status = CALL_UNSENT;
        else if (errno == EPIPE || errno == ECONNRESET)
            status = CALL_CLOSED;
        else
            err = errno;
        break;
    }
    if (status < 0 && !err && !interrupted) {
        union {
            struct cmsghdr align;
            char space[CMSG_SPACE(4 * sizeof(int))];
        } control;
        struct iovec in = {buffer->buf, (size_t)buffer->len};
        double began = clock_s(), poll_until = began + poll_s;
        int polled = 0;
        for (;;) {
            memset(&msg, 0, sizeof msg);
            msg.msg_iov = &in;
            msg.msg_iovlen = 1;
            msg.msg_control = control.space;
            msg.msg_controllen = sizeof control.space;
            int polling = clock_s() < poll_until;
            if (polled && !polling) {      /* a signal that came while polling raises before the wait */
                polled = 0;
                if (signals_raised(&save) < 0) {
                    interrupted = 1;
                    break;
                }
            }
            got = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC | (polling ? MSG_DONTWAIT : 0));
            if (got >= 0)
                break;
            if (errno == EINTR) {
                if (signals_raised(&save) < 0) {
                    interrupted = 1;
                    break;
                }
                continue;
            }
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                if (polling) {
                    polled = 1;
                    sched_yield();
                    continue;
                }
                status = CALL_TIMEOUT;
                break;
            }
            if (errno == ECONNRESET)
                status = CALL_CLOSED;
            else
                err = errno;
            break;
        }
        waited_s_ = clock_s() - began;
        if (got >= 0) {
            int fds = 0;
            for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
                if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
                    continue;
                size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
                for (size_t i = 0; i < count; i++) {
                    int one;
                    memcpy(&one, CMSG_DATA(c) + i * sizeof(int), sizeof one);
                    close(one);
                    fds++;
                }
            }
            if (got == 0)
                status = CALL_CLOSED;
            else if (fds || (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)))
                status = CALL_BAD;
            else
                status = CALL_REPLY;
        }
    }
    PyEval_RestoreThread(save);
    uint64_t offset = 0;
    if (status == CALL_REPLY) {            /* the common reply, read here: 82 "offsets" [n] "id" id */
        static const unsigned char prefix[] = {0x82, 0xa7, 'o', 'f', 'f', 's', 'e', 't', 's', 0x91};
        Reader r = {buffer->buf, (const unsigned char *)buffer->buf + got};
        const unsigned char *at, *raw, *key;
        size_t raw_n, key_n;
        uint64_t id;
        int neg;
        if (take(&r, sizeof prefix, &at) && memcmp(at, prefix, sizeof prefix) == 0
                && read_int(&r, &raw, &raw_n, &offset, &neg) && !neg && read_bytes(&r, 's', &key, &key_n)
                && key_is(key, key_n, "id") && read_int(&r, &raw, &raw_n, &id, &neg) && !neg
                && id == request_id && r.p == r.end)
            status = CALL_OK;
    }
    *value = status == CALL_OK ? offset : status == CALL_REPLY ? (uint64_t)got : 0;
    *waited_s = waited_s_;
    *err_out = err;
    *interrupted_out = interrupted;
    return err || interrupted ? -1 : status;
}

/* A msgpack bin's header for n bytes (bin 8, 16 or 32): its length. */
size_t bin_header(unsigned char bin[5], uint64_t n) {
    if (n <= 0xff) {
        bin[0] = 0xc4;
        bin[1] = (unsigned char)n;
        return 2;
    }
    if (n <= 0xffff) {
        bin[0] = 0xc5;
        bin[1] = (unsigned char)(n >> 8);
        bin[2] = (unsigned char)n;
        return 3;
    }
    bin[0] = 0xc6;
    for (int i = 0; i < 4; i++)
        bin[1 + i] = (unsigned char)(n >> (8 * (3 - i)));
    return 5;
}

/* A request's last two entries, "budget_s" (a float 64) and "id" (as 8 bytes: the reply echoes
 * it as msgpack does): their length (at most 32). */
size_t request_tail(unsigned char tail[32], double budget_s, uint64_t request_id) {
    size_t n = put_key(tail, "budget_s");
    tail[n++] = 0xcb;
    uint64_t bits;
    memcpy(&bits, &budget_s, sizeof bits);
    put_be64(tail + n, bits);
    n += 8;
    n += put_key(tail + n, "id");
    tail[n++] = 0xcf;
    put_be64(tail + n, request_id);
    return n + 8;
}

PyObject *call_append(PyObject *Py_UNUSED(self), PyObject *args) {
    int fd;
    Py_buffer head, record, buffer;
    double budget_s, poll_s;
    unsigned long long request_id;
    if (!PyArg_ParseTuple(args, "iy*y*dKw*d", &fd, &head, &record, &budget_s, &request_id, &buffer, &poll_s))
        return NULL;
    PyObject *result = NULL;
    unsigned char bin[5], tail[32];
    size_t bin_n = bin_header(bin, (uint64_t)record.len), tail_n = request_tail(tail, budget_s, request_id);
    struct iovec out[4] = {{head.buf, (size_t)head.len}, {bin, bin_n}, {record.buf, (size_t)record.len},
                           {tail, tail_n}};
    uint64_t offset = 0;
    double waited_s = 0.0;
    int err = 0, interrupted = 0;
    int status = exchange(fd, out, 4, &buffer, poll_s, request_id, &offset, &waited_s, &err, &interrupted);
    if (interrupted) {
        /* the handler's exception is set */
    } else if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
    } else {
        result = Py_BuildValue("(iKd)", status, (unsigned long long)offset, waited_s);
    }
    PyBuffer_Release(&head);
    PyBuffer_Release(&record);
    PyBuffer_Release(&buffer);
    return result;
}
