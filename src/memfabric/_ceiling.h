/* _ceiling.c's one function, for _records.c's table. */
#ifndef MEMFABRIC_CEILING_H
#define MEMFABRIC_CEILING_H

#include <Python.h>

#pragma GCC visibility push(hidden)       /* (the module's own: see _crc32c.h) */

/* Python: group_commit_ceiling(fd, threads, seconds, record_bytes) -> (records, flushes). */
PyObject *group_commit_ceiling(PyObject *self, PyObject *args);

#pragma GCC visibility pop

#endif
