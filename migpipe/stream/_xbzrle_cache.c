/*
 * migpipe._xbzrle_cache: the xbzrle filter's page cache, and its per-record loops, in C.
 *
 * Why: the filter turns every page QEMU sends again into a delta against a cache that the
 * decoder mirrors.  In Python the bookkeeping around each 4 KiB page (an OrderedDict of keys,
 * slab slices, a record rebuilt) cost ten times the delta encoding itself, and a busy guest
 * needs that page path at memory speed.  Optional accelerator for filters/xbzrle.py, whose
 * PythonPageCache has the same methods and the same results; tests pin the two together.
 *
 * What it keeps, as filters/xbzrle.py describes: at most `capacity` pages of 4096 bytes, each
 * under a key (RAM block name, offset), in least-recently-used order.  A NORMAL page record
 * puts its page (inserting, or refreshing a held key and making it the most recent); a page of
 * another size forgets the key; a COMPRESSED page is inflated (by migpipe.stream.ramimage's
 * inflate_page, so exactly as the Python cache does) and put, or forgotten when it is not
 * exactly one page; ZERO and XBZRLE records only update a held page, never insert.  A new key
 * takes a forgotten slot first, then a never-used one, and only then evicts the least recent.
 *
 * Or, with index "direct" (PythonDirectCache's rules), direct-mapped: a key can only be held in
 * slot (base + offset / 4096) mod capacity, base being FNV-1a over the block name's characters,
 * and a new key there replaces whatever it held.  Why: QEMU's passes walk dirty pages in
 * address order, and an LRU as large as the working set evicts exactly the page the scan
 * meets next, so nearly every re-sent page missed; a direct-mapped cache keeps most of them
 * (QEMU's own cache is direct-mapped for the same reason).  No LRU order or hash index then.
 *
 * Layout: the pages live in one anonymous mapping, touched only as it fills, in transparent huge
 * pages where the kernel has them (a page's delta then costs no TLB miss: 30% of the filter's
 * time with 4 KiB pages over a 64 MiB cache); per slot, its key, a hash chain link and its two
 * LRU neighbours; a power-of-two bucket index of at least twice the slots, chained through the
 * slots.  A key's block name is held as the str it came in (compared by identity first: the
 * parser hands one str object to a run of records).
 *
 * encode() and decode() are the filter's two transforms over a list of records, one call per
 * batch: encode() computes each re-sent page's delta against its cached copy with
 * xbzrle_codec.h, the very code behind migpipe._xbzrle, then applies that delta to the copy,
 * which writes only the bytes that changed.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "xbzrle_codec.h"

#define PAGE 4096
#define NIL UINT32_MAX

/* The record classes and errors of migpipe, looked up once when the module loads. */
static PyTypeObject *NormalPage, *ZeroPage, *XbzrlePage, *CompressedPage;
static PyObject *MigpipeError, *CorruptError, *quoted, *inflate_page;

typedef struct {
    PyObject *block; /* the key's RAM block name (a str, held); NULL while the slot is empty */
    uint64_t offset;
    uint64_t hash;        /* of the key */
    uint32_t chain;       /* next slot in the same bucket, or in the free list */
    uint32_t older, newer; /* LRU neighbours, NIL at the ends */
} Slot;

typedef struct {
    PyObject_HEAD
    unsigned char *slab; /* capacity pages */
    Slot *slots;
    uint32_t *buckets;
    uint64_t bucket_mask;
    Py_ssize_t capacity;
    int direct;              /* direct-mapped instead of LRU: no buckets, no LRU order */
    uint32_t oldest, newest; /* the LRU's ends, NIL when nothing is held */
    uint32_t free;           /* forgotten slots, linked by chain */
    uint32_t unused;         /* slots from here on were never filled */
    unsigned long long evictions, hits, misses, overflows, unchanged, deltas;
} PageCache;

/* ---- keys ------------------------------------------------------------------------------ */

typedef struct {
    PyObject *block; /* borrowed */
    uint64_t offset;
    uint64_t hash;
} Key;

