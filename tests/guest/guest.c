/*
 * Test guest for migpipe's real-QEMU tests (built and driven by tests/qemuvm.py).
 *
 * A multiboot v1 kernel, loaded by QEMU with `-kernel guest.elf -append "..."`, running in
 * 32-bit protected mode with paging off, so guest-physical addresses are plain pointers.
 *
 * 1. Fills REGION_START .. REGION_START + `pages` pages with a per-page mix of content, so a
 *    migration stream carries both zero pages and normal pages: zero, text-like, patterned and
 *    pseudo-random pages.
 * 2. Writes "READY\n" to the isa-debugcon port 0xe9; the harness blocks on that line.
 * 3. mode=idle: halts forever (nothing is dirtied, so a migration is a single pass).
 *    mode=dirty (default): writes random bytes at random offsets of the region forever, to make
 *    QEMU resend pages in later passes. Most writes change one byte of a page (what XBZRLE encodes
 *    well); half of them hit a small hot set so the same pages are dirtied in every pass; one
 *    write in 256 rewrites a whole page with random bytes (an XBZRLE overflow, sent as a page).
 *    Between writes it busy-waits `delay` iterations, which sets the dirty rate.
 *    mode=check: a guest that checks a migration by its own memory, for a destination that runs
 *    it (postcopy): each write picks a random page, notes it as in flight, bumps the page's
 *    counter in a table at CHECK_TABLE and stores the new count in the page's first word, then
 *    counts the write; so in any memory image every page's first word equals its counter
 *    (but the one in flight), and a page that arrived stale or never breaks that (see
 *    tests/qemuvm.py check_image). The table: word 0 the writes so far, word 1 the page in
 *    flight, then one counter per page. Between writes it busy-waits `delay` iterations.
 *
 * Command line words (any order, unknown words ignored): mode=idle|dirty|check, delay=N, hot=N
 * (pages in the hot set, at most the region's), pages=N (the region's size, at most
 * MAX_REGION_PAGES; default REGION_PAGES), seed=N.
 */
#include <stdint.h>

#define MULTIBOOT_MAGIC 0x1BADB002u
#define MULTIBOOT_FLAGS 0x00000000u
#define MULTIBOOT_INFO_CMDLINE 0x00000004u
#define MULTIBOOT_BOOT_MAGIC 0x2BADB002u

#define PAGE_SIZE 4096u
#define REGION_START 0x00800000u /* 8 MiB */
#define REGION_PAGES 8192u       /* 32 MiB by default, so the region ends at 40 MiB */
#define MAX_REGION_PAGES 16384u  /* 64 MiB: up to 72 MiB of the 128 MiB guest */
#define CHECK_TABLE 0x04800000u /* 72 MiB: right after the largest region */
#define DEBUGCON_PORT 0xe9

__attribute__((section(".multiboot"), used, aligned(4)))
static const uint32_t multiboot_header[3] = {
    MULTIBOOT_MAGIC, MULTIBOOT_FLAGS, (uint32_t)-(MULTIBOOT_MAGIC + MULTIBOOT_FLAGS),
};

uint8_t guest_stack[16384] __attribute__((aligned(16)));
static uint32_t region_pages = REGION_PAGES;

void guest_main(uint32_t boot_magic, const uint32_t *info);

/* The loader jumps here with EAX = boot magic, EBX = multiboot info, and no usable stack. */
__asm__(
    ".section .text.entry, \"ax\"\n"
    ".global _start\n"
    "_start:\n"
    "    mov $guest_stack + 16384, %esp\n"
    "    push %ebx\n"
    "    push %eax\n"
    "    call guest_main\n"
    "1:  cli\n"
    "    hlt\n"
    "    jmp 1b\n"
    ".previous\n");

