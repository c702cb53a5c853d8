/* The little of msgpack that the compiled request paths read (_spans.c: span requests and
 * their replies; _kvget.c: remote gets and theirs): str, bin and int items read, checked
 * against the end of the bytes they are read from; a frame's prefix, ints and keys written. */
#ifndef MEMFABRIC_MSGPACK_H
#define MEMFABRIC_MSGPACK_H

#include <stdint.h>
#include <string.h>

typedef struct {
    const unsigned char *p, *end;
} Reader;

static inline int take(Reader *r, size_t n, const unsigned char **at) {
    if ((size_t)(r->end - r->p) < n)
        return 0;
    *at = r->p;
    r->p += n;
    return 1;
}

static inline uint64_t big_endian(const unsigned char *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = (v << 8) | p[i];
    return v;
}

/* A str (kind 's') or bin (kind 'b'); 0 if the next item is not one. */
static inline int read_bytes(Reader *r, int kind, const unsigned char **s, size_t *n) {
    const unsigned char *c, *len;
    if (!take(r, 1, &c))
        return 0;
    size_t size;
    if (kind == 's' && (*c & 0xe0) == 0xa0)
        size = *c & 0x1f;
    else {
        int width = kind == 's' ? (*c == 0xd9 ? 1 : *c == 0xda ? 2 : *c == 0xdb ? 4 : 0)
                                : (*c == 0xc4 ? 1 : *c == 0xc5 ? 2 : *c == 0xc6 ? 4 : 0);
        if (!width || !take(r, width, &len))
            return 0;
        size = (size_t)big_endian(len, width);
    }
    *n = size;
    return take(r, size, s);
}

/* An int: its encoding's bytes in *raw (for an id echoed back), its value if it is >= 0
 * (*negative set otherwise). 0 if the next item is not an int. */
static inline int read_int(Reader *r, const unsigned char **raw, size_t *raw_n, uint64_t *value, int *negative) {
    const unsigned char *c, *body;
    if (!take(r, 1, &c))
        return 0;
    *raw = c;
    *negative = 0;
    if (*c <= 0x7f) {
        *value = *c;
        *raw_n = 1;
        return 1;
    }
    if (*c >= 0xe0) {
        *negative = 1;
        *raw_n = 1;
        return 1;
    }
    int width = 0, is_signed = 0;
    switch (*c) {
    case 0xcc: width = 1; break;
    case 0xcd: width = 2; break;
    case 0xce: width = 4; break;
    case 0xcf: width = 8; break;
    case 0xd0: width = 1; is_signed = 1; break;
    case 0xd1: width = 2; is_signed = 1; break;
    case 0xd2: width = 4; is_signed = 1; break;
    case 0xd3: width = 8; is_signed = 1; break;
    default: return 0;
    }
    if (!take(r, width, &body))
        return 0;
    *value = big_endian(body, width);
    if (is_signed && (body[0] & 0x80))
        *negative = 1;
    *raw_n = 1 + (size_t)width;
    return 1;
}

/* An int or a float, skipped (read_field's F_NUMBER). */
static inline int skip_number(Reader *r) {
    const unsigned char *c, *body;
    if (r->p >= r->end)
        return 0;
    if (*r->p == 0xcb || *r->p == 0xca) {
        take(r, 1, &c);
        return take(r, *c == 0xcb ? 8 : 4, &body);
    }
    const unsigned char *raw;
    size_t raw_n;
    uint64_t v;
    int neg;
    return read_int(r, &raw, &raw_n, &v, &neg);
}

/* A map's or an array's header (fix form: `fix` under `fix_mask`; 16- and 32-bit forms: b16,
 * b32): its entry count. */
static inline int read_container(Reader *r, unsigned char fix, unsigned char fix_mask, unsigned char b16,
                                 unsigned char b32, size_t *count) {
    const unsigned char *c, *len;
    if (!take(r, 1, &c))
        return 0;
    if ((*c & fix_mask) == fix) {
        *count = *c & 0x0f;
        return 1;
    }
    int width = *c == b16 ? 2 : *c == b32 ? 4 : 0;
    if (!width || !take(r, width, &len))
        return 0;
    *count = (size_t)big_endian(len, width);
    return 1;
}

static inline int key_is(const unsigned char *s, size_t n, const char *name) {
    return strlen(name) == n && memcmp(s, name, n) == 0;
}

/* A request map as a compiled path takes it (read_request): its fields, and what each may hold. */
typedef enum {
    F_STR,              /* a str: at, n */
    F_BIN,              /* a bin: at, n */
    F_INT,              /* an int >= 0: value, and its encoding in at, n (an id echoed back) */
    F_IS,               /* a str, exactly `is` */
    F_FALSE,            /* false */
    F_TRUE,             /* true */
    F_NIL_OR_ZERO,      /* nil or 0 */
    F_NIL_OR_UPTO,      /* nil (value 0), or an int 1..max (value) */
    F_POSITIVE,         /* a float or an int, > 0 (NaN is not) */
    F_NUMBER,           /* a float or an int, any */
    F_ONE_BIN,          /* an array of exactly one bin: at, n */
    F_UINTS,            /* an array of 1..max ints, each 0..2**32 - 1: at its first item, n the count */
} FieldKind;

