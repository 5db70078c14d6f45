/*
 * migpipe._pages: runs of RAM page records to records and back, in C.
 *
 * Why: with a page filter (xbzrle) every page of the stream becomes a record and back, and the
 * parser's and the writer's Python loops, about a microsecond a page each, were then most of
 * what stands between QEMU and the wire.  Optional accelerator for migpipe/stream/parser.py
 * (parse_pages) and writer.py (write_pages): each handles the common records in runs and stops,
 * without judging, at anything else, which the Python code, the reference, then handles, so
 * every record and every error comes out as without it.
 *
 * The format (migpipe-stream(5)): a RAM record starts with a big-endian 64-bit word whose low
 * page-bits are flags and whose other bits are the page's offset in its RAM block.  With the
 * CONTINUE flag the page is in the block the previous record named; without it a counted block
 * name (a length byte, then up to 255 bytes) follows the word.  Then, by kind: NORMAL, the page;
 * ZERO, one fill byte; XBZRLE, an encoding byte, a big-endian 16-bit length and that many bytes
 * of delta; COMPRESSED, a big-endian 32-bit length and that many bytes of zlib stream.
 *
 * parse_pages makes CONTINUE NORMAL, ZERO and XBZRLE records (the bulk of a stream) as the
 * parser does; write_pages writes the four page kinds, naming the block when the record asks to
 * or the output did not name it last, as the writer does.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

/* RAM record flags (migpipe/stream/format.py). */
#define RAM_ZERO 0x002
#define RAM_PAGE 0x008
#define RAM_CONTINUE 0x020
#define RAM_XBZRLE 0x040
#define RAM_COMPRESS_PAGE 0x100

/* The record classes of migpipe.stream.records, looked up once when the module loads. */
static PyTypeObject *NormalPage, *ZeroPage, *XbzrlePage, *CompressedPage;

static inline uint64_t
load_be64(const unsigned char *p)
{
    return ((uint64_t)p[0] << 56) | ((uint64_t)p[1] << 48) | ((uint64_t)p[2] << 40) |
           ((uint64_t)p[3] << 32) | ((uint64_t)p[4] << 24) | ((uint64_t)p[5] << 16) |
           ((uint64_t)p[6] << 8) | (uint64_t)p[7];
}

static inline void
store_be(unsigned char *p, uint64_t v, int bytes)
{
    for (int i = bytes - 1; i >= 0; i--, v >>= 8)
        p[i] = (unsigned char)v;
}

/* A record of `type` (a NamedTuple) made as tuple.__new__ makes it; steals the fields.  They
 * (str, int, bytes, bool) hold no references, so it can be in no cycle: it is left out of the
 * garbage collector's lists, as migpipe._xbzrle_cache leaves its records. */
static PyObject *
new_record(PyTypeObject *type, Py_ssize_t n, PyObject **fields)
{
    for (Py_ssize_t i = 0; i < n; i++)
        if (fields[i] == NULL)
            goto fail;
    PyObject *record = type->tp_alloc(type, n);
    if (record == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < n; i++)
        PyTuple_SET_ITEM(record, i, fields[i]);
    PyObject_GC_UnTrack(record);
    return record;
fail:
    for (Py_ssize_t i = 0; i < n; i++)
        Py_XDECREF(fields[i]);
    return NULL;
}

/* ---- parse_pages ------------------------------------------------------------------------- */

PyDoc_STRVAR(parse_pages_doc,
"parse_pages(buf, pos, page_size, block, block_length, encodings, out) -> pos\n\n"
"Append to the list `out` the records of the CONTINUE NORMAL, ZERO and XBZRLE page records\n"
"from `pos`, in RAM block `block` (a str) of `block_length` bytes; `encodings` has 256 bytes,\n"
"non-zero for the XBZRLE encoding bytes taken.  Stops, without judging, at the first record\n"
"it does not take whole (another kind, a named block, an offset past the block, an encoding\n"
"not taken, a delta longer than a page, a record cut by the end of `buf`); returns where.");

