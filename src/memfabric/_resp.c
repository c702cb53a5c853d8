/* memfabric._frames, part five: the Redis-protocol door's GET and SET, answered in compiled
 * code (kv/resp/front.py calls it for each connection).
 *
 * A door command cost some 150 us of Python on this VM (a thread per connection, the parser,
 * the command table, the KV operation through Server.serve, the reply); redis-server answers
 * one in a few. Here the door's loop (RespLoop, below) answers the GETs and SETs a connection
 * sends itself, as long as nothing else comes:
 *   GET key        looked up in the connection's get grant (_kvget.c kv_door_get: the
 *                  seqlocked lookup same-host clients use), no GIL: $len value, or $-1;
 *   SET key value  written under the connection's put grant (_kvput.c kv_put_apply: the
 *                  compiled put, GIL held): +OK.
 * Each exactly as Redis's multibulk form carries it (`*2`/`*3`, `$len` bulks; the command
 * name in any case; the two bytes after a bulk skipped unread, as Redis does), of a key and
 * value the grants cover. Anything else (another command, options, an inline request, a
 * malformed one, a key the grants do not answer, a value too large for the buffer) hands the
 * connection back: the replies so far are sent, and the bytes from that command on go back
 * to Python, which answers them as it always has. Python only parks a connection with
 * nothing of its own pending, for an authenticated client of a one-server pool (so every key
 * is homed here).
 *
 * RespLoop(send_timeout_s): run() on a thread of its own until stop();
 * serve(fd, buffer, get_grants, put_grants, pool, ns, sec, pending, max_commands, max_s,
 * resp3) -> (status, rest, gets, sets) on the connection's thread, which waits until the loop
 * hands the connection back. `buffer` the connection's (DOOR_BUFFER_BYTES, writable), resp3
 * whether the client speaks RESP3 (HELLO 3, redis-py's default: a miss is then `_`, every
 * other reply here the same), max_s how long the loop answers what the client sends (what
 * Python checked, that every key is homed here, may change: a server joining the pool; what
 * comes after max_s goes back to Python), `pending` bytes already received to answer first
 * (what Python's parser had left after the command it answered: a pipeline goes on here, not
 * in Python). Status DOOR_PYTHON (rest: the bytes for Python, maybe partial), DOOR_CLOSED (the
 * client closed, or took no reply for send_timeout_s, or the loop stopped; rest: nothing),
 * DOOR_MORE (max_commands answered, or max_s gone by: serve again; rest: what is pending).
 * gets and sets: the commands it answered (the door counts them), however it ended.
 */
#include "_frames.h"
#include <pthread.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>

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
#define DOOR_MORE 3
#define DOOR_IN_BYTES (256 * 1024 + 512)     /* a 64 KiB SET pipelined a few deep, and more */
#define DOOR_OUT_BYTES (64 * 1024 + 64)      /* RESP_REPLY_BUFFER_BYTES, and one GET's reply */
#define DOOR_BUFFER_BYTES (DOOR_IN_BYTES + DOOR_OUT_BYTES)
#define DOOR_LOW_WATER_BYTES 4096               /* a command's rest this long is received whole */
/* Room a reply of SET or a missing GET always fits in. A GET's value may not: kv_door_get
 * says so, and the buffer is sent first (before, room for a 64 KiB reply was kept, so a
 * pipeline's replies of 100 bytes went out one send() each). */
#define SHORT_REPLY_BYTES 64

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