/* The key of (block, offset) parts: block a str, offset an int from 0 to 2^64 - 1 (a page
 * record's offset is the high bits of a 64-bit word). */
static int
make_key(PyObject *block, PyObject *offset, Key *key)
{
    if (!PyUnicode_Check(block)) {
        PyErr_Format(PyExc_TypeError, "a page's block must be a str, not %.100s",
                     Py_TYPE(block)->tp_name);
        return -1;
    }
    if (!PyLong_Check(offset)) {
        PyErr_Format(PyExc_TypeError, "a page's offset must be an int, not %.100s",
                     Py_TYPE(offset)->tp_name);
        return -1;
    }
    key->offset = PyLong_AsUnsignedLongLong(offset);
    if (key->offset == (uint64_t)-1 && PyErr_Occurred())
        return -1;
    Py_hash_t h = PyObject_Hash(block); /* cached in the str after the first time */
    if (h == -1)
        return -1;
    /* splitmix64's finaliser over both halves: offsets are multiples of the page size. */
    uint64_t x = (uint64_t)h ^ (key->offset * 0x9e3779b97f4a7c15ULL);
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    key->hash = x ^ (x >> 31);
    key->block = block;
    return 0;
}

static int
tuple_key(PyObject *obj, Key *key)
{
    if (!PyTuple_Check(obj) || PyTuple_GET_SIZE(obj) != 2) {
        PyErr_SetString(PyExc_TypeError, "a page's key is a (block, offset) tuple");
        return -1;
    }
    return make_key(PyTuple_GET_ITEM(obj, 0), PyTuple_GET_ITEM(obj, 1), key);
}

/* A page record's fields, checked: the NamedTuples of migpipe.stream.records. */
static int
record_key(PyObject *record, Py_ssize_t fields, Key *key)
{
    if (PyTuple_GET_SIZE(record) != fields) {
        PyErr_Format(PyExc_TypeError, "%.100s record of %zd fields", Py_TYPE(record)->tp_name,
                     PyTuple_GET_SIZE(record));
        return -1;
    }
    return make_key(PyTuple_GET_ITEM(record, 0), PyTuple_GET_ITEM(record, 1), key);
}

static inline int
same_block(PyObject *a, PyObject *b)
{
    return a == b || PyUnicode_Compare(a, b) == 0;
}

static inline unsigned char *
page_of(PageCache *self, uint32_t slot)
{
    return self->slab + (size_t)slot * PAGE;
}

/* ---- the index and the LRU --------------------------------------------------------------- */

#define FNV_OFFSET 0xcbf29ce484222325ULL
#define FNV_PRIME 0x100000001b3ULL

/* The one slot a direct-mapped cache may hold the key in.  The block's base is FNV-1a over
 * its name's characters (the wire's bytes: the parser reads names as latin-1), a hash both
 * ends compute alike, where the str's own hash is salted per process; names are a few bytes,
 * hashed again each time rather than remembered. */
static uint32_t
direct_slot(const PageCache *self, const Key *key)
{
    PyObject *name = key->block;
    int kind = PyUnicode_KIND(name);
    const void *data = PyUnicode_DATA(name);
    uint64_t h = FNV_OFFSET, capacity = (uint64_t)self->capacity;
    for (Py_ssize_t i = 0, n = PyUnicode_GET_LENGTH(name); i < n; i++)
        h = (h ^ PyUnicode_READ(kind, data, i)) * FNV_PRIME;
    /* (base + page) mod capacity, reduced first so that the sum cannot wrap. */
    return (uint32_t)((h % capacity + (key->offset / PAGE) % capacity) % capacity);
}

static uint32_t
lookup(PageCache *self, const Key *key)
{
    if (self->direct) {
        uint32_t s = direct_slot(self, key);
        Slot *slot = &self->slots[s];
        return slot->block != NULL && slot->offset == key->offset &&
                       same_block(slot->block, key->block)
                   ? s
                   : NIL;
    }
    uint32_t s = self->buckets[key->hash & self->bucket_mask];
    while (s != NIL) {
        Slot *slot = &self->slots[s];
        if (slot->hash == key->hash && slot->offset == key->offset &&
            same_block(slot->block, key->block))
            return s;
        s = slot->chain;
    }
    return NIL;
}

