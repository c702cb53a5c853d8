/* Python objects' int attributes, read and set from C: what _plogserve.c (append_one) and
 * _kvput.c (the put grants) share. */
#ifndef MEMFABRIC_PYATTR_H
#define MEMFABRIC_PYATTR_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* Attribute `name` of `o` as a 64-bit int: -1 when it is not one (an error perhaps set:
 * callers that must tell check PyErr_Occurred()). */
static inline long long attr_ll(PyObject *o, PyObject *name) {
    PyObject *v = PyObject_GetAttr(o, name);
    if (v == NULL)
        return -1;
    long long x = PyLong_Check(v) ? PyLong_AsLongLong(v) : -1;
    Py_DECREF(v);
    return x;
}

/* attr_ll with no error left set: -1 for anything but an int. */
static inline long long attr_ll_or_minus_one(PyObject *o, PyObject *name) {
    long long x = attr_ll(o, name);
    if (PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    return x;
}

static inline int set_ll(PyObject *o, PyObject *name, long long x) {
    PyObject *v = PyLong_FromLongLong(x);
    if (v == NULL)
        return -1;
    int rc = PyObject_SetAttr(o, name, v);
    Py_DECREF(v);
    return rc;
}

#endif
