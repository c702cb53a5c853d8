/* CRC-32C (_crc32c.c), for memfabric._records' other files: every MemPlog frame's checksum.
 * (Functions shared between the module's files are hidden: not exported from the .so, and no
 * other library's symbol of the same name can stand in for them.) */
#ifndef MEMFABRIC_CRC32C_H
#define MEMFABRIC_CRC32C_H

#include <Python.h>
#include <stddef.h>
#include <stdint.h>

#pragma GCC visibility push(hidden)

/* The tables, and whether the CPU has the instruction: once, before any CRC (PyInit__records). */
void crc32c_init(void);

/* crc32c(data, value) of the `crc32c` package: `value` is a CRC to continue (0 to start). */
uint32_t crc32c(uint32_t value, const unsigned char *p, size_t n);

/* crc32c(value, src, n) of the bytes copied to dst: those stored, read once. */
uint32_t crc32c_copy(uint32_t value, unsigned char *dst, const unsigned char *src, size_t n);

/* Python: crc32c_of(data, value=0, table=False). */
PyObject *crc32c_of(PyObject *self, PyObject *args);

#pragma GCC visibility pop

#endif
