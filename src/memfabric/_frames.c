/* memfabric._frames: receiving RPC frames (transport/rpc.py), compiled.
 *
 * A remote read or write of a mid-size span spends most of its software time waiting for
 * and taking in one frame: polling for its first bytes, reading its first block, reading its
 * payload. In Python each poll that finds nothing raises (and formats) a BlockingIOError and
 * each step is a few interpreter calls; here the whole of it is one call that holds no GIL
 * while it waits. The frame layout and the deadline rules are rpc.py's:
 *
 *     frame = u32 header length | u64 payload length | header [| padding] | payload
 *
 * recv_frame(fd, block, poll_s, begin_timeout_s, frame_timeout_s, into) fills `block` (the
 * frame's first FIRST_BLOCK bytes) and, when `into` is given and the frame's header fits the
 * block and its payload is exactly len(into) bytes, the payload too. Returns:
 *   LANDED (1)      the block and the payload are in
 *   BLOCK (0)       the block is in; the payload (if any) is still to be read
 *   NOTHING (-1)    no byte of a frame came before begin_timeout_s (the stream is whole)
 *   STALLED (-2)    a frame began but did not end within frame_timeout_s (the stream is not)
 * A closed peer raises ConnectionError; other socket errors raise OSError. A signal that
 * interrupts a wait runs its Python handler; if it raises (Ctrl-C), so does the call, and the
 * stream's position is unknown (the caller closes it, as after any interrupted receive).
 *
 * recv_exact(fd, view, poll_s, timeout_s) fills `view`: DONE (0), or NOTHING/STALLED as above.
 *
 * Waiting: non-blocking receives with sched_yield between them for at most poll_s, then
 * poll(2) until the deadline. The socket itself may stay blocking: every receive here says
 * MSG_DONTWAIT.
 */
#include "_frames.h"

double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Signal handlers run in the main thread only. A signal that came while a wait polled made
 * no syscall fail with EINTR (none blocked), so before such a wait goes to sleep the main
 * thread runs the handlers itself: else Ctrl-C would wait for the data or the deadline. */
static unsigned long main_thread_ident;

int in_main_thread(void) {   /* with the GIL */
    return PyThread_get_thread_ident() == main_thread_ident;
}

/* Without the GIL: runs pending signal handlers; returns whether one raised. */
int handlers_raised(PyThreadState **save) {
    PyEval_RestoreThread(*save);
    int failed = PyErr_CheckSignals();
    *save = PyEval_SaveThread();
    return failed;
}

/* Receive into buf[*got:n] until it is full or `deadline` (FOREVER: none) passes, polling
 * without sleeping until `poll_until` first. With `one`, returns as soon as any byte came.
 * Called without the GIL; takes it only to run signal handlers. */
Outcome receive(int fd, char *buf, Py_ssize_t n, Py_ssize_t *got, double poll_until,
                double deadline, int one, int *err, PyThreadState **save, int main_thread) {
    int polled = 0;
    while (*got < n) {
        ssize_t k = recv(fd, buf + *got, (size_t)(n - *got), MSG_DONTWAIT);
        if (k > 0) {
            *got += k;
            if (one)
                return GOT;
            continue;
        }
        if (k == 0)
            return CLOSED;
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
            *err = errno;
            return FAILED;
        }
        double now = now_s();
        if (now < poll_until) {
            polled = main_thread;
            sched_yield();
            continue;
        }
        if (polled) {
            polled = 0;
            if (handlers_raised(save))
                return INTERRUPTED;
        }
        int timeout_ms = -1;
        if (deadline != FOREVER) {
            if (now >= deadline)
                return TIMED_OUT;
            double ms = (deadline - now) * 1000.0 + 1;
            timeout_ms = ms < 1e9 ? (int)ms : 1000000000;   /* a far deadline: wait, then look again */
        }
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int r = poll(&p, 1, timeout_ms);
        if (r < 0) {
            if (errno != EINTR) {
                *err = errno;
                return FAILED;
            }
            if (handlers_raised(save))
                return INTERRUPTED;
        }
    }
    return GOT;
}

/* Raises for CLOSED, FAILED and INTERRUPTED (with the GIL held); returns 0 if it did. */
int raise_for(Outcome outcome, int err) {
    if (outcome == CLOSED) {
        PyErr_SetString(PyExc_ConnectionError, "peer closed the connection");
        return 0;
    }
    if (outcome == FAILED) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return 0;
    }
    if (outcome == INTERRUPTED)
        return 0;           /* the handler's exception is set */
    return 1;
}

int writable(PyObject *o, Py_buffer *view) {
    return PyObject_GetBuffer(o, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) == 0;
}

