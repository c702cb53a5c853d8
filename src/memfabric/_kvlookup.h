/* A key's lookup in a MemKV index (kv/index.py), shared by the two readers that do it in C:
 * same-host clients (_native.c: probe) and the server's RPC loop (_kvget.c: remote gets
 * answered without Python). Both read the table as a seqlock: a slot's sequence (odd: being
 * written), its fields, the key and the value, then the sequence again; any change means
 * "again". Loads of the sequence are acquire loads, and a fence orders the copy before the
 * second read, so a torn copy is always caught and undone (`drop`).
 *
 * How a reader reaches a record's segment, and where the value goes, are the caller's: a
 * `KvReader` names them. Nothing here takes or needs the GIL; the callbacks may.
 */
#ifndef MEMFABRIC_KVLOOKUP_H
#define MEMFABRIC_KVLOOKUP_H

#include <stdint.h>
#include <string.h>
#include <time.h>

#define KV_HEADER_WORDS 16
#define KV_SLOT_WORDS 8
#define KV_H_MAGIC 0
#define KV_H_VERSION 1
#define KV_H_SLOTS 2
#define KV_H_MOVED 3
#define KV_H_GENERATION 6
#define KV_H_LEASE 7
#define KV_H_DRAINING 8
#define KV_VERSION 2
#define KV_W_SEQ 0
#define KV_W_HASH 1
#define KV_W_SEGMENT 2
#define KV_W_OFFSET_KLEN 3
#define KV_W_VLEN 4
#define KV_W_EXPIRY 5
#define KV_W_EXTENTS 6
#define KV_EMPTY 0
#define KV_MAGIC 0x31584449564B464DULL /* b"MFKVIDX1", little-endian */
#define KV_LOW32 0xFFFFFFFFULL
#define KV_RETRIES 64

/* Outcomes of kv_lookup. */
#define KV_FOUND 1          /* the value went to the reader's `copy` */
#define KV_MISSING 0        /* a validated miss */
#define KV_EXPIRED 2        /* there, but expired (same-host readers: a miss; the server deletes it) */
#define KV_ASK (-1)         /* this reader cannot answer (see _native.c's header) */
#define KV_TOO_SMALL (-2)   /* `copy` had no room: nothing was kept */
#define KV_AWAY (-3)        /* the index's lease ran out */
#define KV_ERROR (-4)       /* a callback failed (with an exception set, where it holds the GIL) */
#define KV_AGAIN (-5)       /* internal: the table changed under the read */
#define KV_NOT_HERE (-6)    /* internal: a validated miss in this table */

typedef struct {
    const uint64_t *words;
    uint64_t nwords;
    unsigned char *refs;          /* one byte per slot: recency for the server's eviction clock (NULL: none) */
    int64_t nrefs;
} KvTable;

typedef struct {
    /* The bytes of `segment`: 1 with base and len set, 0 when this reader cannot reach it, -1 on error. */
    int (*segment)(void *ctx, uint64_t segment, const char **base, uint64_t *len);
    /* Keep the value: KV_FOUND, KV_TOO_SMALL, KV_ASK (too large for this reader) or KV_ERROR. */
    int (*copy)(void *ctx, const char *value, uint64_t vlen);
    /* Undo the last copy: it was torn. */
    void (*drop)(void *ctx);
    void *ctx;
} KvReader;