/* ---- the door's event loop -------------------------------------------------------------
 *
 * One thread (RespLoop.run, started by the door) waits on every connection whose GETs and SETs
 * are answered here, with epoll, and answers what each sends as it comes. A connection's own
 * Python thread parks in RespLoop.serve meanwhile, and wakes only when the loop hands the
 * connection back: a command not ours, the client gone, max_commands answered, max_s gone by.
 * Before, each connection's thread woke for each batch it was sent, and the door's SETs
 * handed the GIL from thread to thread, a scheduled wake-up each: 64 KiB SETs left the server
 * idle two thirds of the time at 17k a second (redis-server: 40k).
 *
 * The loop never waits on a client: it receives and sends with MSG_DONTWAIT; a reply the
 * client does not take at once waits for EPOLLOUT, send_timeout_s at most for each batch the
 * client takes, then the connection is handed back closed. Nothing more is read from that
 * client meanwhile, as the door's Python path does too: what a client holds here is bounded
 * by its buffer (Redis reads on into an output buffer, up to its limit, so a client that
 * sends a pipeline of millions before reading any reply gets them from Redis, not here). */

#define WAIT_IN 0                /* advance(): wait until the client sends */
#define WAIT_OUT 1               /* wait until the client takes the replies */
#define HANDED 2                 /* handed back (p->status says how) */
#define HOLDING 3                /* replies to send when the loop's round of reads is done */

typedef struct Parked {
    int fd, resp3, interest, low, done, status, err;
    unsigned char *in, *out;
    size_t have, start, out_n, out_sent, need;
    PyObject *get_grants, *put_grants;           /* the caller's, kept alive by its call */
    const unsigned char *pool, *ns, *sec;
    size_t pool_n, ns_n, sec_n;
    Py_ssize_t gets, sets, max_commands;
    double until_s, send_deadline_s;             /* send_deadline_s: 0 unless waiting to send */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct Parked *prev, *next;                  /* the loop's list (stop and send deadlines) */
} Parked;

typedef struct {
    PyObject_HEAD
    int epfd, wakefd;
    double send_timeout_s;
    pthread_mutex_t mu;                          /* the list, stopping */
    Parked *head;
    int stopping, stopped, running;
} RespLoop;

/* What the client has not taken of the replies, sent as far as it takes now: 1 all sent, 0
 * not all (EAGAIN), -1 failed (p->err). */
static int flush_out(Parked *p) {
    while (p->out_sent < p->out_n) {
        ssize_t k = send(p->fd, p->out + p->out_sent, p->out_n - p->out_sent, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            p->err = errno;
            return -1;
        }
        p->out_sent += (size_t)k;
    }
    p->out_n = p->out_sent = 0;
    p->send_deadline_s = 0;      /* taken whole: the next replies have send_timeout_s of their own */
    return 1;
}

/* The whole commands pending, answered into the reply buffer (the GIL taken for SETs and let
 * go after them): 1 answered some, 0 none; *stop: the next is not ours. Stops when the reply
 * buffer may not hold the next reply. */
static int answer(Parked *p, PyThreadState **save, int *stop) {
    int holding = 0, answered = 0;
    *stop = 0;
    while (p->gets + p->sets < p->max_commands) {
        Command c;
        int got = parse_command(p->in + p->start, p->have - p->start, &c, &p->need);
        if (got <= 0) {
            *stop = got == 0;
            break;
        }
        size_t room = DOOR_OUT_BYTES - p->out_n;
        if (room < SHORT_REPLY_BYTES && p->out_n)
            break;               /* sent first */
        size_t n = 0;
        int done;
        if (c.argc == 2) {
            done = kv_door_get(p->get_grants, p->pool, p->pool_n, p->ns, p->ns_n, p->sec, p->sec_n, c.arg[1],
                               c.len[1], p->out + p->out_n, room, &n);
        } else {
            KvPutRequest q = {p->pool, p->ns, p->sec, c.arg[1], c.arg[2], NULL, p->pool_n, p->ns_n, p->sec_n,
                              c.len[1], c.len[2], 0, 0};
            if (!holding) {
                take_for_sets(*save);
                holding = 1;
            }
            done = kv_put_apply(p->put_grants, &q);
            if (done) {
                memcpy(p->out + p->out_n, "+OK\r\n", 5);
                n = 5;
            }
        }
        if (done < 0 && p->out_n)
            break;               /* its reply after what the buffer holds is sent */
        if (done <= 0) {
            *stop = 1;
            break;
        }
        if (p->resp3 && c.argc == 2 && n == 5 && memcmp(p->out + p->out_n, "$-1\r\n", 5) == 0) {
            memcpy(p->out + p->out_n, "_\r\n", 3);     /* RESP3's null: the only reply here that differs */
            n = 3;
        }
        p->out_n += n;
        p->start += c.size;
        if (c.argc == 2)
            p->gets++;
        else
            p->sets++;
        answered = 1;
    }
    if (holding)
        *save = let_go_after_sets();
    return answered;
}

