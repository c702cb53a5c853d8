/* MemPlog frames for memfabric._records (plog/record.py says what a frame is: a 16-byte header
 * with a CRC-32C, the payload, zeros to the next multiple of 8): a batch of records framed in one
 * call, a batch's arithmetic, and a same-host reader's record checked in one call.
 *
 * In Python each record costs about 1.4 us beyond its CRC (slices, packs, list appends): 140 us
 * for a batch of 100, more than the rest of its append. Here the batch becomes one buffer of
 * frames, ready to write, for the cost of its CRCs and one copy.
 *
 * frame_batch(nonce, first_index, data, lengths, into=None) -> bytes | int: the frames of records
 * first_index, first_index + 1, ... whose payloads lie back to back in `data` with these
 * `lengths`; the same bytes as b"".join(record.frames(...)) (tests/plog/test_record.py compares
 * them). Into `into` (a writable buffer; the frames' length returned) when given: a buffer kept
 * for the next batch, not 400 KB of new pages to fault in for each. Each payload is copied
 * first, then its CRC computed over the copy: `data` may be memory a client writes at will (its
 * shared stage), and a frame's CRC is always that of the bytes in the frame.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "_crc32c.h"
#include "_framing.h"

PyObject *frame_batch(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *nonce_obj, *first_obj, *lengths, *into_obj = Py_None;
    Py_buffer data, into = {0};
    if (!PyArg_ParseTuple(args, "OOy*O!|O", &nonce_obj, &first_obj, &data, &PyList_Type, &lengths, &into_obj))
        return NULL;
    /* Not "K": it wraps -1 or 2**64 round to a number without a word, where record.frames
     * refuses them (struct.error); here an OverflowError, and a TypeError for a non-int. */
    unsigned long long nonce = PyLong_Check(nonce_obj) ? PyLong_AsUnsignedLongLong(nonce_obj) : (unsigned long long)-1;
    if (nonce == (unsigned long long)-1 && (PyErr_Occurred() || !PyLong_Check(nonce_obj))) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "nonce: an int from 0 to 2**64 - 1");
        PyBuffer_Release(&data);
        return NULL;
    }
    unsigned long long first_index = PyLong_Check(first_obj) ? PyLong_AsUnsignedLongLong(first_obj) : (unsigned long long)-1;
    if (first_index == (unsigned long long)-1 && (PyErr_Occurred() || !PyLong_Check(first_obj))) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "first_index: an int from 0 to 2**64 - 1");
        PyBuffer_Release(&data);
        return NULL;
    }
    PyObject *out = NULL;
    Py_ssize_t count = PyList_GET_SIZE(lengths);
    size_t *sizes = PyMem_Malloc(sizeof(size_t) * (size_t)(count ? count : 1));
    if (sizes == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    size_t total = 0, payload_total = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PyList_GET_ITEM(lengths, i);
        Py_ssize_t n = PyLong_Check(item) ? PyLong_AsSsize_t(item) : -1;
        if (n < 0 || n > UINT32_MAX) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "lengths are whole numbers of bytes, below 2**32");
            goto done;
        }
        sizes[i] = (size_t)n;
        payload_total += (size_t)n;
        total += HEADER_BYTES + ((size_t)n + ALIGN_BYTES - 1) / ALIGN_BYTES * ALIGN_BYTES;
    }
    if (payload_total != (size_t)data.len) {
        PyErr_SetString(PyExc_ValueError, "the lengths do not add up to the data's length");
        goto done;
    }
    unsigned char *at;
    if (into_obj != Py_None) {
        if (PyObject_GetBuffer(into_obj, &into, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
            goto done;
        if ((size_t)into.len < total) {
            PyErr_SetString(PyExc_ValueError, "the frames do not fit the buffer given");
            goto done;
        }
        at = into.buf;
    } else {
        if ((out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total)) == NULL)
            goto done;
        at = (unsigned char *)PyBytes_AS_STRING(out);
    }
    const unsigned char *payload = (const unsigned char *)data.buf;
    for (Py_ssize_t i = 0; i < count; i++) {
        size_t n = sizes[i];
        uint64_t index = first_index + (uint64_t)i;
        unsigned char seed[20];             /* nonce, index, length: what the CRC starts from */
        put64(seed, nonce);
        put64(seed + 8, index);
        put32(seed + 16, (uint32_t)n);
        memcpy(at + HEADER_BYTES, payload, n);                 /* copied, then checked: see above */
        uint32_t crc = crc32c(crc32c(0, seed, sizeof seed), at + HEADER_BYTES, n);
        memcpy(at, "PLG1", 4);
        put32(at + 4, (uint32_t)n);
        put32(at + 8, (uint32_t)(index & 0xFFFFFFFFu));
        put32(at + 12, crc);
        size_t padded = (n + ALIGN_BYTES - 1) / ALIGN_BYTES * ALIGN_BYTES;
        memset(at + HEADER_BYTES + n, 0, padded - n);
        at += HEADER_BYTES + padded;
        payload += n;
    }
    if (into.buf != NULL)
        out = PyLong_FromSize_t(total);
done:
    PyMem_Free(sizes);
    PyBuffer_Release(&data);
    if (into.buf != NULL)
        PyBuffer_Release(&into);
    return out;
}