static void
lru_unlink(PageCache *self, uint32_t s)
{
    Slot *slot = &self->slots[s];
    if (slot->older != NIL)
        self->slots[slot->older].newer = slot->newer;
    else
        self->oldest = slot->newer;
    if (slot->newer != NIL)
        self->slots[slot->newer].older = slot->older;
    else
        self->newest = slot->older;
}

static void
lru_append(PageCache *self, uint32_t s)
{
    Slot *slot = &self->slots[s];
    slot->older = self->newest;
    slot->newer = NIL;
    if (self->newest != NIL)
        self->slots[self->newest].newer = s;
    else
        self->oldest = s;
    self->newest = s;
}

/* The key was used: it becomes the most recent. */
static inline void
touch(PageCache *self, uint32_t s)
{
    if (!self->direct && self->newest != s) {
        lru_unlink(self, s);
        lru_append(self, s);
    }
}

/* Take a held slot out of the index and the LRU, and let go of its key. */
static void
drop(PageCache *self, uint32_t s)
{
    Slot *slot = &self->slots[s];
    uint32_t *link = &self->buckets[slot->hash & self->bucket_mask];
    while (*link != s)
        link = &self->slots[*link].chain;
    *link = slot->chain;
    lru_unlink(self, s);
    Py_CLEAR(slot->block);
}

/* A slot for a key not held: a forgotten one, a never-used one, else the least recent's. */
static uint32_t
hold(PageCache *self, const Key *key)
{
    uint32_t s;
    if (self->direct) { /* its one slot, whatever it held */
        Slot *slot = &self->slots[s = direct_slot(self, key)];
        if (slot->block != NULL) {
            Py_DECREF(slot->block);
            self->evictions++;
        }
        slot->block = Py_NewRef(key->block);
        slot->offset = key->offset;
        return s;
    }
    if (self->free != NIL) {
        s = self->free;
        self->free = self->slots[s].chain;
    }
    else if ((Py_ssize_t)self->unused < self->capacity)
        s = self->unused++;
    else {
        s = self->oldest;
        drop(self, s);
        self->evictions++;
    }
    Slot *slot = &self->slots[s];
    slot->block = Py_NewRef(key->block);
    slot->offset = key->offset;
    slot->hash = key->hash;
    uint32_t *bucket = &self->buckets[key->hash & self->bucket_mask];
    slot->chain = *bucket;
    *bucket = s;
    lru_append(self, s);
    return s;
}

static void
forget(PageCache *self, const Key *key)
{
    uint32_t s = lookup(self, key);
    if (s != NIL && self->direct)
        Py_CLEAR(self->slots[s].block);
    else if (s != NIL) {
        drop(self, s);
        self->slots[s].chain = self->free;
        self->free = s;
    }
}

/* ---- the cache's rules --------------------------------------------------------------------- */

/* A page crossed: kept when it is PAGE bytes (the key becomes the most recent), else forgotten. */
static void
put(PageCache *self, const Key *key, const unsigned char *page, Py_ssize_t length)
{
    if (length != PAGE) {
        forget(self, key);
        return;
    }
    uint32_t s = lookup(self, key);
    if (s == NIL)
        s = hold(self, key);
    else
        touch(self, s);
    memcpy(page_of(self, s), page, PAGE);
}

/* The bytes of a buffer the caller holds: a bytes object's own, else through the buffer
 * protocol (release with PyBuffer_Release when view->obj is set). */
static int
get_bytes(PyObject *obj, Py_buffer *view)
{
    if (PyBytes_CheckExact(obj)) {
        view->obj = NULL;
        view->buf = PyBytes_AS_STRING(obj);
        view->len = PyBytes_GET_SIZE(obj);
        return 0;
    }
    return PyObject_GetBuffer(obj, view, PyBUF_SIMPLE);
}

