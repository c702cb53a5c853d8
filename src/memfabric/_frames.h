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
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "_plogwait.h"

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
/* _spans.c: all of iov[0..n) sent, without the GIL (TIMED_OUT: SO_SNDTIMEO ran out). */
Outcome send_all(int fd, struct iovec *iov, int n, size_t *sent, int *err, PyThreadState **save, int main_thread);

/* A client's compiled call (_spans.c call_span, _kvget.c call_get): its statuses beside
 * LANDED, BLOCK, NOTHING and STALLED. */
#define OK 2
#define SEND_TIMEOUT (-3)
#define SEND_STALLED (-4)
#define UNSENT (-5)
/* _spans.c: the part of a call both share: the request (iov[0..n)) sent, then the first block
 * of its reply received into `b`, its first byte within timeout_s (polling until poll_s),
 * the rest of the block within frame_timeout_s of *began (when it began). TIMED_OUT: *status
 * says where (SEND_TIMEOUT, SEND_STALLED, NOTHING, STALLED). *waited: how long the reply took
 * to come (BusyPoll's rule). Without the GIL. */
Outcome call_first_block(int fd, struct iovec *iov, int n, unsigned char *b, double poll_s, double timeout_s,
                         double frame_timeout_s, int *status, double *began, double *waited, int *err,
                         PyThreadState **save, int main_thread);

/* _kvget.c: remote MemKV gets answered in the server's loop. KvGrantsType is its grants'
 * type; kv_serve() answers the frame whose first block is `block` if it is a get those
 * grants cover: 1 answered (*outcome GOT), 1 with another *outcome (the reply's send
 * failed), 0 not ours (nothing was sent). Without the GIL. */
extern PyTypeObject KvGrantsType;
int kv_serve(PyObject *grants, int fd, const unsigned char *block, Outcome *outcome, int *err,
             PyThreadState **save, int main_thread);
int kvget_add_to_module(PyObject *module);
/* _kvget.c: a door GET (_resp.c) looked up in a grant of `grants` (a KvGrants) for (pool,
 * ns) with that secret: 1 with its RESP2 reply ($len value, or $-1) in out[0..*out_n), counted;
 * 0 when it is Python's (nothing written or counted); -1 when its reply needs more than `room`
 * (nothing written or counted: send what is in the buffer, then ask again). Without the GIL. */
int kv_door_get(PyObject *grants, const unsigned char *pool, size_t pool_n, const unsigned char *ns, size_t ns_n,
                const unsigned char *sec, size_t sec_n, const unsigned char *key, size_t key_n, unsigned char *out,
                size_t room, size_t *out_n);
/* _kvget.c: the index's key hash (xxh3 of the key, never EMPTY or TOMBSTONE), once
 * kv_hash_setup found it; and a comparison of secrets in constant time. */
int kv_hash_ready(void);
uint64_t kv_key_hash(const unsigned char *key, size_t n);
int kv_same_secret(const unsigned char *a, size_t a_n, const unsigned char *b, size_t b_n);

/* _kvput.c: same-host MemKV puts answered in the IPC loop (recv_packet's serve_packets).
 * kv_put_serve() answers the packet if it is a put the grants (a list) cover: 1 with the
 * reply in `reply` (PUT_REPLY_ROOM bytes), 0 when it is Python's. With the GIL. */
#define PUT_REPLY_ROOM 32
typedef struct {
    const unsigned char *pool, *ns, *sec, *key, *value, *id;
    size_t pool_n, ns_n, sec_n, key_n, value_n, id_n;
    uint64_t ttl_ms;             /* 0: none */
} KvPutRequest;
int kv_put_apply(PyObject *grants, const KvPutRequest *q);
/* _frames.c: what a server's receive loop answers itself (serve_packets): MemKV puts the
 * list `puts` covers, MemPlog appends the dict `plogs` covers (for connection `conn`), each
 * NULL when none. An append that Python must commit ends the loop: `wait.got` holds what
 * _records' append_one gave for it. `spent`: an append's tuple the loop answered without the
 * GIL (committed by commit_wait), released when the loop next holds it. */
typedef struct {
    PyObject *puts, *plogs, *conn;
    AppendWait wait;
    PyObject *spent;
} Served;
/* One SEQPACKET message received into `buffer_obj` (after `request` is sent, if given),
 * answering what `served` covers meanwhile (if given): (n, fds, flags), see recv_packet,
 * serve_packets and call_packet there. */
PyObject *receive_packet(int fd, PyObject *buffer_obj, int max_fds, double poll_s, double window_s, Served *served,
                         double *waited, const char *request, size_t request_n);
int kv_put_serve(PyObject *grants, const unsigned char *packet, size_t n, unsigned char *reply, size_t *reply_n);
int kvput_add_to_module(PyObject *module);
/* _resp.c: the Redis-protocol door's GET and SET (RespLoop). */
int resp_add_to_module(PyObject *module);

#endif