/* gather_into(dst, parts, lengths=None) -> int: the buffers of the list `parts` copied back to
 * back into the writable `dst` (what fits is checked first: nothing is copied if they do not);
 * their length. With `lengths` (a list of ints, one a part), each part must be that long, or
 * nothing is copied (ValueError): a record resized since it was measured. A client's
 * append_many fills its shared stage so: a Python slice assignment per record cost 0.4 us,
 * 40 us for a batch of 100. */
PyObject *gather_into(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *dst_obj, *parts, *lengths = Py_None;
    if (!PyArg_ParseTuple(args, "OO!|O", &dst_obj, &PyList_Type, &parts, &lengths))
        return NULL;
    if (lengths != Py_None && (!PyList_Check(lengths) || PyList_GET_SIZE(lengths) != PyList_GET_SIZE(parts))) {
        PyErr_SetString(PyExc_ValueError, "gather_into: lengths is a list of one int a part");
        return NULL;
    }
    Py_buffer dst;
    if (PyObject_GetBuffer(dst_obj, &dst, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    PyObject *out = NULL;
    Py_ssize_t count = PyList_GET_SIZE(parts), got = 0;
    Py_buffer *views = PyMem_Calloc((size_t)(count ? count : 1), sizeof(Py_buffer));
    if (views == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    size_t total = 0;
    for (; got < count; got++) {
        if (PyObject_GetBuffer(PyList_GET_ITEM(parts, got), &views[got], PyBUF_C_CONTIGUOUS) < 0)
            goto done;
        total += (size_t)views[got].len;
        if (lengths != Py_None) {
            Py_ssize_t want = PyLong_AsSsize_t(PyList_GET_ITEM(lengths, got));
            if (want != views[got].len) {
                got++;
                if (!PyErr_Occurred())
                    PyErr_Format(PyExc_ValueError, "part %zd is %zd bytes, not %zd", got - 1, views[got - 1].len, want);
                goto done;
            }
        }
    }
    if (total > (size_t)dst.len) {
        PyErr_SetString(PyExc_ValueError, "the parts do not fit the buffer given");
        goto done;
    }
    unsigned char *at = dst.buf;
    for (Py_ssize_t i = 0; i < count; i++) {
        memcpy(at, views[i].buf, (size_t)views[i].len);
        at += views[i].len;
    }
    out = PyLong_FromSize_t(total);
done:
    for (Py_ssize_t i = 0; i < got; i++)
        PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    PyBuffer_Release(&dst);
    return out;
}

/* ---- a batch's arithmetic, one call instead of a Python loop per record --------------------- */

/* lengths_total(lengths, most) -> int: the sum of a list of record lengths, each an int from 0
 * to `most`; -1 when one is not (Python then says which, and why). */
PyObject *lengths_total(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *lengths;
    long long most;
    if (!PyArg_ParseTuple(args, "O!L", &PyList_Type, &lengths, &most))
        return NULL;
    long long total = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(lengths); i++) {
        PyObject *item = PyList_GET_ITEM(lengths, i);
        if (!PyLong_CheckExact(item))
            return PyLong_FromLong(-1);
        long long n = PyLong_AsLongLong(item);
        if (n == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            return PyLong_FromLong(-1);
        }
        if (n < 0 || n > most)
            return PyLong_FromLong(-1);
        total += n;
    }
    return PyLong_FromLongLong(total);
}

/* frame_starts(at, lengths) -> (starts, end): where the frames of records of these lengths
 * (ints of 0 to 2**32 - 1: lengths_total checked them) begin, the first at `at`, and where the
 * last ends (record.frame_bytes: header, payload, padding to 8). */
PyObject *frame_starts(PyObject *Py_UNUSED(self), PyObject *args) {
    unsigned long long at;
    PyObject *lengths;
    if (!PyArg_ParseTuple(args, "KO!", &at, &PyList_Type, &lengths))
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(lengths);
    PyObject *starts = PyList_New(count);
    if (starts == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < count; i++) {
        unsigned long long n = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(lengths, i));
        PyObject *start = n == (unsigned long long)-1 && PyErr_Occurred() ? NULL : PyLong_FromUnsignedLongLong(at);
        if (start == NULL || n > UINT32_MAX) {
            if (start != NULL)
                PyErr_SetString(PyExc_ValueError, "a record's length is below 2**32");
            Py_XDECREF(start);
            Py_DECREF(starts);
            return NULL;
        }
        PyList_SET_ITEM(starts, i, start);
        at += HEADER_BYTES + (n + ALIGN_BYTES - 1) / ALIGN_BYTES * ALIGN_BYTES;
    }
    return Py_BuildValue("(NK)", starts, at);
}

/* buffer_lengths(parts) -> list[int] | None: the length in bytes of each part (a list), when
 * every one is a C-contiguous buffer; None when one is not (Python's as_bytes_view then takes
 * them one by one, and says what is wrong). */
PyObject *buffer_lengths(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *parts;
    if (!PyArg_ParseTuple(args, "O!", &PyList_Type, &parts))
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(parts);
    PyObject *out = PyList_New(count);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *part = PyList_GET_ITEM(parts, i), *n;
        if (PyBytes_CheckExact(part)) {
            n = PyLong_FromSsize_t(PyBytes_GET_SIZE(part));
        } else {
            Py_buffer view;
            if (PyObject_GetBuffer(part, &view, PyBUF_C_CONTIGUOUS) < 0) {
                Py_DECREF(out);
                if (PyErr_ExceptionMatches(PyExc_MemoryError))
                    return NULL;
                PyErr_Clear();
                Py_RETURN_NONE;
            }
            n = PyLong_FromSsize_t(view.len);
            PyBuffer_Release(&view);
        }
        if (n == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, n);
    }
    return out;
}

