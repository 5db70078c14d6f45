/*
 * migpipe._scan: skip over runs of RAM page records without making a record per page.
 *
 * Optional accelerator for migpipe/stream/parser.py's counting mode (StreamParser(pages=False)),
 * which has a pure-Python loop giving identical results.  It walks the records QEMU sends for
 * nearly every page of a precopy stream: NORMAL (8-byte word + one page) and ZERO (word + fill
 * byte), both with the CONTINUE flag (the page is in the block the previous record named).
 * The low page-bits of the big-endian word are the flags, the rest is the page's offset in its
 * block.  It stops, without judging, at the first record it does not take whole: another kind,
 * a named block, an offset at or beyond the block's length, or a record that does not fit in
 * the buffer; the parser's Python loop then reads that record and refuses it if it is wrong, so
 * errors and their offsets come from one place.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>

/* RAM record flags (migpipe/stream/format.py). */
#define RAM_ZERO 0x002
#define RAM_PAGE 0x008
#define RAM_CONTINUE 0x020

/* The big-endian word at p (compilers turn this into one load and a byte swap). */
static inline uint64_t
load_be64(const unsigned char *p)
{
    return ((uint64_t)p[0] << 56) | ((uint64_t)p[1] << 48) | ((uint64_t)p[2] << 40) |
           ((uint64_t)p[3] << 32) | ((uint64_t)p[4] << 24) | ((uint64_t)p[5] << 16) |
           ((uint64_t)p[6] << 8) | (uint64_t)p[7];
}

PyDoc_STRVAR(skip_pages_doc,
             "skip_pages(buf, pos, page_size, block_length) -> (pos, normal, zero)\n\n"
             "Skip the CONTINUE NORMAL and ZERO page records from `pos` whose offsets are below "
             "`block_length`; return where it stopped and how many of each kind it skipped.");

static PyObject *
scan_skip_pages(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "skip_pages() takes 4 arguments (%zd given)", nargs);
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t page_size = PyLong_AsSsize_t(args[2]);
    if (page_size == -1 && PyErr_Occurred())
        return NULL;
    uint64_t length = PyLong_AsUnsignedLongLong(args[3]);
    if (length == (uint64_t)-1 && PyErr_Occurred())
        return NULL;
    if (page_size < 64 || (page_size & (page_size - 1))) {
        PyErr_SetString(PyExc_ValueError, "page_size must be a power of two >= 64");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (pos < 0 || pos > view.len) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "pos is outside the buffer");
        return NULL;
    }
    const unsigned char *buf = view.buf;
    const uint64_t mask = (uint64_t)page_size - 1;
    const uint64_t normal_flags = RAM_PAGE | RAM_CONTINUE, zero_flags = RAM_ZERO | RAM_CONTINUE;
    const size_t end = (size_t)view.len, normal_size = 8 + (size_t)page_size;
    size_t at = (size_t)pos, normal = 0, zero = 0;
    while (end - at >= 8) {
        uint64_t word = load_be64(buf + at), flags = word & mask;
        if ((word ^ flags) >= length)
            break;
        if (flags == normal_flags) {
            if (end - at < normal_size)
                break;
            at += normal_size;
            normal++;
        } else if (flags == zero_flags) {
            if (end - at < 9)
                break;
            at += 9;
            zero++;
        } else {
            break;
        }
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("(nnn)", (Py_ssize_t)at, (Py_ssize_t)normal, (Py_ssize_t)zero);
}

static PyMethodDef scan_methods[] = {
    {"skip_pages", (PyCFunction)(void (*)(void))scan_skip_pages, METH_FASTCALL, skip_pages_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef scan_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "migpipe._scan",
    .m_doc = "Runs of QEMU RAM page records skipped in C: the optional accelerator behind "
             "StreamParser(pages=False).",
    .m_size = 0,
    .m_methods = scan_methods,
};

PyMODINIT_FUNC
PyInit__scan(void)
{
    return PyModule_Create(&scan_module);
}
