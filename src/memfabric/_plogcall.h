/* A same-host plog call's request sent and its reply read (_plogcall.c): what a client's
 * call_append and a home's forward_served (_plogforward.c) share. */
#ifndef MEMFABRIC_PLOGCALL_H
#define MEMFABRIC_PLOGCALL_H

#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

/* call_append's statuses (see its comment in _plogcall.c); module constants of the same names. */
#define CALL_OK 0
#define CALL_REPLY 1
#define CALL_UNSENT 2
#define CALL_TIMEOUT 3
#define CALL_CLOSED 4
#define CALL_BAD 5

static inline void put_be64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * (7 - i)));
}

#pragma GCC visibility push(hidden)       /* (the module's own: see _crc32c.h) */

/* The request in `out` sent as one SEQPACKET message and its reply received into `buffer`, the
 * GIL let go meanwhile: a CALL_ status, or -1 (*err_out or *interrupted_out set). */
int exchange(int fd, struct iovec *out, int out_n, Py_buffer *buffer, double poll_s,
             unsigned long long request_id, uint64_t *value, double *waited_s, int *err_out,
             int *interrupted_out);

/* A msgpack bin's header for n bytes (bin 8, 16 or 32): its length. */
size_t bin_header(unsigned char bin[5], uint64_t n);

/* A request's last two entries, "budget_s" and "id": their length (at most 32). */
size_t request_tail(unsigned char tail[32], double budget_s, uint64_t request_id);

/* Python: call_append(fd, head, record, budget_s, request_id, buffer, poll_s). */
PyObject *call_append(PyObject *self, PyObject *args);

#pragma GCC visibility pop

#endif