/* ---- read_frame: a same-host reader's record, from its own mapping of the log ----------------
 *
 * read_frame(view, at, length, nonce, index) -> bytes | None: the payload of record `index`
 * whose frame starts at `at` in `view` (plog/client.py _local_record: a mapped segment), when
 * its header says that record (magic, length, low index) and its CRC checks; None otherwise
 * (the caller asks the server). One call in place of a slice, a copy, an unpack, a second copy
 * and two CRC calls: record(i) is a few microseconds, and those were a third of it. The payload
 * is copied first and its CRC computed over the copy, the header read once: what is returned is
 * what was checked, whatever the memory does meanwhile. */

PyObject *read_frame(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer view;
    Py_ssize_t at, length;
    unsigned long long nonce, index;
    if (!PyArg_ParseTuple(args, "y*nnKK", &view, &at, &length, &nonce, &index))
        return NULL;
    PyObject *payload = NULL;
    unsigned char header[HEADER_BYTES];
    if (at < 0 || length < 0 || length > UINT32_MAX || at > view.len - HEADER_BYTES
            || length > view.len - HEADER_BYTES - at)
        goto none;
    memcpy(header, (const unsigned char *)view.buf + at, HEADER_BYTES);
    if (memcmp(header, "PLG1", 4) != 0 || get32(header + 4) != (uint32_t)length
            || get32(header + 8) != (uint32_t)(index & 0xFFFFFFFFu))
        goto none;
    payload = PyBytes_FromStringAndSize((const char *)view.buf + at + HEADER_BYTES, length);
    if (payload == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    unsigned char seed[20];
    put64(seed, nonce);
    put64(seed + 8, index);
    put32(seed + 16, (uint32_t)length);
    if (crc32c(crc32c(0, seed, sizeof seed), (const unsigned char *)PyBytes_AS_STRING(payload), (size_t)length)
            != get32(header + 12)) {
        Py_CLEAR(payload);
        goto none;
    }
    PyBuffer_Release(&view);
    return payload;
none:
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}