static double deadline_after(double now, PyObject *timeout, int *ok) {
    *ok = 1;
    if (timeout == Py_None)
        return FOREVER;
    double t = PyFloat_AsDouble(timeout);
    if (t == -1.0 && PyErr_Occurred()) {
        *ok = 0;
        return 0;
    }
    return now + (t > 0 ? t : 0);
}

static PyObject *recv_frame(PyObject *Py_UNUSED(self), PyObject *args) {
    int fd;
    PyObject *block_obj, *begin_obj, *frame_obj, *into_obj;
    double poll_s;
    if (!PyArg_ParseTuple(args, "iOdOOO", &fd, &block_obj, &poll_s, &begin_obj, &frame_obj, &into_obj))
        return NULL;
    Py_buffer block, into;
    if (!writable(block_obj, &block))
        return NULL;
    if (block.len != FIRST_BLOCK) {
        PyBuffer_Release(&block);
        PyErr_SetString(PyExc_ValueError, "the block must be FIRST_BLOCK bytes");
        return NULL;
    }
    int has_into = into_obj != Py_None;
    if (has_into && !writable(into_obj, &into)) {
        PyBuffer_Release(&block);
        return NULL;
    }
    double start = now_s();
    int ok_begin, ok_frame;
    double begin_deadline = deadline_after(start, begin_obj, &ok_begin);
    double frame_s = frame_obj == Py_None ? 0 : PyFloat_AsDouble(frame_obj);
    ok_frame = !(frame_obj != Py_None && frame_s == -1.0 && PyErr_Occurred());
    if (!ok_begin || !ok_frame) {
        PyBuffer_Release(&block);
        if (has_into)
            PyBuffer_Release(&into);
        return NULL;
    }
    int err = 0, result = BLOCK;
    Outcome outcome;
    Py_ssize_t got = 0;
    char *b = (char *)block.buf;
    int main_thread = in_main_thread();
    PyThreadState *save = PyEval_SaveThread();
    outcome = receive(fd, b, FIRST_BLOCK, &got, start + poll_s, begin_deadline, 1, &err, &save, main_thread);
    if (outcome == TIMED_OUT) {
        result = NOTHING;
        goto out;
    }
    if (outcome != GOT)
        goto out;
    /* Begun: the rest must come within the frame's own bound (else the begin deadline). */
    double frame_deadline = frame_obj == Py_None ? begin_deadline : now_s() + (frame_s > 0 ? frame_s : 0);
    double poll_until = now_s() + poll_s;
    outcome = receive(fd, b, FIRST_BLOCK, &got, poll_until, frame_deadline, 0, &err, &save, main_thread);
    if (outcome == TIMED_OUT) {
        result = STALLED;
        goto out;
    }
    if (outcome != GOT)
        goto out;
    const unsigned char *u = (const unsigned char *)b;
    uint32_t head_len = ((uint32_t)u[0] << 24) | ((uint32_t)u[1] << 16) | ((uint32_t)u[2] << 8) | u[3];
    uint64_t payload_len = 0;
    for (int i = 4; i < PREFIX_BYTES; i++)
        payload_len = (payload_len << 8) | u[i];
    if (has_into && into.len > 0 && PREFIX_BYTES + (uint64_t)head_len <= FIRST_BLOCK
            && payload_len == (uint64_t)into.len) {
        Py_ssize_t landed = 0;
        outcome = receive(fd, (char *)into.buf, into.len, &landed, poll_until, frame_deadline, 0, &err, &save,
                          main_thread);
        if (outcome == TIMED_OUT) {
            result = STALLED;
            goto out;
        }
        if (outcome == GOT)
            result = LANDED;
    }
out:
    PyEval_RestoreThread(save);
    PyBuffer_Release(&block);
    if (has_into)
        PyBuffer_Release(&into);
    if (outcome != TIMED_OUT && !raise_for(outcome, err))
        return NULL;
    return PyLong_FromLong(result);
}

static PyObject *recv_exact(PyObject *Py_UNUSED(self), PyObject *args) {
    int fd;
    PyObject *view_obj, *timeout_obj;
    double poll_s;
    if (!PyArg_ParseTuple(args, "iOdO", &fd, &view_obj, &poll_s, &timeout_obj))
        return NULL;
    Py_buffer view;
    if (!writable(view_obj, &view))
        return NULL;
    double start = now_s();
    int ok;
    double deadline = deadline_after(start, timeout_obj, &ok);
    if (!ok) {
        PyBuffer_Release(&view);
        return NULL;
    }
    int err = 0;
    Py_ssize_t got = 0;
    int main_thread = in_main_thread();
    PyThreadState *save = PyEval_SaveThread();
    Outcome outcome = receive(fd, (char *)view.buf, view.len, &got, start + poll_s, deadline, 0, &err, &save,
                              main_thread);
    PyEval_RestoreThread(save);
    PyBuffer_Release(&view);
    if (outcome == TIMED_OUT)
        return PyLong_FromLong(got ? STALLED : NOTHING);
    if (!raise_for(outcome, err))
        return NULL;
    return PyLong_FromLong(DONE);
}

