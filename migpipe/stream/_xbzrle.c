/*
 * migpipe._xbzrle: QEMU's XBZRLE page delta, encoded and decoded in C.
 *
 * Optional accelerator for migpipe/stream/xbzrle.py, which has a pure-Python fallback producing
 * identical bytes.  The codec itself is xbzrle_codec.h (the format is described there); this is
 * its Python interface: one page, or a batch of pages without the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "xbzrle_codec.h"

/* ---- argument helpers ------------------------------------------------------------------ */

/* limit: None -> page length, else a non-negative int. */
static int
parse_limit(PyObject *obj, Py_ssize_t page_len, size_t *limit)
{
    if (obj == NULL || obj == Py_None) {
        *limit = (size_t)page_len;
        return 0;
    }
    Py_ssize_t v = PyNumber_AsSsize_t(obj, PyExc_OverflowError);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < 0) {
        PyErr_SetString(PyExc_ValueError, "limit must not be negative");
        return -1;
    }
    *limit = (size_t)v;
    return 0;
}

static int
check_pair(const Py_buffer *prev, const Py_buffer *cur, Py_ssize_t index)
{
    if (prev->len != cur->len) {
        if (index < 0)
            PyErr_Format(PyExc_ValueError, "old and new pages differ in length (%zd != %zd)",
                         prev->len, cur->len);
        else
            PyErr_Format(PyExc_ValueError,
                         "page %zd: old and new pages differ in length (%zd != %zd)", index,
                         prev->len, cur->len);
        return -1;
    }
    if (cur->len > XB_MAX_RUN) {
        PyErr_Format(PyExc_ValueError,
                     "pages of %zd bytes are too long for XBZRLE (at most %d)", cur->len,
                     XB_MAX_RUN);
        return -1;
    }
    return 0;
}

/* The most an encoding can take: every pair covers >= 2 page bytes (1 for the first) and costs
 * at most 4 bytes of lengths plus its literal.  Keeps buffers small when limit is huge. */
static inline size_t
output_cap(size_t page_len, size_t limit)
{
    size_t bound = 2 * page_len + 8;
    return limit < bound ? limit : bound;
}

/* ---- encode ---------------------------------------------------------------------------- */

PyDoc_STRVAR(encode_doc,
"encode(old, new, limit=None) -> bytes | None\n\n"
"QEMU's XBZRLE encoding of page `new` against the cached copy `old` (equal-length buffers).\n"
"b\"\" when the pages are identical, None when the delta would exceed `limit` bytes\n"
"(default: the page length), with QEMU 7.2's exact overflow decisions.");

static PyObject *
xbzrle_encode(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *limit_obj = NULL;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs + nkw > 3 || nargs < 2 || (nkw && nargs == 3)) {
        PyErr_SetString(PyExc_TypeError, "encode(old, new, limit=None) takes 2 or 3 arguments");
        return NULL;
    }
    if (nargs == 3)
        limit_obj = args[2];
    else if (nkw) {
        if (!PyUnicode_Check(PyTuple_GET_ITEM(kwnames, 0)) ||
            PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "limit") != 0) {
            PyErr_SetString(PyExc_TypeError, "encode() got an unexpected keyword argument");
            return NULL;
        }
        limit_obj = args[2];
    }

    Py_buffer prev, cur;
    if (PyObject_GetBuffer(args[0], &prev, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[1], &cur, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&prev);
        return NULL;
    }
    PyObject *result = NULL;
    size_t limit;
    if (check_pair(&prev, &cur, -1) < 0 || parse_limit(limit_obj, cur.len, &limit) < 0)
        goto done;

    /* Pages are at most 16 KiB, so the work is a few microseconds: keep the GIL. */
    unsigned char out[2 * XB_MAX_RUN + 8];
    Py_ssize_t len = xb_encode(prev.buf, cur.buf, (size_t)cur.len, out,
                               output_cap((size_t)cur.len, limit));
    if (len == XB_OVERFLOW)
        result = Py_NewRef(Py_None);
    else
        result = PyBytes_FromStringAndSize((const char *)out, len);
done:
    PyBuffer_Release(&cur);
    PyBuffer_Release(&prev);
    return result;
}

/* ---- encode_batch ---------------------------------------------------------------------- */

/* Pages per GIL-free stretch.  Small enough that the buffer views and the packed deltas of a
 * stretch stay in cache (4096-page stretches measured 15-25% slower), large enough that taking
 * the GIL back costs nothing measurable. */
#define SUB_BATCH 256

PyDoc_STRVAR(encode_batch_doc,
"encode_batch(olds, news, limit=None) -> list[bytes | None]\n\n"
"encode() for many page pairs in one call, without the GIL while encoding, so the per-call\n"
"cost is paid once and other threads run meanwhile.");