static inline void
release_bytes(Py_buffer *view)
{
    if (view->obj != NULL)
        PyBuffer_Release(view);
}

static int
put_object(PageCache *self, const Key *key, PyObject *page)
{
    Py_buffer view;
    if (get_bytes(page, &view) < 0)
        return -1;
    put(self, key, view.buf, view.len);
    release_bytes(&view);
    return 0;
}

static void
raise_with(PyObject *type, PyObject *message)
{
    if (message == NULL)
        return;
    PyObject *error = PyObject_CallOneArg(type, message);
    Py_DECREF(message);
    if (error != NULL) {
        PyErr_SetObject(type, error);
        Py_DECREF(error);
    }
}

/* Apply a ZERO or XBZRLE record to the held page in slot s (made the most recent first). */
static int
apply(PageCache *self, uint32_t s, PyObject *record)
{
    touch(self, s);
    unsigned char *page = page_of(self, s);
    if (Py_TYPE(record) == ZeroPage) {
        long fill = PyLong_AsLong(PyTuple_GET_ITEM(record, 2));
        if (fill == -1 && PyErr_Occurred())
            return -1;
        if (fill < 0 || fill > 255) {
            PyErr_SetString(PyExc_ValueError, "bytes must be in range(0, 256)");
            return -1;
        }
        memset(page, (int)fill, PAGE);
        return 0;
    }
    Py_buffer delta;
    if (get_bytes(PyTuple_GET_ITEM(record, 2), &delta) < 0)
        return -1;
    int err = xb_decode(delta.buf, (size_t)delta.len, page, PAGE);
    release_bytes(&delta);
    if (err != XB_OK) {
        raise_with(MigpipeError, PyUnicode_FromString(xb_decode_messages[err]));
        return -1;
    }
    return 0;
}

/* Update the cache for a page record of QEMU's own kinds, as both ends see it. */
static int
observe(PageCache *self, PyObject *record)
{
    PyTypeObject *kind = Py_TYPE(record);
    Key key;
    if (kind == NormalPage) {
        if (record_key(record, 4, &key) < 0)
            return -1;
        return put_object(self, &key, PyTuple_GET_ITEM(record, 2));
    }
    if (kind == CompressedPage) {
        if (record_key(record, 4, &key) < 0)
            return -1;
        PyObject *page = PyObject_CallFunction(inflate_page, "On", PyTuple_GET_ITEM(record, 2),
                                               (Py_ssize_t)PAGE);
        if (page == NULL) {
            if (!PyErr_ExceptionMatches(MigpipeError))
                return -1;
            PyErr_Clear(); /* not exactly one page: forgotten, on both ends alike */
            forget(self, &key);
            return 0;
        }
        int result = put_object(self, &key, page);
        Py_DECREF(page);
        return result;
    }
    if (kind == ZeroPage || kind == XbzrlePage) {
        if (record_key(record, kind == ZeroPage ? 4 : 5, &key) < 0)
            return -1;
        uint32_t s = lookup(self, &key);
        return s == NIL ? 0 : apply(self, s, record);
    }
    PyErr_Format(PyExc_TypeError, "not a page record: %.100s", kind->tp_name);
    return -1;
}

/* Whether a method got exactly `expected` positional arguments (TypeError if not). */
static int
arguments(const char *name, Py_ssize_t nargs, Py_ssize_t expected)
{
    if (nargs == expected)
        return 1;
    PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, expected, nargs);
    return 0;
}

/* A record of `type` (a NamedTuple of migpipe.stream.records) with these fields, made as
 * tuple.__new__ makes it.  Its fields (str, int, bytes, bool) hold no references, so it can be
 * in no cycle: it is left out of the garbage collector's lists, whose walks cost the decoder
 * 6% when every page record was in them. */