/* Everything the connection can go on with now, without waiting: replies sent, whole
 * commands answered, and (may_read) one receive. WAIT_IN, WAIT_OUT, or HANDED with
 * p->status; or (hold_replies) HOLDING: replies to send before anything else, which the
 * loop sends once it has read from every connection that was ready. Each send wakes the
 * client, which then took the loop's CPU in the middle of its round (95% of the loop's
 * context switches were in send()); Redis too writes its replies after its reads. */
static int advance(Parked *p, PyThreadState **save, int may_read, int hold_replies) {
    for (;;) {
        if (p->out_n) {
            if (hold_replies)
                return HOLDING;
            int sent = flush_out(p);
            if (sent < 0) {
                p->status = DOOR_CLOSED;
                return HANDED;
            }
            if (sent == 0)
                return WAIT_OUT;
        }
        int stop;
        if (answer(p, save, &stop))
            continue;            /* its replies go before anything else is read or handed on */
        if (stop) {
            p->status = DOOR_PYTHON;
            return HANDED;
        }
        if (p->gets + p->sets >= p->max_commands) {
            p->status = DOOR_MORE;
            return HANDED;
        }
        if (p->start) {          /* what is pending moves to the front */
            memmove(p->in, p->in + p->start, p->have - p->start);
            p->have -= p->start;
            p->start = 0;
        }
        if (p->need > DOOR_IN_BYTES || p->have == DOOR_IN_BYTES) {
            p->status = DOOR_PYTHON;      /* a command larger than the buffer: Python's */
            return HANDED;
        }
        /* The rest of a large command, known long: the loop hears of it once it is all here
         * (SO_RCVLOWAT, which epoll follows), not for each piece that lands. */
        int low = p->need > p->have + DOOR_LOW_WATER_BYTES ? (int)(p->need - p->have) : 0;
        if (low != p->low) {
            int value = low ? low : 1;
            setsockopt(p->fd, SOL_SOCKET, SO_RCVLOWAT, &value, sizeof value);
            p->low = low;
        }
        if (!may_read)
            return WAIT_IN;
        may_read = 0;            /* one receive a turn: the other connections' come next */
        ssize_t k;
        do
            k = recv(p->fd, p->in + p->have, DOOR_IN_BYTES - p->have, MSG_DONTWAIT);
        while (k < 0 && errno == EINTR);
        if (k == 0) {
            p->status = DOOR_CLOSED;
            return HANDED;
        }
        if (k < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return WAIT_IN;
            p->err = errno;
            p->status = DOOR_CLOSED;
            return HANDED;
        }
        p->have += (size_t)k;
        if (now_s() > p->until_s) {
            p->status = DOOR_MORE;        /* answered once Python has checked the pool again */
            return HANDED;
        }
    }
}

static void unlink_parked(RespLoop *loop, Parked *p) {
    if (p->prev)
        p->prev->next = p->next;
    else
        loop->head = p->next;
    if (p->next)
        p->next->prev = p->prev;
    p->prev = p->next = NULL;
}

/* In the loop, p out of the list: the connection goes back to its thread (p is the caller's,
 * on its stack: not touched after). */
static void release_parked(RespLoop *loop, Parked *p) {
    epoll_ctl(loop->epfd, EPOLL_CTL_DEL, p->fd, NULL);
    if (p->low) {
        int one = 1;
        setsockopt(p->fd, SOL_SOCKET, SO_RCVLOWAT, &one, sizeof one);
        p->low = 0;
    }
    pthread_mutex_lock(&p->mu);
    p->done = 1;
    pthread_cond_signal(&p->cv);
    pthread_mutex_unlock(&p->mu);
}

