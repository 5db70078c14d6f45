#!/usr/bin/env python3
"""How fast migpipe encodes and decodes XBZRLE page deltas, next to plain C.

Builds three seeded sets of 4 KiB page pairs in memory:

  dirty      1-8 runs of 4-64 bytes changed per page (the usual re-sent page)
  unchanged  identical contents in distinct objects (QEMU sends nothing for these)
  overflow   random pages replaced by other random pages (the encoder gives up)

and times them in MB/s of guest page bytes (10^6 B/s), the best of --runs samples of at least
50 ms each (the best, not the median: on a shared box the median measures the neighbours):

  standalone C     a small C program of its own (same algorithm), compiled here with gcc -O2,
                   encoding the same pages read from a temporary file in one loop: the ceiling
  C ext, batch     migpipe.stream.xbzrle.encode_deltas, 4096 pages per call (the fast path),
                   on pages that are separate bytes objects, as they are in migpipe
  C ext, contiguous  the same on views into two contiguous buffers, old pages and new, laid
                   out as the standalone program has them: the algorithm against the
                   algorithm, without the cost of reaching pages scattered over the heap
  C ext, 2 threads the same from two threads at once (the C loop runs without the GIL)
  C ext, per page  encode_delta / apply_delta, one call per page
  Python fallback  what migpipe does without the extension (MIGPIPE_XBZRLE=python)
  filter, C cache  the xbzrle filter's whole page path (migpipe_filters.xbzrle's encoder and
                   decoder transforms, batches of 256 NORMAL page records, as a 1 MiB chunk of
                   stream gives): cache lookup, delta, cache update, the records made; the
                   cache holds the other set, so every page is re-sent (olds and news in turn)
  filter, Python cache  the same with PythonPageCache (and the C delta codec): the path
                   before the cache moved to C

"dirty dec" applies the dirty set's deltas over the old pages. The standalone program also
reports the size, overflow count and CRC of its output, which must match the extension's.

    python bench/bench_xbzrle.py            # about 20 s
    python bench/bench_xbzrle.py --quick    # a smoke test in a few seconds
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from operator import xor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a checkout, migpipe not installed
    sys.path.insert(0, str(REPO))

from migpipe_filters import xbzrle as xbzrle_filter  # noqa: E402

from migpipe.stream import xbzrle  # noqa: E402
from migpipe.stream.records import NormalPage, Record  # noqa: E402

try:
    from migpipe.stream import _xbzrle as ext_mod
except ImportError:  # not built: only the standalone C and Python rows
    ext_mod = None

PAGE = 4096
BATCH = 4096
RECORD_BATCH = 256  # page records per transform call: a 1 MiB chunk of stream
MIN_SAMPLE = 0.05  # seconds; the standalone program uses the same (MIN_NS)
Pages = list[bytes]
Deltas = list[bytes | None]

# -- the standalone C baseline ------------------------------------------------------------------

BASELINE_C = r"""
/* XBZRLE encode/decode over page pairs read from a file: the ceiling for migpipe's extension.
 * usage: xbzrle_baseline FILE PAGES PAGE_SIZE RUNS LIMIT   (FILE: all old pages, then all new)
 * prints "encode NS" and "decode NS" per run, then "bytes N", "overflow N", "empty N", "crc N". */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MIN_NS 50000000LL

static inline uint64_t word(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

#ifdef __SSE2__
#include <emmintrin.h>
static inline unsigned eqmask(const unsigned char *a, const unsigned char *b) {
    return _mm_movemask_epi8(_mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)a),
                                            _mm_loadu_si128((const __m128i *)b)));
}
#endif

static size_t same(const unsigned char *a, const unsigned char *b, size_t n) {
    size_t i = 0;
#ifdef __SSE2__
    for (; i + 64 <= n; i += 64) {
        unsigned m[4];
        for (int k = 0; k < 4; k++)
            m[k] = eqmask(a + i + 16 * k, b + i + 16 * k);
        if ((m[0] & m[1] & m[2] & m[3]) != 0xffff)
            for (int k = 0;; k++)
                if (m[k] != 0xffff)
                    return i + 16 * k + __builtin_ctz(~m[k]);
    }
    for (; i + 16 <= n; i += 16) {
        unsigned m = eqmask(a + i, b + i);
        if (m != 0xffff)
            return i + __builtin_ctz(~m);
    }
#endif
    for (; i + 8 <= n; i += 8) {
        uint64_t x = word(a + i) ^ word(b + i);
        if (x)
            return i + (__builtin_ctzll(x) >> 3);
    }
    while (i < n && a[i] == b[i])
        i++;
    return i;
}