static PyObject *
pages_parse(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7) {
        PyErr_Format(PyExc_TypeError, "parse_pages() takes 7 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *block = args[3], *out = args[6];
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]), page_size = PyLong_AsSsize_t(args[2]);
    if ((pos == -1 || page_size == -1) && PyErr_Occurred())
        return NULL;
    uint64_t length = PyLong_AsUnsignedLongLong(args[4]);
    if (length == (uint64_t)-1 && PyErr_Occurred())
        return NULL;
    if (page_size < 64 || (page_size & (page_size - 1))) {
        PyErr_SetString(PyExc_ValueError, "page_size must be a power of two >= 64");
        return NULL;
    }
    if (!PyUnicode_Check(block) || !PyList_Check(out)) {
        PyErr_SetString(PyExc_TypeError, "block must be a str and out a list");
        return NULL;
    }
    if (!PyBytes_Check(args[5]) || PyBytes_GET_SIZE(args[5]) != 256) {
        PyErr_SetString(PyExc_TypeError, "encodings must be 256 bytes");
        return NULL;
    }
    const unsigned char *taken = (const unsigned char *)PyBytes_AS_STRING(args[5]);
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
    const size_t end = (size_t)view.len, size = (size_t)page_size;
    size_t at = (size_t)pos;
    while (end - at >= 8) {
        uint64_t word = load_be64(buf + at), flags = word & mask, offset = word ^ flags;
        const unsigned char *p = buf + at + 8;
        size_t left = end - at - 8;
        PyObject *record;
        if (offset >= length)
            break;
        if (flags == (RAM_PAGE | RAM_CONTINUE)) {
            if (left < size)
                break;
            PyObject *fields[] = {Py_NewRef(block), PyLong_FromUnsignedLongLong(offset),
                                  PyBytes_FromStringAndSize((const char *)p, page_size),
                                  Py_NewRef(Py_False)};
            record = new_record(NormalPage, 4, fields);
            at += 8 + size;
        }
        else if (flags == (RAM_ZERO | RAM_CONTINUE)) {
            if (left < 1)
                break;
            PyObject *fields[] = {Py_NewRef(block), PyLong_FromUnsignedLongLong(offset),
                                  PyLong_FromLong(p[0]), Py_NewRef(Py_False)};
            record = new_record(ZeroPage, 4, fields);
            at += 9;
        }
        else if (flags == (RAM_XBZRLE | RAM_CONTINUE)) {
            if (left < 3 || !taken[p[0]])
                break;
            size_t delta = ((size_t)p[1] << 8) | p[2];
            if (delta > size || left - 3 < delta)
                break;
            PyObject *fields[] = {Py_NewRef(block), PyLong_FromUnsignedLongLong(offset),
                                  PyBytes_FromStringAndSize((const char *)p + 3, (Py_ssize_t)delta),
                                  Py_NewRef(Py_False), PyLong_FromLong(p[0])};
            record = new_record(XbzrlePage, 5, fields);
            at += 11 + delta;
        }
        else
            break;
        if (record == NULL || PyList_Append(out, record) < 0) {
            Py_XDECREF(record);
            PyBuffer_Release(&view);
            return NULL;
        }
        Py_DECREF(record);
    }
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t((Py_ssize_t)at);
}

/* ---- write_pages ------------------------------------------------------------------------- */

/* What one page record writes: its word, the block name when named, then a head (fill byte,
 * encoding byte and length, or length) and the payload. */
typedef struct {
    uint64_t word;
    const char *name;
    Py_ssize_t name_length; /* 0: CONTINUE */
    unsigned char head[4];
    int head_length;
    const char *payload;
    Py_ssize_t payload_length;
} Piece;

static inline int
is_byte(PyObject *obj, unsigned char *value)
{
    if (!PyLong_CheckExact(obj))
        return 0;
    long v = PyLong_AsLong(obj);
    if (v < 0 || v > 255) {
        PyErr_Clear();
        return 0;
    }
    *value = (unsigned char)v;
    return 1;
}

/*
 * Describe a page record as the writer would write it after a record of block *last; 0 when
 * it is not one this takes (another kind, or a field the writer's Python code must judge:
 * not an exact int, bool, str or bytes, or out of its range), else its length, *last updated.
 * Runs no Python code, so the records stay as they are between the two passes.
 */