static PyObject *
xbzrle_encode_batch(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"olds", "news", "limit", NULL};
    PyObject *olds, *news, *limit_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|O:encode_batch", keywords, &olds, &news,
                                     &limit_obj))
        return NULL;

    PyObject *fast_old = PySequence_Fast(olds, "olds must be a sequence of buffers");
    if (fast_old == NULL)
        return NULL;
    PyObject *fast_new = PySequence_Fast(news, "news must be a sequence of buffers");
    if (fast_new == NULL) {
        Py_DECREF(fast_old);
        return NULL;
    }

    PyObject *result = NULL;
    Py_buffer *views = PyMem_Malloc(sizeof(Py_buffer) * 2 * SUB_BATCH); /* old, new per page */
    Py_ssize_t lens[SUB_BATCH];
    size_t offs[SUB_BATCH], limits[SUB_BATCH];
    size_t arena_size = 64 * 1024;
    unsigned char *arena = malloc(arena_size);
    Py_ssize_t held = 0, n = PySequence_Fast_GET_SIZE(fast_old);
    size_t fixed_limit = 0;
    int per_page_limit = limit_obj == Py_None;

    if (views == NULL || arena == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    if (PySequence_Fast_GET_SIZE(fast_new) != n) {
        PyErr_Format(PyExc_ValueError, "%zd old pages but %zd new pages", n,
                     PySequence_Fast_GET_SIZE(fast_new));
        goto fail;
    }
    if (!per_page_limit && parse_limit(limit_obj, 0, &fixed_limit) < 0)
        goto fail;
    if ((result = PyList_New(n)) == NULL)
        goto fail;

    for (Py_ssize_t first = 0; first < n; first += SUB_BATCH) {
        Py_ssize_t count = n - first < SUB_BATCH ? n - first : SUB_BATCH;
        PyObject **old_items = PySequence_Fast_ITEMS(fast_old) + first;
        PyObject **new_items = PySequence_Fast_ITEMS(fast_new) + first;
        size_t largest_cap = 0;
        for (Py_ssize_t k = 0; k < count; k++) {
            if (PyObject_GetBuffer(old_items[k], &views[2 * k], PyBUF_SIMPLE) < 0)
                goto fail;
            held++;
            if (PyObject_GetBuffer(new_items[k], &views[2 * k + 1], PyBUF_SIMPLE) < 0)
                goto fail;
            held++;
            if (check_pair(&views[2 * k], &views[2 * k + 1], first + k) < 0)
                goto fail;
            limits[k] = per_page_limit ? (size_t)views[2 * k + 1].len : fixed_limit;
            size_t cap = output_cap((size_t)views[2 * k + 1].len, limits[k]);
            if (cap > largest_cap)
                largest_cap = cap;
        }
        if (largest_cap > arena_size) {
            unsigned char *bigger = realloc(arena, largest_cap);
            if (bigger == NULL) {
                PyErr_NoMemory();
                goto fail;
            }
            arena = bigger;
            arena_size = largest_cap;
        }

        /* The deltas are packed end to end; before each page the arena is grown, if need be,
         * to hold the longest delta that page could give. */
        size_t used = 0;
        int out_of_memory = 0;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t k = 0; k < count; k++) {
            const Py_buffer *prev = &views[2 * k], *cur = &views[2 * k + 1];
            size_t cap = output_cap((size_t)cur->len, limits[k]);
            if (used + cap > arena_size) {
                size_t grown = arena_size * 2 > used + cap ? arena_size * 2 : used + cap;
                unsigned char *bigger = realloc(arena, grown);
                if (bigger == NULL) {
                    out_of_memory = 1;
                    break;
                }
                arena = bigger;
                arena_size = grown;
            }
            lens[k] = xb_encode(prev->buf, cur->buf, (size_t)cur->len, arena + used, cap);
            offs[k] = used;
            if (lens[k] > 0)
                used += (size_t)lens[k];
        }
        Py_END_ALLOW_THREADS
        if (out_of_memory) {
            PyErr_NoMemory();
            goto fail;
        }

        for (Py_ssize_t k = 0; k < count; k++) {
            PyObject *item;
            if (lens[k] == XB_OVERFLOW)
                item = Py_NewRef(Py_None);
            else if ((item = PyBytes_FromStringAndSize((const char *)arena + offs[k],
                                                       lens[k])) == NULL)
                goto fail;
            PyList_SET_ITEM(result, first + k, item);
        }
        for (Py_ssize_t h = 0; h < held; h++)
            PyBuffer_Release(&views[h]);
        held = 0;
    }
    goto done;

fail:
    Py_CLEAR(result);
done:
    for (Py_ssize_t h = 0; h < held; h++)
        PyBuffer_Release(&views[h]);
    free(arena);
    PyMem_Free(views);
    Py_DECREF(fast_new);
    Py_DECREF(fast_old);
    return result;
}

/* ---- decode ---------------------------------------------------------------------------- */

PyDoc_STRVAR(decode_doc,
"decode(delta, page) -> None\n\n"
"Apply an XBZRLE delta over the writable buffer `page` in place, accepting exactly what a\n"
"QEMU destination accepts; ValueError with the reason otherwise.  Runs without the GIL.");

static PyObject *
xbzrle_decode(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "decode(delta, page) takes exactly 2 arguments");
        return NULL;
    }
    Py_buffer delta, page;
    if (PyObject_GetBuffer(args[0], &delta, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[1], &page, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&delta);
        return NULL;
    }
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = xb_decode(delta.buf, (size_t)delta.len, page.buf, (size_t)page.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&page);
    PyBuffer_Release(&delta);
    if (err != XB_OK) {
        PyErr_SetString(PyExc_ValueError, xb_decode_messages[err]);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* ---- module ---------------------------------------------------------------------------- */

static PyMethodDef xbzrle_methods[] = {
    {"encode", (PyCFunction)(void (*)(void))xbzrle_encode, METH_FASTCALL | METH_KEYWORDS,
     encode_doc},
    {"encode_batch", (PyCFunction)(void (*)(void))xbzrle_encode_batch,
     METH_VARARGS | METH_KEYWORDS, encode_batch_doc},
    {"decode", (PyCFunction)(void (*)(void))xbzrle_decode, METH_FASTCALL, decode_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef xbzrle_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "migpipe._xbzrle",
    .m_doc = "QEMU XBZRLE page deltas in C: the optional accelerator behind "
             "migpipe.stream.xbzrle.",
    .m_size = 0,
    .m_methods = xbzrle_methods,
};

PyMODINIT_FUNC
PyInit__xbzrle(void)
{
    PyObject *m = PyModule_Create(&xbzrle_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "MAX_PAGE", XB_MAX_RUN) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
