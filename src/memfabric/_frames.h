/* What the two parts of memfabric._frames share: _frames.c (receiving frames) and _spans.c
 * (BigMemory span reads and writes served and called without Python per request). */
#ifndef MEMFABRIC_FRAMES_H
#define MEMFABRIC_FRAMES_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define FIRST_BLOCK 256
#define PREFIX_BYTES 12
#define LANDED 1
#define BLOCK 0
#define DONE 0
#define NOTHING (-1)
#define STALLED (-2)
#define FOREVER (-1.0)

typedef enum { GOT, TIMED_OUT, CLOSED, FAILED, INTERRUPTED } Outcome;

double now_s(void);
int in_main_thread(void);
int handlers_raised(PyThreadState **save);
Outcome receive(int fd, char *buf, Py_ssize_t n, Py_ssize_t *got, double poll_until,
                double deadline, int one, int *err, PyThreadState **save, int main_thread);
int raise_for(Outcome outcome, int err);
int writable(PyObject *o, Py_buffer *view);

/* _spans.c: adds its type and functions to the module; -1 on failure. */
int spans_add_to_module(PyObject *module);

#endif