static Py_ssize_t
describe(PyObject *record, PyObject **last, Piece *piece)
{
    PyTypeObject *kind = Py_TYPE(record);
    uint64_t flag;
    Py_ssize_t fields = 4;
    if (kind == NormalPage)
        flag = RAM_PAGE;
    else if (kind == ZeroPage)
        flag = RAM_ZERO;
    else if (kind == XbzrlePage) {
        flag = RAM_XBZRLE;
        fields = 5;
    }
    else if (kind == CompressedPage)
        flag = RAM_COMPRESS_PAGE;
    else
        return 0;
    if (PyTuple_GET_SIZE(record) != fields)
        return 0;
    PyObject *block = PyTuple_GET_ITEM(record, 0), *offset = PyTuple_GET_ITEM(record, 1);
    PyObject *data = PyTuple_GET_ITEM(record, 2), *named = PyTuple_GET_ITEM(record, 3);
    if (!PyUnicode_CheckExact(block) || PyUnicode_KIND(block) != PyUnicode_1BYTE_KIND ||
        PyUnicode_GET_LENGTH(block) > 255 || !PyLong_CheckExact(offset) ||
        (named != Py_True && named != Py_False))
        return 0;
    uint64_t word = PyLong_AsUnsignedLongLong(offset) | flag;
    if (PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    piece->head_length = 0;
    if (kind == ZeroPage) {
        if (!is_byte(data, &piece->head[0]))
            return 0;
        piece->head_length = 1;
        piece->payload_length = 0;
    }
    else {
        if (!PyBytes_CheckExact(data))
            return 0;
        piece->payload = PyBytes_AS_STRING(data);
        piece->payload_length = PyBytes_GET_SIZE(data);
        if (kind == XbzrlePage) {
            if (piece->payload_length > 0xffff ||
                !is_byte(PyTuple_GET_ITEM(record, 4), &piece->head[0]))
                return 0;
            store_be(piece->head + 1, (uint64_t)piece->payload_length, 2);
            piece->head_length = 3;
        }
        else if (kind == CompressedPage) {
            if ((uint64_t)piece->payload_length > 0xffffffffu)
                return 0;
            store_be(piece->head, (uint64_t)piece->payload_length, 4);
            piece->head_length = 4;
        }
    }
    int same = *last != NULL && (*last == block || PyUnicode_Compare(*last, block) == 0);
    if (named == Py_True || !same) {
        piece->name = (const char *)PyUnicode_1BYTE_DATA(block);
        piece->name_length = PyUnicode_GET_LENGTH(block);
        *last = block;
    }
    else {
        word |= RAM_CONTINUE;
        piece->name_length = 0;
    }
    piece->word = word;
    return 8 + (piece->name_length ? 1 + piece->name_length : 0) + piece->head_length +
           piece->payload_length;
}

PyDoc_STRVAR(write_pages_doc,
"write_pages(out, records, start, last_block) -> (stop, last_block)\n\n"
"Append to the bytearray `out` the page records of the list `records` from `start`, after\n"
"output whose last named block is `last_block` (a str, or None), as the writer writes them.\n"
"Stops, without judging, at the first record it does not take (another kind, or a field the\n"
"writer must judge); returns where, and the last block named then.");

static PyObject *
pages_write(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "write_pages() takes 4 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *out = args[0], *records = args[1], *last = args[3];
    Py_ssize_t start = PyLong_AsSsize_t(args[2]);
    if (start == -1 && PyErr_Occurred())
        return NULL;
    if (!PyByteArray_Check(out) || !PyList_Check(records)) {
        PyErr_SetString(PyExc_TypeError, "out must be a bytearray and records a list");
        return NULL;
    }
    if (last != Py_None && !PyUnicode_CheckExact(last)) {
        PyErr_SetString(PyExc_TypeError, "last_block must be a str or None");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(records);
    if (start < 0 || start > n) {
        PyErr_SetString(PyExc_ValueError, "start is outside the records");
        return NULL;
    }
    PyObject *first_last = last == Py_None ? NULL : last, *now = first_last;
    Piece piece;
    Py_ssize_t stop = start, total = 0, length;
    while (stop < n && (length = describe(PyList_GET_ITEM(records, stop), &now, &piece)) > 0) {
        total += length;
        stop++;
    }
    Py_ssize_t at = PyByteArray_GET_SIZE(out);
    if (total && PyByteArray_Resize(out, at + total) < 0)
        return NULL;
    unsigned char *dest = (unsigned char *)PyByteArray_AS_STRING(out) + at;
    now = first_last;
    for (Py_ssize_t i = start; i < stop; i++) {
        describe(PyList_GET_ITEM(records, i), &now, &piece);
        store_be(dest, piece.word, 8);
        dest += 8;
        if (piece.name_length) {
            *dest++ = (unsigned char)piece.name_length;
            memcpy(dest, piece.name, (size_t)piece.name_length);
            dest += piece.name_length;
        }
        memcpy(dest, piece.head, (size_t)piece.head_length);
        dest += piece.head_length;
        if (piece.payload_length) {
            memcpy(dest, piece.payload, (size_t)piece.payload_length);
            dest += piece.payload_length;
        }
    }
    return Py_BuildValue("(nO)", stop, now == NULL ? Py_None : now);
}

/* ---- module ---------------------------------------------------------------------------- */

static PyMethodDef pages_methods[] = {
    {"parse_pages", (PyCFunction)(void (*)(void))pages_parse, METH_FASTCALL, parse_pages_doc},
    {"write_pages", (PyCFunction)(void (*)(void))pages_write, METH_FASTCALL, write_pages_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef pages_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "migpipe.stream._pages",
    .m_doc = "Runs of QEMU RAM page records parsed and written in C: the optional accelerator "
             "behind the parser's and the writer's page records.",
    .m_size = -1,
    .m_methods = pages_methods,
};

PyMODINIT_FUNC
PyInit__pages(void)
{
    static const char *const names[] = {"NormalPage", "ZeroPage", "XbzrlePage", "CompressedPage"};
    PyTypeObject **types[] = {&NormalPage, &ZeroPage, &XbzrlePage, &CompressedPage};
    PyObject *records = PyImport_ImportModule("migpipe.stream.records");
    if (records == NULL)
        return NULL;
    for (int i = 0; i < 4; i++) {
        PyObject *type = PyObject_GetAttrString(records, names[i]);
        if (type == NULL || !PyType_Check(type)) {
            Py_XDECREF(type);
            Py_DECREF(records);
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_TypeError, "migpipe.stream.records.%s is not a class",
                             names[i]);
            return NULL;
        }
        *types[i] = (PyTypeObject *)type;
    }
    Py_DECREF(records);
    return PyModule_Create(&pages_module);
}