/* recv_packet(fd, buffer, max_fds, poll_s) -> (n, fds, flags): one SEQPACKET message
 * (transport/ipc.py) and the fds that came with it, received close-on-exec. Polls without
 * sleeping for poll_s, then blocks in recvmsg, bounded by the socket's SO_RCVTIMEO: n is -1
 * when that ran out (the socket must be blocking: no Python-level timeout).
 *
 * serve_packets(fd, buffer, max_fds, poll_s, window_s, puts, plogs=None, conn=None)
 * -> (n, fds, flags, waited_s): the same for a server's connection whose MemKV puts (_kvput.c,
 * `puts` the connection's grants, or None) and MemPlog appends (_plogserve.c serve_append,
 * `plogs` the connection's grants, a dict, or None) may be answered here: each packet that is
 * such a put, or an append committed at once, is answered, and the wait goes on (polling for
 * window_s after a wait no longer than that, as BusyPoll's rule), until a packet that is
 * Python's. waited_s: how long the wait for that one took. n is -2 when an answer could not be
 * sent (the connection is done); n is -4 when an append was written that Python must commit:
 * `fds` is then append_one's tuple for it (plog/fast_append.py). An append awaiting a flush
 * (pmem) is waited for here, without the GIL (commit_wait: one flush for the appends of
 * every connection waiting), and answered, unless the wait hands it back to Python.
 *
 * call_packet(fd, request, buffer, max_fds, poll_s) -> (n, fds, flags, waited_s): a client's
 * request sent, then recv_packet's receive, in one call (no Python between the two). n is
 * -3 when the request could not be sent within SO_SNDTIMEO (a SEQPACKET message goes whole or
 * not at all: nothing was sent). */
/* _plogserve.c's serve_append and _commitgroup.c's commit_wait (memfabric._records' capsules
 * SERVE_APPEND, COMMIT_WAIT: _plogwait.h), loaded on the first serve_packets given plogs. */
static serve_append_fn serve_append;
static commit_wait_fn commit_wait;
#define SERVED_REPLY_ROOM 8192         /* an append_many's offsets too (_plogserve.c append_batch) */
#define APPEND_PENDING (-4)

