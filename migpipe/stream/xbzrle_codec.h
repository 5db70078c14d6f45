/*
 * xbzrle_codec.h: QEMU's XBZRLE page delta, encoded and decoded in C, without Python objects.
 *
 * Shared by migpipe._xbzrle (the codec's Python interface) and migpipe._xbzrle_cache (the
 * xbzrle filter's page cache), so both encode and decode with the very same code.  Written
 * from the format description in migpipe-stream(5) / the project's reference notes, not from
 * QEMU's sources.  Include it after Python.h.
 *
 * A delta is a list of (zero run, literal run) pairs.  Each run length is a ULEB128 of one or two
 * bytes; the literal run is followed by that many bytes of the new page.  The encoder emits the
 * canonical form (maximal runs, only the first zero run may be 0, the trailing zero run left out)
 * and gives up at exactly the same points as QEMU 7.2's generic encoder, which checks the output
 * limit before each zero run (A), before each literal run length (B) and before each literal (C).
 *
 * The scanners compare 16 bytes at a time with SSE2 (always there on x86-64; 64 bytes per loop
 * step), else 8 at a time as 64-bit words, and locate the first differing (or equal) byte with a
 * count-trailing-zeros on the byte mask or the little-endian word; the runs they report are the
 * same maximal runs a byte-by-byte scan finds, so the output stays canonical.
 */
#ifndef MIGPIPE_XBZRLE_CODEC_H
#define MIGPIPE_XBZRLE_CODEC_H

#include <stdint.h>
#include <string.h>

/* Longest run a two-byte ULEB128 can carry, hence the longest page we can encode. */
#define XB_MAX_RUN 0x3fff
/* Encoder results besides a length. */
#define XB_OVERFLOW (-1)

/* ---- word helpers ---------------------------------------------------------------------- */

/* Eight bytes at p as a word whose least significant byte is p[0], on any host. */
static inline uint64_t
load_le64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

/* Index of the lowest non-zero byte of a non-zero word. */
static inline size_t
low_byte(uint64_t x)
{
#if defined(__GNUC__) || defined(__clang__)
    return (size_t)__builtin_ctzll(x) >> 3;
#else
    size_t k = 0;
    while (!(x & 0xff)) {
        x >>= 8;
        k++;
    }
    return k;
#endif
}

#define ONES 0x0101010101010101ULL
#define HIGHS 0x8080808080808080ULL

#if defined(__SSE2__)
/* x86-64 always has SSE2: 16 bytes per compare, and a 16-bit mask of the equal bytes. */
#include <emmintrin.h>

static inline unsigned
equal_mask16(const unsigned char *a, const unsigned char *b)
{
    __m128i x = _mm_loadu_si128((const __m128i *)a), y = _mm_loadu_si128((const __m128i *)b);
    return (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(x, y));
}

static inline size_t
low_bit(unsigned m)
{
#if defined(__GNUC__) || defined(__clang__)
    return (size_t)__builtin_ctz(m);
#else
    size_t k = 0;
    while (!(m & 1)) {
        m >>= 1;
        k++;
    }
    return k;
#endif
}
#endif

/* Length of the run of equal bytes at the start of a and b (at most n). */
static inline size_t
equal_run(const unsigned char *a, const unsigned char *b, size_t n)
{
    size_t i = 0;
#if defined(__SSE2__)
    /* 64 bytes per step: equal stretches are the bulk of a dirty page. */
    while (i + 64 <= n) {
        unsigned m0 = equal_mask16(a + i, b + i), m1 = equal_mask16(a + i + 16, b + i + 16);
        unsigned m2 = equal_mask16(a + i + 32, b + i + 32);
        unsigned m3 = equal_mask16(a + i + 48, b + i + 48);
        if ((m0 & m1 & m2 & m3) != 0xffff) {
            if (m0 != 0xffff)
                return i + low_bit(~m0);
            if (m1 != 0xffff)
                return i + 16 + low_bit(~m1);
            if (m2 != 0xffff)
                return i + 32 + low_bit(~m2);
            return i + 48 + low_bit(~m3);
        }
        i += 64;
    }
    while (i + 16 <= n) {
        unsigned m = equal_mask16(a + i, b + i);
        if (m != 0xffff)
            return i + low_bit(~m);
        i += 16;
    }
#else
    /* Four words per step: equal stretches are the bulk of a dirty page. */
    while (i + 32 <= n) {
        uint64_t x0 = load_le64(a + i) ^ load_le64(b + i);
        uint64_t x1 = load_le64(a + i + 8) ^ load_le64(b + i + 8);
        uint64_t x2 = load_le64(a + i + 16) ^ load_le64(b + i + 16);
        uint64_t x3 = load_le64(a + i + 24) ^ load_le64(b + i + 24);
        if (x0 | x1 | x2 | x3) {
            if (x0)
                return i + low_byte(x0);
            if (x1)
                return i + 8 + low_byte(x1);
            if (x2)
                return i + 16 + low_byte(x2);
            return i + 24 + low_byte(x3);
        }
        i += 32;
    }
#endif
    while (i + 8 <= n) {
        uint64_t x = load_le64(a + i) ^ load_le64(b + i);
        if (x)
            return i + low_byte(x);
        i += 8;
    }
    while (i < n && a[i] == b[i])
        i++;
    return i;
}