static void hand_back(RespLoop *loop, Parked *p) {
    pthread_mutex_lock(&loop->mu);
    unlink_parked(loop, p);
    pthread_mutex_unlock(&loop->mu);
    release_parked(loop, p);
}

/* In the loop: after advance(), wait for what it waits for. */
static void follow(RespLoop *loop, Parked *p, int next) {
    if (next == HANDED) {
        hand_back(loop, p);
        return;
    }
    int want = next == WAIT_OUT ? EPOLLOUT : EPOLLIN;
    if (next == WAIT_OUT && p->send_deadline_s == 0)
        p->send_deadline_s = now_s() + loop->send_timeout_s;
    else if (next == WAIT_IN)
        p->send_deadline_s = 0;
    if (want != p->interest) {
        struct epoll_event ev = {.events = (uint32_t)want, .data.ptr = p};
        if (epoll_ctl(loop->epfd, EPOLL_CTL_MOD, p->fd, &ev) < 0) {
            p->err = errno;
            p->status = DOOR_CLOSED;
            hand_back(loop, p);
            return;
        }
        p->interest = want;
    }
}

#define LOOP_EVENTS 256
#define LOOP_TICK_MS 100         /* how often send deadlines are looked at, when any runs */

static PyObject *loop_run(RespLoop *loop, PyObject *Py_UNUSED(ignored)) {
    pthread_mutex_lock(&loop->mu);
    int already = loop->running || loop->stopped;
    loop->running = 1;
    pthread_mutex_unlock(&loop->mu);
    if (already) {
        PyErr_SetString(PyExc_RuntimeError, "the door's loop runs once");
        return NULL;
    }
    struct epoll_event events[LOOP_EVENTS];
    Parked *holding[LOOP_EVENTS];
    PyThreadState *save = PyEval_SaveThread();
    for (;;) {
        int n = epoll_wait(loop->epfd, events, LOOP_EVENTS, LOOP_TICK_MS);
        int stopping = 0, held = 0;
        for (int i = 0; i < n; i++) {
            Parked *p = events[i].data.ptr;
            if (p == NULL) {
                uint64_t v;
                (void)!read(loop->wakefd, &v, sizeof v);
                stopping = 1;
                continue;
            }
            int next = advance(p, &save, p->interest == EPOLLIN, 1);
            if (next == HOLDING)
                holding[held++] = p;
            else
                follow(loop, p, next);
        }
        for (int i = 0; i < held; i++)      /* the round's replies, then whatever comes next */
            follow(loop, holding[i], advance(holding[i], &save, 0, 0));
        /* Clients that have not taken their replies within send_timeout_s are handed back
         * closed; at a stop, every connection is (and none is taken after). */
        Parked *expired = NULL;
        double now = now_s();
        pthread_mutex_lock(&loop->mu);
        stopping |= loop->stopping;
        for (Parked *p = loop->head, *next; p != NULL; p = next) {
            next = p->next;
            if (stopping || (p->send_deadline_s && now > p->send_deadline_s)) {
                unlink_parked(loop, p);
                p->next = expired;
                expired = p;
            }
        }
        pthread_mutex_unlock(&loop->mu);
        for (Parked *p = expired, *next; p != NULL; p = next) {
            next = p->next;
            p->err = stopping ? 0 : ETIMEDOUT;
            p->status = DOOR_CLOSED;
            release_parked(loop, p);
        }
        if (stopping)
            break;
    }
    pthread_mutex_lock(&loop->mu);
    loop->stopped = 1;
    loop->running = 0;
    pthread_mutex_unlock(&loop->mu);
    PyEval_RestoreThread(save);
    Py_RETURN_NONE;
}