PyObject *receive_packet(int fd, PyObject *buffer_obj, int max_fds, double poll_s, double window_s, Served *served,
                         double *waited, const char *request, size_t request_n) {
    if (max_fds < 0 || max_fds > 253) {
        PyErr_SetString(PyExc_ValueError, "max_fds must be 0 to 253 (SCM_MAX_FD)");
        return NULL;
    }
    Py_buffer buffer;
    if (!writable(buffer_obj, &buffer))
        return NULL;
    union {
        struct cmsghdr align;
        char space[CMSG_SPACE(253 * sizeof(int))];
    } control;
    struct iovec iov = {.iov_base = buffer.buf, .iov_len = (size_t)buffer.len};
    struct msghdr msg;
    unsigned char reply[SERVED_REPLY_ROOM > PUT_REPLY_ROOM ? SERVED_REPLY_ROOM : PUT_REPLY_ROOM];
    ssize_t n = -1;
    int err = 0, failed_signal = 0;
    double began = now_s(), poll_until = began + poll_s;
    int polled = 0, main_thread = in_main_thread();
    PyThreadState *save = PyEval_SaveThread();
    while (request != NULL) {
        ssize_t sent = send(fd, request, request_n, MSG_NOSIGNAL);
        if (sent >= 0)
            break;
        if (errno == EINTR) {
            failed_signal = handlers_raised(&save);    /* nothing was sent: the caller knows */
            if (failed_signal)
                break;
            continue;
        }
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            n = -3;
        else
            err = errno;
        break;
    }
    began = now_s();
    poll_until = began + poll_s;
    for (; request == NULL || (!failed_signal && !err && n != -3);) {
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.space;
        msg.msg_controllen = CMSG_SPACE((size_t)max_fds * sizeof(int));
        int polling = now_s() < poll_until;
        if (polled && !polling) {
            polled = 0;
            failed_signal = handlers_raised(&save);
            if (failed_signal)
                break;
        }
        n = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC | (polling ? MSG_DONTWAIT : 0));
        if (n > 0 && served != NULL && msg.msg_controllen == 0 && !(msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC))) {
            size_t reply_n = 0;
            const unsigned char *packet = (const unsigned char *)buffer.buf;
            PyEval_RestoreThread(save);
            Py_CLEAR(served->spent);
            int answered = served->puts != NULL && kv_put_serve(served->puts, packet, (size_t)n, reply, &reply_n);
            if (!answered && served->plogs != NULL && PyDict_GET_SIZE(served->plogs) > 0) {
                answered = serve_append(packet, (size_t)n, served->plogs, served->conn, reply, sizeof reply, &reply_n,
                                        &served->wait);
                if (answered < 0)
                    err = -1;                /* MemoryError, KeyboardInterrupt: raised below */
            }
            save = PyEval_SaveThread();
            if (err)
                break;
            if (answered == APPEND_WAIT) {   /* its commit awaited here, the GIL let go (group commit) */
                answered = commit_wait(&served->wait, &save);
                if (answered) {
                    served->spent = served->wait.got;
                    served->wait.got = NULL;
                }
                else
                    answered = APPEND_PYTHON;
            }
            if (answered == APPEND_PYTHON) {
                n = APPEND_PENDING;          /* Python commits it, and answers */
                break;
            }
            if (answered) {
                ssize_t sent;
                do
                    sent = send(fd, reply, reply_n, MSG_NOSIGNAL);
                while (sent < 0 && errno == EINTR);
                if (sent != (ssize_t)reply_n) {
                    n = -2;              /* timed out (SO_SNDTIMEO) or gone: the connection is done */
                    break;
                }
                double now = now_s();
                poll_until = now + (now - began <= window_s ? window_s : 0.0);
                began = now;
                continue;
            }
        }
        if (n >= 0)
            break;
        if (errno == EINTR) {
            failed_signal = handlers_raised(&save);
            if (failed_signal)
                break;
            continue;
        }
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            if (polling) {
                polled = main_thread;
                sched_yield();
                continue;
            }
            break;          /* SO_RCVTIMEO ran out: n stays -1 */
        }
        err = errno;
        break;
    }
    PyEval_RestoreThread(save);
    PyBuffer_Release(&buffer);
    if (served != NULL)
        Py_CLEAR(served->spent);
    *waited = now_s() - began;
    if (failed_signal || err == -1)
        return NULL;
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (n == APPEND_PENDING) {
        PyObject *out = Py_BuildValue("(nOi)", (Py_ssize_t)n, served->wait.got, 0);
        Py_CLEAR(served->wait.got);
        return out;
    }
    PyObject *fds = PyList_New(0);
    if (fds == NULL)
        return NULL;
    if (n >= 0) {
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
                continue;
            size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            const int *got = (const int *)CMSG_DATA(c);
            for (size_t i = 0; i < count; i++) {
                int one;
                memcpy(&one, got + i, sizeof one);
                PyObject *o = PyLong_FromLong(one);
                if (o == NULL || PyList_Append(fds, o) < 0) {
                    /* Out of memory: close this and the fds not listed yet; the caller
                       closes those it gets. */
                    Py_XDECREF(o);
                    for (size_t j = i; j < count; j++) {
                        memcpy(&one, got + j, sizeof one);
                        close(one);
                    }
                    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(fds); k++)
                        close((int)PyLong_AsLong(PyList_GET_ITEM(fds, k)));
                    Py_DECREF(fds);
                    return NULL;
                }
                Py_DECREF(o);
            }
        }
    }
    return Py_BuildValue("(nNi)", (Py_ssize_t)n, fds, n >= 0 ? msg.msg_flags : 0);
}

static PyObject *recv_packet(PyObject *Py_UNUSED(self), PyObject *args) {
    int fd, max_fds;
    PyObject *buffer_obj;
    double poll_s, waited;
    if (!PyArg_ParseTuple(args, "iOid", &fd, &buffer_obj, &max_fds, &poll_s))
        return NULL;
    return receive_packet(fd, buffer_obj, max_fds, poll_s, 0.0, NULL, &waited, NULL, 0);
}

/* receive_packet's (n, fds, flags) and how long its wait took: (n, fds, flags, waited_s). */
static PyObject *with_wait(PyObject *got, double waited) {
    if (got == NULL)
        return NULL;
    PyObject *out = Py_BuildValue("(OOOd)", PyTuple_GET_ITEM(got, 0), PyTuple_GET_ITEM(got, 1),
                                  PyTuple_GET_ITEM(got, 2), waited);
    Py_DECREF(got);
    return out;
}