/* Length of the run of differing bytes at the start of a and b (at most n). */
static inline size_t
differing_run(const unsigned char *a, const unsigned char *b, size_t n)
{
    size_t i = 0;
#if defined(__SSE2__)
    /* Literal runs are short on dirty pages but page-long on random ones: 64 bytes per step
     * once the first 16 are all different. */
    if (i + 16 <= n) {
        unsigned m = equal_mask16(a, b);
        if (m)
            return low_bit(m);
        i = 16;
    }
    while (i + 64 <= n) {
        unsigned m0 = equal_mask16(a + i, b + i), m1 = equal_mask16(a + i + 16, b + i + 16);
        unsigned m2 = equal_mask16(a + i + 32, b + i + 32);
        unsigned m3 = equal_mask16(a + i + 48, b + i + 48);
        if (m0 | m1 | m2 | m3) {
            if (m0)
                return i + low_bit(m0);
            if (m1)
                return i + 16 + low_bit(m1);
            if (m2)
                return i + 32 + low_bit(m2);
            return i + 48 + low_bit(m3);
        }
        i += 64;
    }
    while (i + 16 <= n) {
        unsigned m = equal_mask16(a + i, b + i);
        if (m)
            return i + low_bit(m);
        i += 16;
    }
#endif
    while (i + 8 <= n) {
        uint64_t x = load_le64(a + i) ^ load_le64(b + i);
        /* High bit set in the lowest zero byte of x (higher flags may be spurious, the lowest
         * never is: no borrow reaches it). */
        uint64_t zero = (x - ONES) & ~x & HIGHS;
        if (zero)
            return i + low_byte(zero);
        i += 8;
    }
    while (i < n && a[i] != b[i])
        i++;
    return i;
}

static inline size_t
put_uleb(unsigned char *d, size_t v)
{
    if (v < 0x80) {
        d[0] = (unsigned char)v;
        return 1;
    }
    d[0] = (unsigned char)((v & 0x7f) | 0x80);
    d[1] = (unsigned char)(v >> 7);
    return 2;
}

/* ---- the encoder and decoder proper (no Python objects, callable without the GIL) ------ */

/*
 * Encode `cur` against `prev` (both n <= XB_MAX_RUN bytes) into out, which must hold
 * min(limit, 2n + 8) bytes.  Returns the delta length (0: pages identical) or XB_OVERFLOW.
 */
static Py_ssize_t
xb_encode(const unsigned char *prev, const unsigned char *cur, size_t n, unsigned char *out,
          size_t limit)
{
    size_t i = 0, d = 0;
    while (i < n) {
        if (d + 2 > limit) /* A */
            return XB_OVERFLOW;
        size_t zrun = equal_run(prev + i, cur + i, n - i);
        if (zrun == n)
            return 0;
        i += zrun;
        if (i == n) /* the trailing zero run is implied */
            break;
        d += put_uleb(out + d, zrun);
        if (d + 2 > limit) /* B */
            return XB_OVERFLOW;
        size_t lit = differing_run(prev + i, cur + i, n - i);
        d += put_uleb(out + d, lit);
        if (d + lit > limit) /* C */
            return XB_OVERFLOW;
        memcpy(out + d, cur + i, lit);
        d += lit;
        i += lit;
    }
    return (Py_ssize_t)d;
}

enum xb_decode_error {
    XB_OK = 0,
    XB_TRUNCATED_ZRUN,
    XB_LONG_ULEB,
    XB_EMPTY_ZRUN,
    XB_ZRUN_PAST,
    XB_BAD_LITERAL,
};

/* Same words as migpipe.stream.xbzrle's Python decoder, so callers see one set of messages. */
static const char *const xb_decode_messages[] = {
    NULL,
    "invalid XBZRLE delta: truncated zero run",
    "invalid XBZRLE delta: run length longer than two bytes",
    "invalid XBZRLE delta: empty zero run after the first",
    "invalid XBZRLE delta: zero run past the page or delta end",
    "invalid XBZRLE delta: literal run empty or past the page",
};

/* Reads a ULEB128 of at most two bytes at delta[*at]; the caller guarantees two bytes remain. */
static inline int
get_uleb(const unsigned char *delta, size_t *at, size_t *value)
{
    unsigned char first = delta[*at];
    if (first < 0x80) {
        *value = first;
        *at += 1;
        return XB_OK;
    }
    unsigned char second = delta[*at + 1];
    if (second >= 0x80)
        return XB_LONG_ULEB;
    *value = (size_t)(first & 0x7f) | ((size_t)second << 7);
    *at += 2;
    return XB_OK;
}

/*
 * Apply `delta` over `page` in place, with the destination's acceptance rules: at least two
 * bytes before every run length, no zero run of 0 but the first, no empty literal, nothing past
 * the page or the delta.  Pairs before a faulty one are applied, as on the destination.
 */
static int
xb_decode(const unsigned char *delta, size_t end, unsigned char *page, size_t size)
{
    size_t i = 0, d = 0, zrun, lit;
    int err;
    while (i < end) {
        if (end - i < 2)
            return XB_TRUNCATED_ZRUN;
        size_t at = i;
        if ((err = get_uleb(delta, &at, &zrun)) != XB_OK)
            return err;
        if (i && !zrun)
            return XB_EMPTY_ZRUN;
        if (zrun > size - d || end - at < 2)
            return XB_ZRUN_PAST;
        d += zrun;
        if ((err = get_uleb(delta, &at, &lit)) != XB_OK)
            return err;
        if (!lit || lit > size - d || lit > end - at)
            return XB_BAD_LITERAL;
        memmove(page + d, delta + at, lit);
        d += lit;
        i = at + lit;
    }
    return XB_OK;
}

#endif /* MIGPIPE_XBZRLE_CODEC_H */