static PyObject *loop_stop(RespLoop *loop, PyObject *Py_UNUSED(ignored)) {
    Parked *idle = NULL;         /* parked with no loop running to hand them back: done here */
    pthread_mutex_lock(&loop->mu);
    loop->stopping = 1;
    if (!loop->running) {
        loop->stopped = 1;
        idle = loop->head;
        loop->head = NULL;
    }
    pthread_mutex_unlock(&loop->mu);
    for (Parked *p = idle, *next; p != NULL; p = next) {
        next = p->next;
        p->status = DOOR_CLOSED;
        release_parked(loop, p);
    }
    uint64_t one = 1;
    (void)!write(loop->wakefd, &one, sizeof one);
    Py_RETURN_NONE;
}

static PyObject *loop_serve(RespLoop *loop, PyObject *args) {
    int fd;
    PyObject *buffer_obj, *get_grants, *put_grants;
    Py_buffer buffer, pool, ns, sec, pending;
    Py_ssize_t max_commands;
    double max_s;
    int resp3;
    if (!PyArg_ParseTuple(args, "iOOO!s*s*y*y*ndp", &fd, &buffer_obj, &get_grants, &PyList_Type, &put_grants, &pool,
                          &ns, &sec, &pending, &max_commands, &max_s, &resp3))
        return NULL;
    PyObject *result = NULL;
    if (!writable(buffer_obj, &buffer)) {
        PyBuffer_Release(&pending);
        PyBuffer_Release(&pool);
        PyBuffer_Release(&ns);
        PyBuffer_Release(&sec);
        return NULL;
    }
    if (buffer.len < DOOR_BUFFER_BYTES || pending.len > DOOR_IN_BYTES || max_commands < 1) {
        PyErr_SetString(PyExc_ValueError, "the door's buffer is DOOR_BUFFER_BYTES, and holds what is pending");
        goto done;
    }
    Parked p = {0};
    p.fd = fd;
    p.resp3 = resp3;
    p.in = buffer.buf;
    p.out = p.in + DOOR_IN_BYTES;
    p.have = (size_t)pending.len;
    memcpy(p.in, pending.buf, p.have);
    p.get_grants = get_grants;
    p.put_grants = put_grants;
    p.pool = pool.buf;
    p.ns = ns.buf;
    p.sec = sec.buf;
    p.pool_n = (size_t)pool.len;
    p.ns_n = (size_t)ns.len;
    p.sec_n = (size_t)sec.len;
    p.max_commands = max_commands;
    p.until_s = now_s() + max_s;
    pthread_mutex_init(&p.mu, NULL);
    pthread_cond_init(&p.cv, NULL);
    PyThreadState *save = PyEval_SaveThread();
    /* What is pending first, here; then the loop takes the connection until it hands it back. */
    int next = advance(&p, &save, 1, 0);
    if (next != HANDED) {
        p.interest = next == WAIT_OUT ? EPOLLOUT : EPOLLIN;
        p.send_deadline_s = next == WAIT_OUT ? now_s() + loop->send_timeout_s : 0;
        struct epoll_event ev = {.events = (uint32_t)p.interest, .data.ptr = &p};
        /* Listed and watched at once: a stop's sweep of the list finds every connection the
         * loop may hear of. */
        pthread_mutex_lock(&loop->mu);
        int parked = 0;
        if (loop->stopping || loop->stopped) {
            p.status = DOOR_CLOSED;
        } else {
            p.next = loop->head;
            if (loop->head)
                loop->head->prev = &p;
            loop->head = &p;
            if (epoll_ctl(loop->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
                p.err = errno;
                p.status = DOOR_CLOSED;
                unlink_parked(loop, &p);
            } else {
                parked = 1;
            }
        }
        pthread_mutex_unlock(&loop->mu);
        if (parked) {
            /* The loop has it now (and may have handed it back already): wait for that. */
            pthread_mutex_lock(&p.mu);
            while (!p.done)
                pthread_cond_wait(&p.cv, &p.mu);
            pthread_mutex_unlock(&p.mu);
        }
    }
    /* Never parked (or parked and released: p.low is 0): what advance() set here goes, handed
     * back at once too. A mark left set hid the client's next commands from the loop's epoll
     * for good (the next serve starts at p.low 0 and never sets it back). */
    if (p.low) {
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_RCVLOWAT, &one, sizeof one);
    }
    PyEval_RestoreThread(save);
    pthread_cond_destroy(&p.cv);
    pthread_mutex_destroy(&p.mu);
    if (p.status == DOOR_CLOSED)   /* the client is gone, or takes nothing: what was answered still counts */
        p.start = p.have;
    result = Py_BuildValue("(iy#nn)", p.status, (const char *)p.in + p.start, (Py_ssize_t)(p.have - p.start),
                           p.gets, p.sets);
done:
    PyBuffer_Release(&buffer);
    PyBuffer_Release(&pending);
    PyBuffer_Release(&pool);
    PyBuffer_Release(&ns);
    PyBuffer_Release(&sec);
    return result;
}