static PyObject *call_packet(PyObject *Py_UNUSED(self), PyObject *args) {
    int fd, max_fds;
    PyObject *buffer_obj;
    Py_buffer request;
    double poll_s, waited = 0.0;
    if (!PyArg_ParseTuple(args, "iy*Oid", &fd, &request, &buffer_obj, &max_fds, &poll_s))
        return NULL;
    PyObject *got = receive_packet(fd, buffer_obj, max_fds, poll_s, 0.0, NULL, &waited, request.buf,
                                   (size_t)request.len);
    PyBuffer_Release(&request);
    return with_wait(got, waited);
}

static PyObject *serve_packets(PyObject *Py_UNUSED(self), PyObject *args) {
    int fd, max_fds;
    PyObject *buffer_obj, *puts, *plogs = Py_None, *conn = Py_None;
    double poll_s, window_s, waited = 0.0;
    if (!PyArg_ParseTuple(args, "iOiddO|OO", &fd, &buffer_obj, &max_fds, &poll_s, &window_s, &puts, &plogs, &conn))
        return NULL;
    if ((puts != Py_None && !PyList_Check(puts)) || (plogs != Py_None && !PyDict_Check(plogs))) {
        PyErr_SetString(PyExc_TypeError, "serve_packets: puts is a list or None, plogs a dict or None");
        return NULL;
    }
    if (plogs != Py_None && serve_append == NULL) {
        commit_wait = (commit_wait_fn)PyCapsule_Import("memfabric._records.COMMIT_WAIT", 0);
        if (commit_wait == NULL)
            return NULL;
        serve_append = (serve_append_fn)PyCapsule_Import("memfabric._records.SERVE_APPEND", 0);
        if (serve_append == NULL)
            return NULL;
    }
    Served served = {puts == Py_None ? NULL : puts, plogs == Py_None ? NULL : plogs, conn, {NULL}, NULL};
    PyObject *got = receive_packet(fd, buffer_obj, max_fds, poll_s, window_s, &served, &waited, NULL, 0);
    Py_XDECREF(served.wait.got);
    Py_XDECREF(served.spent);
    return with_wait(got, waited);
}

static PyMethodDef methods[] = {
    {"recv_packet", recv_packet, METH_VARARGS, "recv_packet(fd, buffer, max_fds, poll_s) -> (n, fds, flags)"},
    {"serve_packets", serve_packets, METH_VARARGS,
     "serve_packets(fd, buffer, max_fds, poll_s, window_s, puts, plogs=None, conn=None) -> (n, fds, flags, waited_s)"},
    {"call_packet", call_packet, METH_VARARGS,
     "call_packet(fd, request, buffer, max_fds, poll_s) -> (n, fds, flags, waited_s)"},
    {"recv_frame", recv_frame, METH_VARARGS,
     "recv_frame(fd, block, poll_s, begin_timeout_s, frame_timeout_s, into) -> LANDED|BLOCK|NOTHING|STALLED"},
    {"recv_exact", recv_exact, METH_VARARGS, "recv_exact(fd, view, poll_s, timeout_s) -> DONE|NOTHING|STALLED"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "memfabric._frames",
                                    "Receiving RPC frames, compiled (see transport/rpc.py).", -1, methods};

PyMODINIT_FUNC PyInit__frames(void) {
    PyObject *threading = PyImport_ImportModule("threading");
    if (threading == NULL)
        return NULL;
    PyObject *main = PyObject_CallMethod(threading, "main_thread", NULL);
    Py_DECREF(threading);
    if (main == NULL)
        return NULL;
    PyObject *ident = PyObject_GetAttrString(main, "ident");
    Py_DECREF(main);
    if (ident == NULL)
        return NULL;
    main_thread_ident = PyLong_AsUnsignedLong(ident);
    Py_DECREF(ident);
    if (PyErr_Occurred())
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "FIRST_BLOCK", FIRST_BLOCK) < 0 || PyModule_AddIntConstant(m, "LANDED", LANDED) < 0
            || PyModule_AddIntConstant(m, "BLOCK", BLOCK) < 0 || PyModule_AddIntConstant(m, "DONE", DONE) < 0
            || PyModule_AddIntConstant(m, "NOTHING", NOTHING) < 0 || PyModule_AddIntConstant(m, "STALLED", STALLED) < 0
            || spans_add_to_module(m) < 0 || kvget_add_to_module(m) < 0
            || kvput_add_to_module(m) < 0 || resp_add_to_module(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
