/* memfabric._frames, part five: the Redis-protocol door's GET and SET, answered in compiled
 * code (kv/resp/front.py calls it for each connection).
 *
 * A door command cost some 150 us of Python on this VM (a thread per connection, the parser,
 * the command table, the KV operation through Server.serve, the reply); redis-server answers
 * one in a few. Here one call reads what a client sends and answers the GETs and SETs in it
 * itself, as long as nothing else comes:
 *   GET key        looked up in the connection's get grant (_kvget.c kv_door_get: the
 *                  seqlocked lookup same-host clients use), no GIL: $len value, or $-1;
 *   SET key value  written under the connection's put grant (_kvput.c kv_put_apply: the
 *                  compiled put, GIL held): +OK.
 * Each exactly as Redis's multibulk form carries it (`*2`/`*3`, `$len` bulks; the command
 * name in any case; the two bytes after a bulk skipped unread, as Redis does), of a key and
 * value the grants cover. Anything else (another command, options, an inline request, a
 * malformed one, a key the grants do not answer, a value too large for the buffer) stops the
 * call: the replies so far are sent, and the bytes from that command on go back to Python,
 * which answers them as it always has. Python only calls this with nothing of its own
 * pending, for an authenticated client of a one-server pool (so every key is homed here).
 *
 * resp_serve(fd, buffer, get_grants, put_grants, pool, ns, sec, pending, max_commands,
 * send_timeout_s, max_s, resp3) -> (status, rest, gets, sets), `buffer` the connection's
 * (DOOR_BUFFER_BYTES, writable), resp3 whether the client speaks RESP3 (HELLO 3, redis-py's
 * default: a miss is then `_`, every other reply here the same), send_timeout_s the bound on
 * sending one batch of replies, max_s how long the call answers what it reads (what Python
 * checked before the call, that every key is homed here, may change: a server joining the
 * pool; a read after max_s goes back to Python),
 * `pending` bytes already received to answer first (what Python's parser had left after the
 * command it answered: a pipeline goes on here, not in Python): status DOOR_PYTHON (rest: the bytes for Python, maybe partial), DOOR_CLOSED
 * (the client closed; rest: bytes it left unfinished), DOOR_IDLE (SO_RCVTIMEO ran out with
 * nothing pending), DOOR_MORE (max_commands answered, or max_s gone by: call again; rest: what
 * is pending).
 * gets and sets: the commands it answered (the door counts them). An error sending or
 * receiving (the client is gone, or reads nothing) is DOOR_CLOSED too: the commands answered
 * before it are counted all the same.
 */
#include "_frames.h"
#include <pthread.h>
#include <string.h>

/* The door's SETs take the GIL one connection at a time: waited for here first, without the
 * GIL, so at most one door thread waits for the GIL itself. With 50 connections waiting on
 * the GIL, each waiter outwaited the switch interval and asked the holder to let go, and
 * every hand-over waited for a thread to be scheduled: 40k SETs a second where one connection
 * alone did 100k. Taken before the GIL is, never while it is held. */
static pthread_mutex_t setters = PTHREAD_MUTEX_INITIALIZER;

static void take_for_sets(PyThreadState *save) {
    pthread_mutex_lock(&setters);
    PyEval_RestoreThread(save);
}

static PyThreadState *let_go_after_sets(void) {
    PyThreadState *save = PyEval_SaveThread();
    pthread_mutex_unlock(&setters);
    return save;
}

#define DOOR_PYTHON 0
#define DOOR_CLOSED 1
#define DOOR_IDLE 2
#define DOOR_MORE 3
#define DOOR_IN_BYTES (256 * 1024 + 512)     /* a 64 KiB SET pipelined a few deep, and more */
#define DOOR_OUT_BYTES (64 * 1024 + 64)      /* RESP_REPLY_BUFFER_BYTES, and one GET's reply */
#define DOOR_BUFFER_BYTES (DOOR_IN_BYTES + DOOR_OUT_BYTES)
#define DOOR_LOW_WATER_BYTES 4096               /* a command's rest this long is received whole */

/* A number of at most `max_digits` digits, then "\r\n" at p[0..]: its value and where the
 * line ends; 0 if it is not (a sign, a leading zero, anything else: Python's). -1: more bytes
 * are needed to know. */
static int line_number(const unsigned char *p, size_t n, size_t max_digits, uint64_t *value, size_t *used) {
    size_t i = 0;
    uint64_t v = 0;
    while (i < n && p[i] >= '0' && p[i] <= '9') {
        if (i == max_digits || (i == 1 && p[0] == '0'))
            return 0;
        v = v * 10 + (uint64_t)(p[i] - '0');
        i++;
    }
    if (i == n || (i + 1 == n && p[i] == '\r'))
        return -1;
    if (i == 0 || p[i] != '\r' || p[i + 1] != '\n')
        return 0;
    *value = v;
    *used = i + 2;
    return 1;
}

typedef struct {
    int argc;
    const unsigned char *arg[3];
    size_t len[3];
    size_t size;                 /* the whole command's bytes */
} Command;