static PyObject *loop_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    double send_timeout_s;
    static char *names[] = {"send_timeout_s", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "d", names, &send_timeout_s))
        return NULL;
    RespLoop *loop = (RespLoop *)type->tp_alloc(type, 0);
    if (loop == NULL)
        return NULL;
    loop->epfd = loop->wakefd = -1;
    loop->send_timeout_s = send_timeout_s;
    pthread_mutex_init(&loop->mu, NULL);
    loop->epfd = epoll_create1(EPOLL_CLOEXEC);
    loop->wakefd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    if (loop->epfd < 0 || loop->wakefd < 0 || epoll_ctl(loop->epfd, EPOLL_CTL_ADD, loop->wakefd, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(loop);
        return NULL;
    }
    return (PyObject *)loop;
}

static void loop_dealloc(RespLoop *loop) {
    /* Only once stopped (the door holds it until its thread ends): nothing is parked. */
    if (loop->epfd >= 0)
        close(loop->epfd);
    if (loop->wakefd >= 0)
        close(loop->wakefd);
    pthread_mutex_destroy(&loop->mu);
    Py_TYPE(loop)->tp_free((PyObject *)loop);
}

static PyMethodDef loop_methods[] = {
    {"run", (PyCFunction)loop_run, METH_NOARGS, "run() -> None: the loop, on its thread, until stop()"},
    {"stop", (PyCFunction)loop_stop, METH_NOARGS, "stop(): run() hands every connection back closed and returns"},
    {"serve", (PyCFunction)loop_serve, METH_VARARGS,
     "serve(fd, buffer, get_grants, put_grants, pool, ns, sec, pending, max_commands, max_s, resp3) -> "
     "(status, rest, gets, sets)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RespLoopType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "memfabric._frames.RespLoop",
    .tp_basicsize = sizeof(RespLoop),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The Redis-protocol door's event loop: GETs and SETs of every parked connection (_resp.c)",
    .tp_new = loop_new,
    .tp_dealloc = (destructor)loop_dealloc,
    .tp_methods = loop_methods,
};

int resp_add_to_module(PyObject *m) {
    if (PyType_Ready(&RespLoopType) < 0)
        return -1;
    Py_INCREF(&RespLoopType);
    if (PyModule_AddObject(m, "RespLoop", (PyObject *)&RespLoopType) < 0) {
        Py_DECREF(&RespLoopType);
        return -1;
    }
    if (PyModule_AddIntConstant(m, "DOOR_PYTHON", DOOR_PYTHON) < 0
            || PyModule_AddIntConstant(m, "DOOR_CLOSED", DOOR_CLOSED) < 0
            || PyModule_AddIntConstant(m, "DOOR_MORE", DOOR_MORE) < 0
            || PyModule_AddIntConstant(m, "DOOR_BUFFER_BYTES", DOOR_BUFFER_BYTES) < 0)
        return -1;
    return 0;
}
