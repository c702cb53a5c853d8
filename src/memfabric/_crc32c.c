/* CRC-32C for memfabric._records: the checksum of every MemPlog frame (plog/record.py says what
 * a frame is). crc32c() continues a CRC over bytes; crc32c_copy() does so over bytes it copies,
 * reading each once; crc32c_of() is the Python function the tests compare both ways with.
 *
 * The CRC is the CPU's CRC32 instruction where it has one (SSE 4.2), else a table; both are
 * CRC-32C as the `crc32c` package computes it (initial and final inversion).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "_crc32c.h"

#define POLY 0x82F63B78u          /* CRC-32C, reflected */

static uint32_t table[256];
static int hardware;

static void make_table(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? (c >> 1) ^ POLY : c >> 1;
        table[i] = c;
    }
}

/* The raw CRC (no inversions) of n bytes, continued from `crc`. */
static uint32_t crc_table(uint32_t crc, const unsigned char *p, size_t n) {
    while (n--)
        crc = table[(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return crc;
}

/* Three streams at once. The crc32 instruction takes 3 cycles and can start one each cycle:
 * one stream waits on its own result, so a record's bytes are cut in three blocks whose CRCs
 * run side by side (~3x here: 400 KB went from ~50 to ~20 us), then joined. Joining uses that
 * the raw CRC is linear: CRC(c, A || B) = Z_|B|(CRC(c, A)) ^ CRC(0, B), where Z_n(c), the CRC
 * of n zero bytes from c, is a 32 x 32 bit matrix, applied here by four 256-entry tables
 * (as zlib's crc32_combine and Mark Adler's crc32c.c do). */
#define CRC_LONG 8192
#define CRC_SHORT 256
static uint32_t zeros_long[4][256], zeros_short[4][256];

static void make_zeros(uint32_t zeros[4][256], size_t n) {
    static const unsigned char nothing[CRC_LONG];
    uint32_t basis[32];                 /* Z_n of each single bit */
    for (int k = 0; k < 32; k++)
        basis[k] = crc_table(1u << k, nothing, n);
    for (int j = 0; j < 4; j++)
        for (uint32_t b = 0; b < 256; b++) {
            uint32_t v = 0;
            for (int bit = 0; bit < 8; bit++)
                if (b >> bit & 1)
                    v ^= basis[8 * j + bit];
            zeros[j][b] = v;
        }
}

static uint32_t shift_by(const uint32_t zeros[4][256], uint32_t c) {
    return zeros[0][c & 0xff] ^ zeros[1][(c >> 8) & 0xff] ^ zeros[2][(c >> 16) & 0xff] ^ zeros[3][c >> 24];
}

#if defined(__x86_64__)
__attribute__((target("sse4.2")))
static uint64_t crc_three(uint64_t c0, const unsigned char **at, size_t *left, size_t block,
                          const uint32_t zeros[4][256]) {
    const unsigned char *p = *at;
    while (*left >= 3 * block) {
        uint64_t c1 = 0, c2 = 0;
        const unsigned char *end = p + block;
        do {
            uint64_t w0, w1, w2;
            memcpy(&w0, p, 8);
            memcpy(&w1, p + block, 8);
            memcpy(&w2, p + 2 * block, 8);
            c0 = __builtin_ia32_crc32di(c0, w0);
            c1 = __builtin_ia32_crc32di(c1, w1);
            c2 = __builtin_ia32_crc32di(c2, w2);
            p += 8;
        } while (p < end);
        c0 = shift_by(zeros, (uint32_t)c0) ^ (uint32_t)c1;
        c0 = shift_by(zeros, (uint32_t)c0) ^ (uint32_t)c2;
        p += 2 * block;
        *left -= 3 * block;
    }
    *at = p;
    return c0;
}

__attribute__((target("sse4.2")))
static uint32_t crc_hardware(uint32_t crc, const unsigned char *p, size_t n) {
    uint64_t c = crc;
    c = crc_three(c, &p, &n, CRC_LONG, zeros_long);
    c = crc_three(c, &p, &n, CRC_SHORT, zeros_short);
    while (n >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        c = __builtin_ia32_crc32di(c, word);
        p += 8;
        n -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (n--)
        c32 = __builtin_ia32_crc32qi(c32, *p++);
    return c32;
}
/* The same, each word stored at `dst` too as it is read from `src` (one pass for append_batch's
 * copy and check: the CRC is that of the words stored, whatever `src` holds by then). `src` is
 * memory a client may write meanwhile: ONE_READ makes each word opaque to the compiler once
 * loaded, so it can never read it again for the store or the CRC (a race C leaves undefined). */
#define ONE_READ(x) __asm__("" : "+r"(x))
__attribute__((target("sse4.2")))
static uint64_t crc_copy_three(uint64_t c0, unsigned char **to, const unsigned char **at, size_t *left, size_t block,
                               const uint32_t zeros[4][256]) {
    const unsigned char *p = *at;
    unsigned char *d = *to;
    while (*left >= 3 * block) {
        uint64_t c1 = 0, c2 = 0;
        const unsigned char *end = p + block;
        do {
            uint64_t w0, w1, w2;
            memcpy(&w0, p, 8);
            memcpy(&w1, p + block, 8);
            memcpy(&w2, p + 2 * block, 8);
            ONE_READ(w0);
            ONE_READ(w1);
            ONE_READ(w2);
            memcpy(d, &w0, 8);
            memcpy(d + block, &w1, 8);
            memcpy(d + 2 * block, &w2, 8);
            c0 = __builtin_ia32_crc32di(c0, w0);
            c1 = __builtin_ia32_crc32di(c1, w1);
            c2 = __builtin_ia32_crc32di(c2, w2);
            p += 8;
            d += 8;
        } while (p < end);
        c0 = shift_by(zeros, (uint32_t)c0) ^ (uint32_t)c1;
        c0 = shift_by(zeros, (uint32_t)c0) ^ (uint32_t)c2;
        p += 2 * block;
        d += 2 * block;
        *left -= 3 * block;
    }
    *at = p;
    *to = d;
    return c0;
}

__attribute__((target("sse4.2")))
static uint32_t crc_copy_hardware(uint32_t crc, unsigned char *d, const unsigned char *p, size_t n) {
    uint64_t c = crc;
    c = crc_copy_three(c, &d, &p, &n, CRC_LONG, zeros_long);
    c = crc_copy_three(c, &d, &p, &n, CRC_SHORT, zeros_short);
    while (n >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        ONE_READ(word);
        memcpy(d, &word, 8);
        c = __builtin_ia32_crc32di(c, word);
        p += 8;
        d += 8;
        n -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (n--) {
        unsigned char b = *p++;
        ONE_READ(b);
        *d++ = b;
        c32 = __builtin_ia32_crc32qi(c32, b);
    }
    return c32;
}
#endif

/* crc32c(data, value) of the `crc32c` package: `value` is a CRC to continue (0 to start). */
uint32_t crc32c(uint32_t value, const unsigned char *p, size_t n) {
    uint32_t crc = ~value;
#if defined(__x86_64__)
    if (hardware)
        return ~crc_hardware(crc, p, n);
#endif
    return ~crc_table(crc, p, n);
}

uint32_t crc32c_copy(uint32_t value, unsigned char *dst, const unsigned char *src, size_t n) {
#if defined(__x86_64__)
    if (hardware)
        return ~crc_copy_hardware(~value, dst, src, n);
#endif
    memcpy(dst, src, n);
    return crc32c(value, dst, n);
}

/* crc32c_of(data, value=0, table=False): the CRC as frame_batch computes it; `table` takes the
 * table's way even where the CPU has the instruction (for the tests: both ways agree). */
PyObject *crc32c_of(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer data;
    unsigned int value = 0;
    int use_table = 0;
    if (!PyArg_ParseTuple(args, "y*|Ip", &data, &value, &use_table))
        return NULL;
    uint32_t crc = use_table ? ~crc_table(~(uint32_t)value, data.buf, (size_t)data.len)
                             : crc32c((uint32_t)value, data.buf, (size_t)data.len);
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLong(crc);
}

/* The tables, and whether the CPU has the instruction: once, before any CRC (PyInit__records). */
void crc32c_init(void) {
    make_table();
    make_zeros(zeros_long, CRC_LONG);
    make_zeros(zeros_short, CRC_SHORT);
#if defined(__x86_64__)
    __builtin_cpu_init();
    hardware = __builtin_cpu_supports("sse4.2");
#endif
}