static PyObject *
new_record(PyTypeObject *type, Py_ssize_t n, PyObject *const *fields)
{
    PyObject *record = type->tp_alloc(type, n);
    if (record == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++)
        PyTuple_SET_ITEM(record, i, Py_NewRef(fields[i]));
    PyObject_GC_UnTrack(record);
    return record;
}

/* ---- the type ---------------------------------------------------------------------------- */

static PyObject *
cache_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"size", "index", NULL};
    Py_ssize_t size;
    const char *index = "lru";
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "n|s:PageCache", keywords, &size, &index))
        return NULL;
    int direct = strcmp(index, "direct") == 0;
    if (!direct && strcmp(index, "lru") != 0) {
        PyErr_Format(PyExc_ValueError, "a page cache's index is 'lru' or 'direct', not '%s'",
                     index);
        return NULL;
    }
    Py_ssize_t capacity = size / PAGE > 1 ? size / PAGE : 1;
    if (capacity >= (Py_ssize_t)NIL / 2) {
        PyErr_Format(PyExc_OverflowError, "page cache of %zd bytes is too large", size);
        return NULL;
    }
    PageCache *self = (PageCache *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    size_t buckets = 1;
    while (buckets < 2 * (size_t)capacity)
        buckets <<= 1;
    self->slab = MAP_FAILED;
    self->capacity = capacity;
    self->direct = direct;
    self->bucket_mask = buckets - 1;
    self->oldest = self->newest = self->free = NIL;
    self->slots = calloc((size_t)capacity, sizeof(Slot));
    if (!direct) { /* a direct-mapped cache finds a key's slot without an index */
        self->buckets = malloc(buckets * sizeof(uint32_t));
        if (self->buckets != NULL)
            memset(self->buckets, 0xff, buckets * sizeof(uint32_t)); /* NIL everywhere */
    }
    if (self->slots == NULL || (!direct && self->buckets == NULL)) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    self->slab = mmap(NULL, (size_t)capacity * PAGE, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (self->slab == MAP_FAILED) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(self);
        return NULL;
    }
#ifdef MADV_HUGEPAGE
    madvise(self->slab, (size_t)capacity * PAGE, MADV_HUGEPAGE);
#endif
    return (PyObject *)self;
}