typedef struct {
    const char *name;
    FieldKind kind;
    int required;
    const char *is;                  /* F_IS */
    uint64_t max;                    /* F_NIL_OR_UPTO */
    const unsigned char *at;         /* what was read */
    size_t n;
    uint64_t value;
} Field;

static inline int read_field(Reader *r, Field *f) {
    const unsigned char *c, *body;
    int negative;
    switch (f->kind) {
    case F_STR:
        return read_bytes(r, 's', &f->at, &f->n);
    case F_BIN:
        return read_bytes(r, 'b', &f->at, &f->n);
    case F_INT:
        return read_int(r, &f->at, &f->n, &f->value, &negative) && !negative;
    case F_IS:
        return read_bytes(r, 's', &f->at, &f->n) && key_is(f->at, f->n, f->is);
    case F_FALSE:
        return take(r, 1, &c) && *c == 0xc2;
    case F_TRUE:
        return take(r, 1, &c) && *c == 0xc3;
    case F_NIL_OR_ZERO:
        return take(r, 1, &c) && (*c == 0xc0 || *c == 0x00);
    case F_NIL_OR_UPTO:
        if (r->p < r->end && *r->p == 0xc0) {
            r->p++;
            f->value = 0;
            return 1;
        }
        return read_int(r, &f->at, &f->n, &f->value, &negative) && !negative && f->value >= 1 && f->value <= f->max;
    case F_POSITIVE:
        if (r->p < r->end && (*r->p == 0xcb || *r->p == 0xca)) {
            int wide = *r->p == 0xcb;
            double d;
            take(r, 1, &c);
            if (!take(r, wide ? 8 : 4, &body))
                return 0;
            if (wide) {
                uint64_t bits = big_endian(body, 8);
                memcpy(&d, &bits, 8);
            } else {
                uint32_t bits = (uint32_t)big_endian(body, 4);
                float fl;
                memcpy(&fl, &bits, 4);
                d = fl;
            }
            return d > 0;
        }
        return read_int(r, &f->at, &f->n, &f->value, &negative) && !negative && f->value > 0;
    case F_NUMBER:
        return skip_number(r);
    case F_ONE_BIN: {
        size_t count;
        return read_container(r, 0x90, 0xf0, 0xdc, 0xdd, &count) && count == 1 && read_bytes(r, 'b', &f->at, &f->n);
    }
    case F_UINTS: {
        size_t count;
        if (!read_container(r, 0x90, 0xf0, 0xdc, 0xdd, &count) || count < 1 || count > f->max)
            return 0;
        f->at = r->p;
        f->n = count;
        for (size_t i = 0; i < count; i++) {
            size_t raw_n;
            uint64_t v;
            if (!read_int(r, &c, &raw_n, &v, &negative) || negative || v > 0xffffffffu)
                return 0;
        }
        return 1;
    }
    }
    return 0;
}

/* Whether b[0..n) is a map (any of msgpack's three headers) of `fields` (at most 32) only: each
 * at most once and as its kind says, the required ones all there, nothing after it. What each
 * held is in it. */
static inline int read_request(const unsigned char *b, size_t n, Field *fields, int count) {
    Reader r = {b, b + n};
    size_t entries;
    if (count > 32 || !read_container(&r, 0x80, 0xf0, 0xde, 0xdf, &entries) || entries > (size_t)count)
        return 0;
    uint32_t seen = 0, required = 0;
    for (int i = 0; i < count; i++)
        if (fields[i].required)
            required |= 1u << i;
    for (size_t e = 0; e < entries; e++) {
        const unsigned char *key;
        size_t key_n;
        if (!read_bytes(&r, 's', &key, &key_n))
            return 0;
        int k = 0;
        while (k < count && !key_is(key, key_n, fields[k].name))
            k++;
        if (k == count || (seen & (1u << k)) || !read_field(&r, &fields[k]))
            return 0;
        seen |= 1u << k;
    }
    return r.p == r.end && (seen & required) == required;
}


static inline void put_prefix(unsigned char *b, uint32_t head_len, uint64_t payload_len) {
    for (int i = 0; i < 4; i++)
        b[i] = (unsigned char)(head_len >> (8 * (3 - i)));
    for (int i = 0; i < 8; i++)
        b[4 + i] = (unsigned char)(payload_len >> (8 * (7 - i)));
}

static inline size_t put_uint(unsigned char *p, uint64_t v) {
    if (v <= 0x7f) {
        p[0] = (unsigned char)v;
        return 1;
    }
    int width = v <= 0xff ? 1 : v <= 0xffff ? 2 : v <= 0xffffffffu ? 4 : 8;
    p[0] = width == 1 ? 0xcc : width == 2 ? 0xcd : width == 4 ? 0xce : 0xcf;
    for (int i = 0; i < width; i++)
        p[1 + i] = (unsigned char)(v >> (8 * (width - 1 - i)));
    return 1 + (size_t)width;
}

static inline size_t put_key(unsigned char *p, const char *key) {
    size_t n = strlen(key);
    p[0] = (unsigned char)(0xa0 | n);
    memcpy(p + 1, key, n);
    return 1 + n;
}

#endif