static size_t differ(const unsigned char *a, const unsigned char *b, size_t n) {
    size_t i = 0;
#ifdef __SSE2__
    for (; i + 16 <= n; i += 16) {
        unsigned m = eqmask(a + i, b + i);
        if (m)
            return i + __builtin_ctz(m);
    }
#endif
    for (; i + 8 <= n; i += 8) {
        uint64_t x = word(a + i) ^ word(b + i);
        uint64_t z = (x - 0x0101010101010101ULL) & ~x & 0x8080808080808080ULL;
        if (z)
            return i + (__builtin_ctzll(z) >> 3);
    }
    while (i < n && a[i] != b[i])
        i++;
    return i;
}

static size_t uleb(unsigned char *d, size_t v) {
    if (v < 0x80) { d[0] = v; return 1; }
    d[0] = (v & 0x7f) | 0x80; d[1] = v >> 7; return 2;
}

static long encode(const unsigned char *o, const unsigned char *n, size_t size,
                   unsigned char *d, size_t limit) {
    size_t i = 0, len = 0;
    while (i < size) {
        if (len + 2 > limit) return -1;
        size_t z = same(o + i, n + i, size - i);
        if (z == size) return 0;
        i += z;
        if (i == size) break;
        len += uleb(d + len, z);
        if (len + 2 > limit) return -1;
        size_t m = differ(o + i, n + i, size - i);
        len += uleb(d + len, m);
        if (len + m > limit) return -1;
        memcpy(d + len, n + i, m);
        len += m; i += m;
    }
    return (long)len;
}

