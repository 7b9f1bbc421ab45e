/* Helpers shared by the package's C extensions (each includes this file; nothing is linked). */
#ifndef PGOTEL_CUTIL_H
#define PGOTEL_CUTIL_H

#include <Python.h>

/* The exception set, taken as an object with its traceback (new reference); NULL if there is none. */
static inline PyObject *
take_exception(void)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (value != NULL && tb != NULL)
        PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
}

#endif