static inline void outb(uint16_t port, uint8_t value)
{
    __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

static void debug_print(const char *text)
{
    while (*text) {
        outb(DEBUGCON_PORT, (uint8_t)*text++);
    }
}

static __attribute__((noreturn)) void halt_forever(void)
{
    for (;;) {
        __asm__ volatile("cli; hlt");
    }
}

static inline uint32_t xorshift32(uint32_t *state)
{
    uint32_t x = *state;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    *state = x;
    return x;
}

/* Looks up `key=` among the space-separated words of the command line. */
static const char *find_option(const char *cmdline, const char *key)
{
    const char *word = cmdline;
    while (word && *word) {
        while (*word == ' ') {
            word++;
        }
        const char *k = key;
        const char *w = word;
        while (*k && *w == *k) {
            k++;
            w++;
        }
        if (!*k && *w == '=') {
            return w + 1;
        }
        while (*word && *word != ' ') {
            word++;
        }
    }
    return 0;
}

static uint32_t option_number(const char *cmdline, const char *key, uint32_t fallback)
{
    const char *value = find_option(cmdline, key);
    if (!value || *value < '0' || *value > '9') {
        return fallback;
    }
    uint32_t n = 0;
    while (*value >= '0' && *value <= '9') {
        n = n * 10 + (uint32_t)(*value++ - '0');
    }
    return n;
}

static int option_is(const char *cmdline, const char *key, const char *expected)
{
    const char *value = find_option(cmdline, key);
    if (!value) {
        return 0;
    }
    while (*expected && *value == *expected) {
        value++;
        expected++;
    }
    return !*expected && (*value == ' ' || *value == 0);
}

static volatile uint8_t *region_page(uint32_t page)
{
    return (volatile uint8_t *)(REGION_START + page * PAGE_SIZE);
}

static const char *const words[] = {
    "migration ", "stream ", "page ", "dirty ", "bitmap ", "section ", "qemu ", "guest ",
    "memory ", "xbzrle ", "delta ", "zero ", "record ", "tunnel ", "pipe ", "iteration ",
    "\n", "the ", "of ", "a ", "and ", "to ", "is ", "it ",
};

static void fill_text(volatile uint8_t *p, uint32_t *rng)
{
    uint32_t i = 0;
    while (i < PAGE_SIZE) {
        const char *w = words[xorshift32(rng) % (sizeof(words) / sizeof(words[0]))];
        while (*w && i < PAGE_SIZE) {
            p[i++] = (uint8_t)*w++;
        }
    }
}

static void fill_pattern(volatile uint8_t *p, uint32_t page)
{
    volatile uint32_t *w = (volatile uint32_t *)p;
    for (uint32_t i = 0; i < PAGE_SIZE / 4; i++) {
        w[i] = (page << 16) | (i * 7u);
    }
}

static void fill_random(volatile uint8_t *p, uint32_t *rng)
{
    volatile uint32_t *w = (volatile uint32_t *)p;
    for (uint32_t i = 0; i < PAGE_SIZE / 4; i++) {
        w[i] = xorshift32(rng);
    }
}

/* Page kind from a hash of its number: about a quarter each of zero, text, pattern, random. */
static void fill_region(uint32_t seed)
{
    uint32_t rng = seed;
    for (uint32_t page = 0; page < region_pages; page++) {
        uint32_t h = page * 0x9E3779B1u;
        h ^= h >> 15;
        switch (h & 3) {
        case 0:
            break; /* RAM starts zeroed: left as a zero page */
        case 1:
            fill_text(region_page(page), &rng);
            break;
        case 2:
            fill_pattern(region_page(page), page);
            break;
        default:
            fill_random(region_page(page), &rng);
            break;
        }
    }
}

static __attribute__((noreturn)) void dirty_forever(uint32_t seed, uint32_t delay, uint32_t hot)
{
    uint32_t rng = seed;
    for (;;) {
        uint32_t r = xorshift32(&rng);
        uint32_t page;
        if ((r >> 24) == 0) {
            page = xorshift32(&rng) % region_pages;
            fill_random(region_page(page), &rng);
        } else {
            if ((r & 1) && hot) {
                page = (r >> 1) % hot;
            } else {
                page = xorshift32(&rng) % region_pages;
            }
            uint32_t v = xorshift32(&rng);
            region_page(page)[v % PAGE_SIZE] = (uint8_t)(v >> 16);
        }
        for (uint32_t i = delay; i; i--) {
            __asm__ volatile("");
        }
    }
}

static __attribute__((noreturn)) void check_forever(uint32_t seed, uint32_t delay)
{
    volatile uint32_t *table = (volatile uint32_t *)CHECK_TABLE;
    uint32_t rng = seed;
    for (uint32_t page = 0; page < region_pages; page++) {
        ((volatile uint32_t *)region_page(page))[0] = 0; /* every counter starts at 0 */
    }
    for (;;) {
        uint32_t page = xorshift32(&rng) % region_pages;
        table[1] = page;
        uint32_t count = table[2 + page] + 1;
        ((volatile uint32_t *)region_page(page))[0] = count;
        table[2 + page] = count;
        table[0] = table[0] + 1;
        for (uint32_t i = delay; i; i--) {
            __asm__ volatile("");
        }
    }
}

void guest_main(uint32_t boot_magic, const uint32_t *info)
{
    const char *cmdline = "";
    if (boot_magic == MULTIBOOT_BOOT_MAGIC && (info[0] & MULTIBOOT_INFO_CMDLINE)) {
        cmdline = (const char *)info[4];
    }
    uint32_t seed = option_number(cmdline, "seed", 12345);
    uint32_t delay = option_number(cmdline, "delay", 5000);
    uint32_t hot = option_number(cmdline, "hot", 256);
    region_pages = option_number(cmdline, "pages", REGION_PAGES);
    if (seed == 0) {
        seed = 1; /* xorshift's only fixed point */
    }
    if (region_pages == 0 || region_pages > MAX_REGION_PAGES) {
        region_pages = MAX_REGION_PAGES;
    }
    if (hot > region_pages) {
        hot = region_pages;
    }

    fill_region(seed);
    debug_print("READY\n");
    if (option_is(cmdline, "mode", "idle")) {
        halt_forever();
    }
    if (option_is(cmdline, "mode", "check")) {
        check_forever(seed ^ 0x5A5A5A5Au, delay);
    }
    dirty_forever(seed ^ 0xA5A5A5A5u, delay, hot);
}