static int decode(const unsigned char *s, size_t len, unsigned char *page, size_t size) {
    size_t i = 0, at = 0;
    while (i < len) {
        size_t v[2];
        if (len - i < 2) return -1;
        for (int k = 0; k < 2; k++) {
            if (len - i < 2) return -1;
            v[k] = s[i];
            if (s[i] < 0x80) { i += 1; }
            else if (s[i + 1] >= 0x80) return -1;
            else { v[k] = (s[i] & 0x7f) | ((size_t)s[i + 1] << 7); i += 2; }
        }
        if ((at && !v[0]) || !v[1] || at + v[0] + v[1] > size || i + v[1] > len) return -1;
        at += v[0];
        memcpy(page + at, s + i, v[1]);
        at += v[1]; i += v[1];
    }
    return 0;
}

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static uint32_t crc_table[256];
static uint32_t crc32_update(uint32_t crc, const unsigned char *p, size_t n) {
    crc = ~crc;
    while (n--) crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

int main(int argc, char **argv) {
    if (argc != 6) { fprintf(stderr, "usage: %s FILE PAGES SIZE RUNS LIMIT\n", argv[0]); return 2; }
    size_t pages = strtoull(argv[2], 0, 10), size = strtoull(argv[3], 0, 10);
    int runs = atoi(argv[4]);
    size_t limit = strtoull(argv[5], 0, 10);
    unsigned char *data = malloc(2 * pages * size), *out = malloc(pages * limit + 16);
    unsigned char *work = malloc(pages * size);
    long *lens = malloc(pages * sizeof(long));
    size_t *offs = malloc(pages * sizeof(size_t));
    FILE *f = fopen(argv[1], "rb");
    if (!f || fread(data, size, 2 * pages, f) != 2 * pages) { perror("read"); return 1; }
    fclose(f);
    memset(out, 0, pages * limit + 16); /* fault the output in before timing */
    const unsigned char *olds = data, *news = data + pages * size;
    size_t used = 0;
    /* Each run repeats whole passes for at least MIN_NS and reports ns per pass. */
    for (int r = 0; r < runs; r++) {
        long long t0 = now_ns(), t;
        long passes = 0;
        do {
            used = 0;
            for (size_t k = 0; k < pages; k++) {
                long len = encode(olds + k * size, news + k * size, size, out + used, limit);
                lens[k] = len;
                offs[k] = used;
                if (len > 0) used += len;
            }
            passes++;
        } while ((t = now_ns() - t0) < MIN_NS);
        printf("encode %lld\n", t / passes);
    }
    memcpy(work, olds, pages * size);
    for (int r = 0; r < runs; r++) {
        long long t0 = now_ns(), t;
        long passes = 0;
        do {
            for (size_t k = 0; k < pages; k++)
                if (lens[k] > 0 && decode(out + offs[k], lens[k], work + k * size, size)) {
                    fprintf(stderr, "decode failed\n");
                    return 1;
                }
            passes++;
        } while ((t = now_ns() - t0) < MIN_NS);
        printf("decode %lld\n", t / passes);
    }
    if (memcmp(work, news, pages * size) != 0) {
        for (size_t k = 0; k < pages; k++) /* overflowed pages were not decoded */
            if (lens[k] >= 0 && memcmp(work + k * size, news + k * size, size)) {
                fprintf(stderr, "decode mismatch at page %zu\n", k);
                return 1;
            }
    }
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
    long overflow = 0, empty = 0;
    for (size_t k = 0; k < pages; k++) overflow += lens[k] < 0, empty += lens[k] == 0;
    printf("bytes %zu\noverflow %ld\nempty %ld\ncrc %u\n", used, overflow, empty,
           crc32_update(0, out, used));
    return 0;
}
"""


def build_baseline(workdir: Path) -> Path | None:
    """Compile the standalone program with gcc -O2; None (row skipped) without gcc."""
    gcc = shutil.which("gcc")
    if gcc is None:
        return None
    source, binary = workdir / "xbzrle_baseline.c", workdir / "xbzrle_baseline"
    source.write_text(BASELINE_C)
    subprocess.run([gcc, "-O2", "-o", str(binary), str(source)], check=True)
    return binary


def run_baseline(
    binary: Path, workdir: Path, olds: Pages, news: Pages, runs: int
) -> tuple[float, float, dict[str, int]]:
    """(encode MB/s, decode MB/s, output summary) of the standalone program on these pages."""
    pages = workdir / "pages.bin"
    with open(pages, "wb") as f:
        f.writelines(olds)
        f.writelines(news)
    result = subprocess.run(
        [str(binary), str(pages), str(len(olds)), str(PAGE), str(runs), str(PAGE)],
        capture_output=True,
        text=True,
        check=True,
    )
    pages.unlink()
    times: dict[str, list[int]] = {"encode": [], "decode": []}
    summary: dict[str, int] = {}
    for line in result.stdout.splitlines():
        key, value = line.split()
        if key in times:
            times[key].append(int(value))
        else:
            summary[key] = int(value)
    size = len(olds) * PAGE
    return (
        size / min(times["encode"]) * 1e3,
        size / min(times["decode"]) * 1e3,
        summary,
    )


def summarise(deltas: Deltas) -> dict[str, int]:
    """The same summary as the standalone program prints, for the extension's output."""
    out = b"".join(d for d in deltas if d)
    return {
        "bytes": len(out),
        "overflow": sum(d is None for d in deltas),
        "empty": sum(d == b"" for d in deltas),
        "crc": zlib.crc32(out),
    }


# -- page sets ----------------------------------------------------------------------------------


def dirty_set(rng: random.Random, count: int) -> tuple[Pages, Pages]:
    olds, news = [], []
    for _ in range(count):
        old = rng.randbytes(PAGE)
        new = bytearray(old)
        for _ in range(rng.randint(1, 8)):
            length = rng.randint(4, 64)
            at = rng.randrange(0, PAGE - length + 1)
            mask = bytes(rng.randint(1, 255) for _ in range(length))  # every byte changes
            new[at : at + length] = bytes(map(xor, old[at : at + length], mask))
        olds.append(old)
        news.append(bytes(new))
    return olds, news


def unchanged_set(rng: random.Random, count: int) -> tuple[Pages, Pages]:
    olds = [rng.randbytes(PAGE) for _ in range(count)]
    return olds, [bytes(bytearray(page)) for page in olds]  # equal, not the same object


def overflow_set(rng: random.Random, count: int) -> tuple[Pages, Pages]:
    return [rng.randbytes(PAGE) for _ in range(count)], [rng.randbytes(PAGE) for _ in range(count)]


# -- timing -------------------------------------------------------------------------------------


def best_mbs(pages: int, operation: Callable[[], object], runs: int) -> float:
    """Best of `runs` samples; each sample repeats `operation` for at least MIN_SAMPLE seconds,
    so short operations are not at the mercy of one scheduler hiccup."""
    speeds = []
    for _ in range(runs):
        passes, start = 0, time.perf_counter()
        while True:
            operation()
            passes += 1
            elapsed = time.perf_counter() - start
            if elapsed >= MIN_SAMPLE:
                break
        speeds.append(passes * pages * PAGE / elapsed / 1e6)
    return max(speeds)


def batched(olds: Pages, news: Pages) -> Deltas:
    out: Deltas = []
    for at in range(0, len(olds), BATCH):
        out += xbzrle.encode_deltas(olds[at : at + BATCH], news[at : at + BATCH], PAGE)
    return out


def contiguous(pages: Pages) -> list[memoryview]:
    """The pages as views into one buffer, in order (the standalone program's layout)."""
    whole = memoryview(b"".join(pages))
    return [whole[i * PAGE : (i + 1) * PAGE] for i in range(len(pages))]


def two_threads(olds: Pages, news: Pages) -> None:
    half = len(olds) // 2
    threads = [
        threading.Thread(target=batched, args=(olds[:half], news[:half])),
        threading.Thread(target=batched, args=(olds[half:], news[half:])),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def decode_all(
    apply: Callable[[bytes, bytearray], None], work: list[bytearray], deltas: Deltas
) -> None:
    for page, delta in zip(work, deltas, strict=True):
        if delta:
            apply(delta, page)


def page_records(pages: Pages) -> list[list[Record]]:
    """The pages as NORMAL page records of one block, in transform-sized batches."""
    records = [NormalPage("pc.ram", i * PAGE, page, i == 0) for i, page in enumerate(pages)]
    return [records[at : at + RECORD_BATCH] for at in range(0, len(records), RECORD_BATCH)]


def filter_rows(cache_class: type, olds: Pages, news: Pages, runs: int) -> tuple[float, float]:
    """(encode MB/s, decode MB/s) of the xbzrle filter's transforms with `cache_class`, every
    page re-sent: the caches hold olds, then news and olds are sent in turn."""
    size = len(olds) * PAGE
    sets = [page_records(news), page_records(olds)]
    encoder, decoder = cache_class(size), cache_class(size)
    limit, encoding = xbzrle_filter.DELTA_LIMIT, xbzrle_filter.WIRE_ENCODING
    for batch in sets[1]:
        decoder.decode(encoder.encode(batch, encoding, limit), encoding)
    wires = [[encoder.encode(batch, encoding, limit) for batch in records] for records in sets]

    def encode() -> None:
        for records in sets:
            for batch in records:
                encoder.encode(batch, encoding, limit)

    def decode() -> None:
        for wire in wires:
            for batch in wire:
                decoder.decode(batch, encoding)

    return best_mbs(2 * len(olds), encode, runs), best_mbs(2 * len(olds), decode, runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sets, a few seconds")
    parser.add_argument("--runs", type=int, default=7, help="samples per measurement (best)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    scale = 1 if args.quick else 8
    counts = {"dirty": 2500 * scale, "unchanged": 2500 * scale, "overflow": 1250 * scale}
    py_share = 4  # the Python fallback runs on a quarter of each set: it is ~30x slower
    rng = random.Random(args.seed)
    sets = {
        "dirty": dirty_set(rng, counts["dirty"]),
        "unchanged": unchanged_set(rng, counts["unchanged"]),
        "overflow": overflow_set(rng, counts["overflow"]),
    }
    rows: dict[str, dict[str, float]] = {}
    checks: list[str] = []

    with tempfile.TemporaryDirectory(prefix="bench-xbzrle-") as tmp:
        binary = build_baseline(Path(tmp))
        if binary is not None:
            row = rows.setdefault("standalone C (gcc -O2)", {})
            for name, (olds, news) in sets.items():
                enc, dec, summary = run_baseline(binary, Path(tmp), olds, news, args.runs)
                row[name] = enc
                if name == "dirty":
                    row["dirty dec"] = dec
                if ext_mod is not None:
                    ours = summarise(batched(olds, news))
                    ok = ours == summary
                    checks.append(f"{name}: {'identical' if ok else 'DIFFERENT'} {summary}")

    if ext_mod is not None:
        batch_row = rows.setdefault("C ext, batch of 4096", {})
        contiguous_row = rows.setdefault("C ext, batch, contiguous pages", {})
        threads_row = rows.setdefault("C ext, batch, 2 threads", {})
        single_row = rows.setdefault("C ext, per page", {})
        for name, (olds, news) in sets.items():
            batch_row[name] = best_mbs(len(olds), lambda o=olds, n=news: batched(o, n), args.runs)
            o, n = contiguous(olds), contiguous(news)
            contiguous_row[name] = best_mbs(len(olds), lambda o=o, n=n: batched(o, n), args.runs)
            threads_row[name] = best_mbs(
                len(olds), lambda o=olds, n=news: two_threads(o, n), args.runs
            )
            single_row[name] = best_mbs(
                len(olds),
                lambda o=olds, n=news: [
                    xbzrle.encode_delta(a, b, PAGE) for a, b in zip(o, n, strict=True)
                ],
                args.runs,
            )
        olds, news = sets["dirty"]
        deltas = batched(olds, news)
        work = [bytearray(page) for page in olds]
        single_row["dirty dec"] = best_mbs(
            len(olds), lambda: decode_all(xbzrle.apply_delta, work, deltas), args.runs
        )
        assert work == [bytearray(page) for page in news]

    py_row = rows.setdefault(f"Python fallback (1/{py_share} of each set)", {})
    for name, (olds, news) in sets.items():
        part = len(olds) // py_share
        o, n = olds[:part], news[:part]
        py_row[name] = best_mbs(
            part, lambda o=o, n=n: xbzrle.encode_deltas_py(o, n, PAGE), max(1, args.runs // 2)
        )
    olds, news = sets["dirty"]
    part = len(olds) // py_share
    deltas = xbzrle.encode_deltas_py(olds[:part], news[:part], PAGE)
    work = [bytearray(page) for page in olds[:part]]
    py_row["dirty dec"] = best_mbs(
        part, lambda: decode_all(xbzrle.apply_delta_py, work, deltas), args.runs
    )

    caches = {"filter, C cache": xbzrle_filter.PageCache}
    caches["filter, Python cache"] = xbzrle_filter.PythonPageCache
    if caches["filter, C cache"] is xbzrle_filter.PythonPageCache:  # not built, or turned off
        del caches["filter, C cache"]
    for label, cache_class in caches.items():
        row = rows.setdefault(label, {})
        for name, (olds, news) in sets.items():
            row[name], decoded = filter_rows(cache_class, olds, news, args.runs)
            if name == "dirty":
                row["dirty dec"] = decoded

    columns = ["dirty", "unchanged", "overflow", "dirty dec"]
    print(
        f"XBZRLE, MB/s of guest pages (best of {args.runs}); pages: "
        + ", ".join(f"{k} {v}" for k, v in counts.items())
        + f"; Python {platform.python_version()}, {os.cpu_count()} CPUs, "
        + f"load average {os.getloadavg()[0]:.1f}, active implementation: {xbzrle.IMPLEMENTATION}"
    )
    print(f"{'implementation':<36}" + "".join(f"{c:>12}" for c in columns))
    for label, row in rows.items():
        print(
            f"{label:<36}"
            + "".join(f"{row[c]:>12.0f}" if c in row else f"{'-':>12}" for c in columns)
        )
    base = rows.get("standalone C (gcc -O2)")
    for label, short in (
        ("C ext, batch of 4096", "batch"),
        ("C ext, batch, contiguous pages", "contiguous"),
    ):
        ours = rows.get(label)
        if base and ours:
            print(
                f"{f'ratio C ext {short} / standalone C':<36}"
                + "".join(
                    f"{ours[c] / base[c]:>11.2f}x" if c in ours else f"{'-':>12}" for c in columns
                )
            )
    for line in checks:
        print("output vs standalone C:", line)
    return 0 if all("identical" in line for line in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