/* A GET or SET at b[0..n): 1 whole (in *c), -1 not whole yet (but nothing says it is not
 * one of ours; *need: the bytes it needs at least, when known), 0 not ours. */
static int parse_command(const unsigned char *b, size_t n, Command *c, size_t *need) {
    *need = 0;
    if (n < 4)
        return n == 0 || b[0] == '*' ? -1 : 0;
    if (b[0] != '*' || (b[1] != '2' && b[1] != '3') || b[2] != '\r')
        return 0;
    if (b[3] != '\n')
        return 0;
    c->argc = b[1] - '0';
    size_t at = 4;
    for (int i = 0; i < c->argc; i++) {
        if (at >= n)
            return -1;
        if (b[at] != '$')
            return 0;
        uint64_t len;
        size_t used;
        int got = line_number(b + at + 1, n - at - 1, 10, &len, &used);
        if (got <= 0)
            return got;
        at += 1 + used;
        if (len > DOOR_IN_BYTES) {
            *need = SIZE_MAX;    /* never fits the buffer: Python's */
            return 0;
        }
        if (n - at < len + 2) {
            *need = at + (size_t)len + 2;
            return -1;
        }
        c->arg[i] = b + at;
        c->len[i] = (size_t)len;
        at += (size_t)len + 2;   /* the two bytes after a bulk: skipped unread, as Redis does */
        if (i == 0) {
            const unsigned char *name = c->arg[0];
            int get = len == 3 && (name[0] | 0x20) == 'g' && (name[1] | 0x20) == 'e' && (name[2] | 0x20) == 't';
            int set = len == 3 && (name[0] | 0x20) == 's' && (name[1] | 0x20) == 'e' && (name[2] | 0x20) == 't';
            if ((get && c->argc != 2) || (set && c->argc != 3) || (!get && !set))
                return 0;
        }
    }
    c->size = at;
    return 1;
}

/* Without the GIL: all of out[0..n) sent within timeout_s (the socket's SO_SNDTIMEO bounds
 * each wait; this, the whole: a client reading a byte now and then must not hold a thread
 * for a send() bound per byte, as kv/resp/sending.py says). */
static int send_out(int fd, const unsigned char *out, size_t n, double timeout_s, int *err) {
    size_t sent = 0;
    double deadline = now_s() + timeout_s;
    while (sent < n) {
        ssize_t k = send(fd, out + sent, n - sent, MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            *err = errno;
            return 0;
        }
        sent += (size_t)k;
        if (sent < n && now_s() > deadline) {
            *err = ETIMEDOUT;
            return 0;
        }
    }
    return 1;
}