static void
cache_dealloc(PageCache *self)
{
    if (self->slots != NULL) /* a direct-mapped cache fills slots in any order */
        for (Py_ssize_t s = 0; s < self->capacity; s++)
            Py_CLEAR(self->slots[s].block);
    if (self->slab != MAP_FAILED)
        munmap(self->slab, (size_t)self->capacity * PAGE);
    free(self->slots);
    free(self->buckets);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
cache_contains(PageCache *self, PyObject *obj)
{
    Key key;
    if (tuple_key(obj, &key) < 0)
        return -1;
    return lookup(self, &key) != NIL;
}

PyDoc_STRVAR(get_doc, "get(key) -> bytes | None\n\n"
                      "A copy of the page held under (block, offset), or None; the LRU order "
                      "is unchanged.");

static PyObject *
cache_get(PageCache *self, PyObject *obj)
{
    Key key;
    if (tuple_key(obj, &key) < 0)
        return NULL;
    uint32_t s = lookup(self, &key);
    if (s == NIL)
        Py_RETURN_NONE;
    return PyBytes_FromStringAndSize((const char *)page_of(self, s), PAGE);
}

PyDoc_STRVAR(put_doc, "put(key, page) -> None\n\n"
                      "Keep a page of 4096 bytes under (block, offset), as the most recent; "
                      "any other size forgets the key.");

static PyObject *
cache_put(PageCache *self, PyObject *const *args, Py_ssize_t nargs)
{
    Key key;
    if (!arguments("put", nargs, 2) || tuple_key(args[0], &key) < 0 ||
        put_object(self, &key, args[1]) < 0)
        return NULL;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(forget_doc, "forget(key) -> None\n\nDrop the page held under (block, offset).");

static PyObject *
cache_forget(PageCache *self, PyObject *obj)
{
    Key key;
    if (tuple_key(obj, &key) < 0)
        return NULL;
    forget(self, &key);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(observe_doc, "observe(record) -> None\n\n"
                          "Update the cache for a page record of QEMU's own (as both ends see "
                          "it).");

static PyObject *
cache_observe(PageCache *self, PyObject *record)
{
    if (observe(self, record) < 0)
        return NULL;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(keys_doc, "keys() -> list[tuple[str, int]]\n\n"
                       "The keys held, least recently used first (by slot when direct-mapped).");

/* The slot keys() looks at after s: the next newer, or the next slot when direct-mapped. */
static uint32_t
next_key(const PageCache *self, uint32_t s)
{
    if (!self->direct)
        return self->slots[s].newer;
    return (Py_ssize_t)s + 1 < self->capacity ? s + 1 : NIL;
}

static PyObject *
cache_keys(PageCache *self, PyObject *unused)
{
    PyObject *keys = PyList_New(0);
    if (keys == NULL)
        return NULL;
    uint32_t s = self->direct ? 0 : self->oldest;
    for (; s != NIL; s = next_key(self, s)) {
        if (self->slots[s].block == NULL) /* an empty slot of a direct-mapped cache */
            continue;
        PyObject *key = Py_BuildValue("(OK)", self->slots[s].block,
                                      (unsigned long long)self->slots[s].offset);
        if (key == NULL || PyList_Append(keys, key) < 0) {
            Py_XDECREF(key);
            Py_DECREF(keys);
            return NULL;
        }
        Py_DECREF(key);
    }
    return keys;
}

/* The records of a list argument, or NULL with TypeError. */
static PyObject *
records_arg(PyObject *obj)
{
    if (!PyList_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "records must be a list, not %.100s",
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    return obj;
}

/*
 * encode()'s NORMAL page: the record to send for it (a new reference), the cache updated.  A
 * delta against the held copy, of at most `cap` bytes, makes an XBZRLE record with `encoding`.
 */
static PyObject *
encode_page(PageCache *self, const Key *key, PyObject *record, const Py_buffer *page,
            PyObject *encoding, size_t cap)
{
    uint32_t s = page->len == PAGE ? lookup(self, key) : NIL;
    if (s == NIL) {
        self->misses++;
        if (page->len == PAGE)
            memcpy(page_of(self, hold(self, key)), page->buf, PAGE);
        else
            forget(self, key); /* a page of another size */
        return Py_NewRef(record);
    }
    unsigned char delta[2 * PAGE + 8], *held = page_of(self, s);
    Py_ssize_t length = xb_encode(held, page->buf, PAGE, delta, cap);
    touch(self, s);
    if (length == XB_OVERFLOW) {
        self->overflows++;
        memcpy(held, page->buf, PAGE);
        return Py_NewRef(record);
    }
    /* The delta turns the held copy into the new page writing only the bytes that changed:
     * the rest of the slab's lines stay clean, which spares the memory their write-back. */
    xb_decode(delta, (size_t)length, held, PAGE);
    PyObject *data = PyBytes_FromStringAndSize((const char *)delta, length);
    if (data == NULL)
        return NULL;
    PyObject *fields[] = {key->block, PyTuple_GET_ITEM(record, 1), data,
                          PyTuple_GET_ITEM(record, 3), encoding};
    PyObject *result = new_record(XbzrlePage, 5, fields);
    Py_DECREF(data);
    if (result != NULL) {
        self->hits++;
        self->unchanged += length == 0;
    }
    return result;
}

PyDoc_STRVAR(encode_doc,
"encode(records, encoding, limit) -> list\n\n"
"The xbzrle encoder's transform: every record, in order, updating the cache; a NORMAL page\n"
"whose key is held becomes an XBZRLE record with `encoding` when its delta against the held\n"
"copy fits `limit` bytes.  Counts hits, misses, overflows and unchanged pages.");

static PyObject *
cache_encode(PageCache *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t limit;
    if (!arguments("encode", nargs, 3) || records_arg(args[0]) == NULL)
        return NULL;
    if ((limit = PyLong_AsSsize_t(args[2])) == -1 && PyErr_Occurred())
        return NULL;
    if (limit < 0) {
        PyErr_SetString(PyExc_ValueError, "limit must not be negative");
        return NULL;
    }
    PyObject *records = args[0], *encoding = args[1];
    Py_ssize_t n = PyList_GET_SIZE(records);
    PyObject *out = PyList_New(n);
    if (out == NULL)
        return NULL;
    size_t cap = (size_t)limit < 2 * PAGE + 8 ? (size_t)limit : 2 * PAGE + 8;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *record = PyList_GET_ITEM(records, i), *result;
        PyTypeObject *kind = Py_TYPE(record);
        Key key;
        if (kind == NormalPage) {
            Py_buffer page;
            if (record_key(record, 4, &key) < 0 ||
                get_bytes(PyTuple_GET_ITEM(record, 2), &page) < 0)
                goto fail;
            result = encode_page(self, &key, record, &page, encoding, cap);
            release_bytes(&page);
            if (result == NULL)
                goto fail;
            PyList_SET_ITEM(out, i, result);
            continue;
        }
        if ((kind == ZeroPage || kind == XbzrlePage || kind == CompressedPage) &&
            observe(self, record) < 0)
            goto fail;
        PyList_SET_ITEM(out, i, Py_NewRef(record));
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

PyDoc_STRVAR(decode_doc,
"decode(records, encoding) -> list\n\n"
"The xbzrle decoder's transform: every record, in order, updating the cache as encode() did;\n"
"an XBZRLE record with `encoding` is applied to the held page and becomes the NORMAL page\n"
"it was (CorruptError when no page is held under its key).  Counts the deltas.");

static PyObject *
cache_decode(PageCache *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (!arguments("decode", nargs, 2) || records_arg(args[0]) == NULL)
        return NULL;
    PyObject *records = args[0], *encoding = args[1];
    Py_ssize_t n = PyList_GET_SIZE(records);
    PyObject *out = PyList_New(n);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *record = PyList_GET_ITEM(records, i), *result;
        PyTypeObject *kind = Py_TYPE(record);
        Key key;
        int ours = 0;
        if (kind == XbzrlePage) {
            if (record_key(record, 5, &key) < 0 ||
                (ours = PyObject_RichCompareBool(PyTuple_GET_ITEM(record, 4), encoding, Py_EQ)) < 0)
                goto fail;
        }
        if (ours) {
            uint32_t s = lookup(self, &key);
            if (s == NIL) {
                char offset[24]; /* PyUnicode_FromFormat has no %llx before 3.12 */
                snprintf(offset, sizeof offset, "%llx", (unsigned long long)key.offset);
                PyObject *shown = PyObject_CallOneArg(quoted, key.block);
                if (shown == NULL)
                    goto fail;
                raise_with(CorruptError,
                           PyUnicode_FromFormat("xbzrle delta for page 0x%s of %U, which is "
                                                "not in the cache: the two ends disagree",
                                                offset, shown));
                Py_DECREF(shown);
                goto fail;
            }
            if (apply(self, s, record) < 0)
                goto fail;
            PyObject *data = PyBytes_FromStringAndSize((const char *)page_of(self, s), PAGE);
            if (data == NULL)
                goto fail;
            PyObject *fields[] = {key.block, PyTuple_GET_ITEM(record, 1), data,
                                  PyTuple_GET_ITEM(record, 3)};
            result = new_record(NormalPage, 4, fields);
            Py_DECREF(data);
            if (result == NULL)
                goto fail;
            self->deltas++;
        }
        else {
            if ((kind == NormalPage || kind == ZeroPage || kind == XbzrlePage ||
                 kind == CompressedPage) &&
                observe(self, record) < 0)
                goto fail;
            result = Py_NewRef(record);
        }
        PyList_SET_ITEM(out, i, result);
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

static PyMethodDef cache_methods[] = {
    {"get", (PyCFunction)cache_get, METH_O, get_doc},
    {"put", (PyCFunction)(void (*)(void))cache_put, METH_FASTCALL, put_doc},
    {"forget", (PyCFunction)cache_forget, METH_O, forget_doc},
    {"observe", (PyCFunction)cache_observe, METH_O, observe_doc},
    {"keys", (PyCFunction)cache_keys, METH_NOARGS, keys_doc},
    {"encode", (PyCFunction)(void (*)(void))cache_encode, METH_FASTCALL, encode_doc},
    {"decode", (PyCFunction)(void (*)(void))cache_decode, METH_FASTCALL, decode_doc},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef cache_members[] = {
    {"capacity", T_PYSSIZET, offsetof(PageCache, capacity), READONLY, "pages it holds at most"},
    {"evictions", T_ULONGLONG, offsetof(PageCache, evictions), READONLY, NULL},
    {"hits", T_ULONGLONG, offsetof(PageCache, hits), READONLY, NULL},
    {"misses", T_ULONGLONG, offsetof(PageCache, misses), READONLY, NULL},
    {"overflows", T_ULONGLONG, offsetof(PageCache, overflows), READONLY, NULL},
    {"unchanged", T_ULONGLONG, offsetof(PageCache, unchanged), READONLY, NULL},
    {"deltas", T_ULONGLONG, offsetof(PageCache, deltas), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PySequenceMethods cache_as_sequence = {
    .sq_contains = (objobjproc)cache_contains,
};

static PyTypeObject PageCacheType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "migpipe.stream._xbzrle_cache.PageCache",
    .tp_doc = PyDoc_STR("PageCache(size, index='lru'): the pages that crossed, at most size // "
                        "4096 of them (at least one), in an LRU or, with index='direct', "
                        "direct-mapped by page; encoder and decoder update it identically."),
    .tp_basicsize = sizeof(PageCache),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = cache_new,
    .tp_dealloc = (destructor)cache_dealloc,
    .tp_methods = cache_methods,
    .tp_members = cache_members,
    .tp_as_sequence = &cache_as_sequence,
};

/* ---- module ---------------------------------------------------------------------------- */

static int
import_names(const char *module, const char *const *names, PyObject **into)
{
    PyObject *m = PyImport_ImportModule(module);
    if (m == NULL)
        return -1;
    for (; *names != NULL; names++, into++)
        if ((*into = PyObject_GetAttrString(m, *names)) == NULL) {
            Py_DECREF(m);
            return -1;
        }
    Py_DECREF(m);
    return 0;
}

static struct PyModuleDef cache_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "migpipe.stream._xbzrle_cache",
    .m_doc = "The xbzrle filter's page cache in C: the optional accelerator behind "
             "migpipe_filters.xbzrle.",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__xbzrle_cache(void)
{
    static const char *const records[] = {"NormalPage", "ZeroPage", "XbzrlePage",
                                          "CompressedPage", NULL};
    static const char *const errors[] = {"MigpipeError", "CorruptError", "quoted", NULL};
    static const char *const ramimage[] = {"inflate_page", NULL};
    PyObject *types[4];
    PyObject *errs[3];
    if (import_names("migpipe.stream.records", records, types) < 0 ||
        import_names("migpipe.errors", errors, errs) < 0 ||
        import_names("migpipe.stream.ramimage", ramimage, &inflate_page) < 0)
        return NULL;
    NormalPage = (PyTypeObject *)types[0];
    ZeroPage = (PyTypeObject *)types[1];
    XbzrlePage = (PyTypeObject *)types[2];
    CompressedPage = (PyTypeObject *)types[3];
    MigpipeError = errs[0];
    CorruptError = errs[1];
    quoted = errs[2]; /* a block name in a message, as the Python cache shows it */
    if (PyType_Ready(&PageCacheType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&cache_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "PageCache", (PyObject *)&PageCacheType) < 0 ||
        PyModule_AddIntConstant(m, "PAGE", PAGE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