static inline uint64_t kv_load_acquire(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint64_t kv_load_relaxed(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }

static inline uint64_t kv_ms_of(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* Expiry times are wall-clock ms (absolute, shared by hosts); leases are CLOCK_MONOTONIC ms
 * (shared by the processes of a host, blind to wall-clock changes). */
static inline uint64_t kv_now_ms(void) { return kv_ms_of(CLOCK_REALTIME); }
static inline uint64_t kv_lease_now_ms(void) { return kv_ms_of(CLOCK_MONOTONIC); }

/* One table's probe chain for a key. `draining`: the table drains into the current one, so
 * its H_MOVED is set by design and only its slots' sequences count. */
static inline int kv_probe_table(const KvTable *t, int draining, uint64_t h, const char *key, uint64_t klen,
                          const KvReader *r) {
    const uint64_t *w = t->words;
    uint64_t slots = kv_load_relaxed(&w[KV_H_SLOTS]);
    if (slots == 0 || (slots & (slots - 1)) || slots > t->nwords / KV_SLOT_WORDS ||
            KV_HEADER_WORDS + slots * KV_SLOT_WORDS > t->nwords)
        return KV_ASK;
    uint64_t mask = slots - 1, slot = h & mask;
    for (uint64_t probes = 0; probes < slots; probes++, slot = (slot + 1) & mask) {
        const uint64_t *s = w + KV_HEADER_WORDS + slot * KV_SLOT_WORDS;
        uint64_t seq = kv_load_acquire(&s[KV_W_SEQ]);
        if (seq & 1) return KV_AGAIN;
        uint64_t stored = kv_load_relaxed(&s[KV_W_HASH]);
        uint64_t segment = kv_load_relaxed(&s[KV_W_SEGMENT]), packed = kv_load_relaxed(&s[KV_W_OFFSET_KLEN]);
        uint64_t vlen = kv_load_relaxed(&s[KV_W_VLEN]), expiry = kv_load_relaxed(&s[KV_W_EXPIRY]);
        uint64_t extents = kv_load_relaxed(&s[KV_W_EXTENTS]) & KV_LOW32;
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (kv_load_relaxed(&s[KV_W_SEQ]) != seq) return KV_AGAIN;
        if (stored == KV_EMPTY) {                       /* a miss, unless the table moved on or was revoked */
            if ((!draining && kv_load_acquire(&w[KV_H_MOVED]) != 0) || kv_load_acquire(&w[KV_H_MAGIC]) != KV_MAGIC)
                return KV_AGAIN;
            return KV_NOT_HERE;
        }
        if (stored != h || (packed >> 32) != klen) continue;
        if (extents) return KV_ASK;                     /* a large value: the caller's path */
        uint64_t offset = packed & KV_LOW32;
        const char *base;
        uint64_t seglen;
        int mapped = r->segment(r->ctx, segment, &base, &seglen);
        if (mapped < 0) return KV_ERROR;
        if (mapped == 0) return KV_ASK;
        if (offset > seglen || klen > seglen - offset || vlen > seglen - offset - klen)
            return KV_AGAIN;                            /* fields of a record being replaced */
        int same = memcmp(base + offset, key, (size_t)klen) == 0;
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (kv_load_relaxed(&s[KV_W_SEQ]) != seq) return KV_AGAIN;
        if (!same) continue;
        if (expiry && expiry <= kv_now_ms()) return KV_EXPIRED;
        int kept = r->copy(r->ctx, base + offset + klen, vlen);
        if (kept != KV_FOUND) return kept;
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (kv_load_relaxed(&s[KV_W_SEQ]) != seq || (!draining && kv_load_relaxed(&w[KV_H_MOVED]) != 0) ||
                kv_load_relaxed(&w[KV_H_MAGIC]) != KV_MAGIC) {
            r->drop(r->ctx);                            /* changed while we copied: again */
            return KV_AGAIN;
        }
        if (t->refs != NULL && (int64_t)slot < t->nrefs) t->refs[slot] = 1;
        return KV_FOUND;
    }
    return KV_ASK;                                      /* probed every slot: not our table */
}

/* One lookup in the current table `t` (and `old`, the table draining into it, if given):
 * KV_FOUND, KV_MISSING, KV_EXPIRED, KV_ASK, KV_TOO_SMALL, KV_AWAY or KV_ERROR. */
static inline int kv_lookup(const KvTable *t, const KvTable *old, uint64_t h, const char *key, uint64_t klen,
                     const KvReader *r) {
    const uint64_t *w = t->words;
    for (int attempt = 0; attempt < KV_RETRIES; attempt++) {
        if (kv_load_acquire(&w[KV_H_MAGIC]) != KV_MAGIC || kv_load_acquire(&w[KV_H_VERSION]) != KV_VERSION ||
                kv_load_acquire(&w[KV_H_MOVED]) != 0)
            return KV_ASK;                              /* revoked, or followed by another: reopen it */
        if (kv_load_acquire(&w[KV_H_LEASE]) <= kv_lease_now_ms())
            return KV_AWAY;                             /* not vouched for: maybe stale */
        uint64_t draining = kv_load_acquire(&w[KV_H_DRAINING]);
        int got;
        if (draining) {
            if (old == NULL || kv_load_acquire(&old->words[KV_H_MAGIC]) != KV_MAGIC ||
                    kv_load_acquire(&old->words[KV_H_GENERATION]) != draining)
                return KV_ASK;                          /* a drain the caller does not map: reopen */
            got = kv_probe_table(old, 1, h, key, klen, r);
            if (got == KV_AGAIN) continue;
            if (got != KV_NOT_HERE) return got;
        }
        got = kv_probe_table(t, 0, h, key, klen, r);
        if (got == KV_AGAIN) continue;
        if (got == KV_NOT_HERE) return KV_MISSING;
        return got;
    }
    return KV_ASK;
}

#endif