static PyObject *resp_serve(PyObject *Py_UNUSED(self), PyObject *args) {
    int fd;
    PyObject *buffer_obj, *get_grants, *put_grants;
    Py_buffer buffer, pool, ns, sec, pending;
    Py_ssize_t max_commands;
    double send_timeout_s, max_s;
    int resp3;
    if (!PyArg_ParseTuple(args, "iOOO!s*s*y*y*nddp", &fd, &buffer_obj, &get_grants, &PyList_Type, &put_grants,
                          &pool, &ns, &sec, &pending, &max_commands, &send_timeout_s, &max_s, &resp3))
        return NULL;
    PyObject *result = NULL;
    if (!writable(buffer_obj, &buffer)) {
        PyBuffer_Release(&pending);
        PyBuffer_Release(&pool);
        PyBuffer_Release(&ns);
        PyBuffer_Release(&sec);
        return NULL;
    }
    unsigned char *in = buffer.buf, *out = in + DOOR_IN_BYTES;
    if (buffer.len < DOOR_BUFFER_BYTES || pending.len > DOOR_IN_BYTES) {
        PyErr_SetString(PyExc_ValueError, "the door's buffer is DOOR_BUFFER_BYTES, and holds what is pending");
        goto done;
    }
    size_t have = (size_t)pending.len, start = 0, out_n = 0;
    memcpy(in, pending.buf, have);
    Py_ssize_t gets = 0, sets = 0;
    int status = DOOR_PYTHON, err = 0;
    double until_s = now_s() + max_s;
    PyThreadState *save = PyEval_SaveThread();
    int holding = 0;             /* the GIL, taken for a SET and kept for the batch's next ones */
    for (;;) {
        /* Answer the whole commands pending. */
        int stop = 0;
        size_t need = 0;
        while (!stop && gets + sets < max_commands) {
            Command c;
            int got = parse_command(in + start, have - start, &c, &need);
            if (got <= 0) {
                stop = got == 0;
                break;
            }
            size_t reply_room = DOOR_OUT_BYTES - out_n;
            if (reply_room < 64 * 1024 + 32 && out_n) {          /* room for any reply first */
                if (holding) {       /* never wait for a client with the GIL */
                    save = let_go_after_sets();
                    holding = 0;
                }
                if (!send_out(fd, out, out_n, send_timeout_s, &err))
                    break;
                out_n = 0;
                reply_room = DOOR_OUT_BYTES;
            }
            size_t n = 0;
            int answered;
            if (c.argc == 2) {
                answered = kv_door_get(get_grants, pool.buf, (size_t)pool.len, ns.buf, (size_t)ns.len, sec.buf,
                                       (size_t)sec.len, c.arg[1], c.len[1], out + out_n, reply_room, &n);
            } else {
                KvPutRequest q = {pool.buf, ns.buf, sec.buf, c.arg[1], c.arg[2], NULL, (size_t)pool.len,
                                  (size_t)ns.len, (size_t)sec.len, c.len[1], c.len[2], 0, 0};
                if (!holding) {
                    take_for_sets(save);
                    holding = 1;
                }
                answered = kv_put_apply(put_grants, &q);
                if (answered) {
                    memcpy(out + out_n, "+OK\r\n", 5);
                    n = 5;
                }
            }
            if (!answered) {
                stop = 1;
                break;
            }
            if (resp3 && c.argc == 2 && n == 5 && memcmp(out + out_n, "$-1\r\n", 5) == 0) {
                memcpy(out + out_n, "_\r\n", 3);      /* RESP3's null: the only reply here that differs */
                n = 3;
            }
            out_n += n;
            start += c.size;
            if (c.argc == 2)
                gets++;
            else
                sets++;
        }
        if (holding) {               /* let go before anything waits */
            save = let_go_after_sets();
            holding = 0;
        }
        if (err)
            break;
        if (out_n) {                 /* the replies go before anything else is read or handed on */
            if (!send_out(fd, out, out_n, send_timeout_s, &err))
                break;
            out_n = 0;
        }
        if (stop) {
            status = DOOR_PYTHON;
            break;
        }
        if (gets + sets >= max_commands) {
            status = DOOR_MORE;
            break;
        }
        /* Read more: what is pending moves to the front first. */
        if (start) {
            memmove(in, in + start, have - start);
            have -= start;
            start = 0;
        }
        if (need > DOOR_IN_BYTES || have == DOOR_IN_BYTES) {
            status = DOOR_PYTHON;    /* a command larger than the buffer: Python's */
            break;
        }
        /* The rest of a large command, known long: the thread is woken once it is all here
         * (SO_RCVLOWAT; SO_RCVTIMEO still bounds the wait, and a timeout returns what came),
         * not for each piece that lands. */
        int low = need > have + DOOR_LOW_WATER_BYTES ? (int)(need - have) : 0;
        if (low)
            setsockopt(fd, SOL_SOCKET, SO_RCVLOWAT, &low, sizeof low);
        ssize_t k = recv(fd, in + have, DOOR_IN_BYTES - have, 0);
        if (low) {
            int e = errno, one = 1;
            setsockopt(fd, SOL_SOCKET, SO_RCVLOWAT, &one, sizeof one);
            errno = e;
        }
        if (k == 0) {
            status = DOOR_CLOSED;
            break;
        }
        if (k < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                status = have ? DOOR_PYTHON : DOOR_IDLE;     /* SO_RCVTIMEO: Python decides */
                break;
            }
            err = errno;
            break;
        }
        have += (size_t)k;
        if (now_s() > until_s) {
            status = DOOR_MORE;      /* answered by Python's checks again (the pool may have changed) */
            break;
        }
    }
    PyEval_RestoreThread(save);
    if (err) {                   /* the client is gone, or reads nothing: what was answered still counts */
        status = DOOR_CLOSED;
        start = have;
    }
    result = Py_BuildValue("(iy#nn)", status, (const char *)in + start, (Py_ssize_t)(have - start), gets, sets);
done:
    PyBuffer_Release(&buffer);
    PyBuffer_Release(&pending);
    PyBuffer_Release(&pool);
    PyBuffer_Release(&ns);
    PyBuffer_Release(&sec);
    return result;
}

static PyMethodDef resp_functions[] = {
    {"resp_serve", resp_serve, METH_VARARGS,
     "resp_serve(fd, buffer, get_grants, put_grants, pool, ns, sec, pending, max_commands, send_timeout_s, max_s, "
     "resp3) -> "
     "(status, rest, gets, sets)"},
    {NULL, NULL, 0, NULL},
};

int resp_add_to_module(PyObject *m) {
    if (PyModule_AddFunctions(m, resp_functions) < 0 || PyModule_AddIntConstant(m, "DOOR_PYTHON", DOOR_PYTHON) < 0
            || PyModule_AddIntConstant(m, "DOOR_CLOSED", DOOR_CLOSED) < 0
            || PyModule_AddIntConstant(m, "DOOR_IDLE", DOOR_IDLE) < 0
            || PyModule_AddIntConstant(m, "DOOR_MORE", DOOR_MORE) < 0
            || PyModule_AddIntConstant(m, "DOOR_BUFFER_BYTES", DOOR_BUFFER_BYTES) < 0)
        return -1;
    return 0;
}
