/* A MemPlog frame's layout (plog/record.py: a 16-byte header with a CRC-32C, the payload, zeros to
 * the next multiple of 8), for memfabric._records' files; and _framing.c's Python functions. */
#ifndef MEMFABRIC_FRAMING_H
#define MEMFABRIC_FRAMING_H

#include <Python.h>
#include <stddef.h>
#include <stdint.h>

#define HEADER_BYTES 16
#define ALIGN_BYTES 8

static inline void put32(unsigned char *at, uint32_t v) {
    for (int i = 0; i < 4; i++)
        at[i] = (unsigned char)(v >> (8 * i));
}

static inline void put64(unsigned char *at, uint64_t v) {
    for (int i = 0; i < 8; i++)
        at[i] = (unsigned char)(v >> (8 * i));
}

/* The bytes a record of `n` payload bytes takes in the log (record.py frame_bytes). */
static inline size_t frame_of(uint64_t n) {
    return HEADER_BYTES + (size_t)((n + ALIGN_BYTES - 1) / ALIGN_BYTES * ALIGN_BYTES);
}

static inline uint32_t get32(const unsigned char *at) {
    return (uint32_t)at[0] | (uint32_t)at[1] << 8 | (uint32_t)at[2] << 16 | (uint32_t)at[3] << 24;
}

#pragma GCC visibility push(hidden)       /* (the module's own: see _crc32c.h) */

/* Python: frame_batch, gather_into, lengths_total, frame_starts, buffer_lengths, read_frame
 * (their comments in _framing.c). */
PyObject *frame_batch(PyObject *self, PyObject *args);
PyObject *gather_into(PyObject *self, PyObject *args);
PyObject *lengths_total(PyObject *self, PyObject *args);
PyObject *frame_starts(PyObject *self, PyObject *args);
PyObject *buffer_lengths(PyObject *self, PyObject *args);
PyObject *read_frame(PyObject *self, PyObject *args);

#pragma GCC visibility pop

#endif
