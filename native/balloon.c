/*
 * balloon.c - system calls and page loops for uballoon's balloon chunks.
 *
 * Theory of operation
 * -------------------
 * A balloon chunk is a span of virtual memory whose pages uballoon takes away
 * from its guest and reports to the host by page frame number (PFN).  The host
 * zeroes whatever frames it is told, so a reported frame must keep belonging
 * to the chunk: this file makes the chunk's pages present (populate), keeps
 * them in RAM (mlock), stops the kernel from migrating them (a FOLL_LONGTERM
 * pin taken by registering the span as io_uring fixed buffers), and then reads
 * their frames from /proc/self/pagemap.
 *
 * Ownership: the caller (native/__init__.py, driven by the guest agent) owns
 * every mapping and ring fd; nothing here keeps state between calls, so the
 * functions are safe to call from several threads at once.  Each function does
 * its whole loop over pages in one call and returns 0 or -errno; it never
 * decides policy (which page size, when to give memory back).
 *
 * Invariants kept here:
 *  - spans are page-aligned and non-empty (checked again here, not trusted);
 *  - on failure a function undoes what it did itself (a half-made mapping is
 *    unmapped, a ring whose registration failed is closed), but it does not
 *    undo the caller's earlier steps: a failed ub_lock leaves the span mapped,
 *    maybe partly locked, and the caller releases it;
 *  - the pin lives in the ring: while any process holds the ring fd, the
 *    pages stay pinned, whether or not this process still maps them.
 *  - /proc/self/pagemap is opened per call, never cached: an fd inherited over
 *    fork() would describe the parent's address space.
 */
#define _GNU_SOURCE
#include "balloon.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <linux/io_uring.h>

/* Syscall numbers, in case the libc headers predate them.  io_uring's are the
 * same on every architecture. */
#ifndef __NR_io_uring_setup
#define __NR_io_uring_setup 425
#endif
#ifndef __NR_io_uring_register
#define __NR_io_uring_register 427
#endif
#ifndef __NR_pidfd_open
#define __NR_pidfd_open 434
#endif
#ifndef __NR_pidfd_getfd
#define __NR_pidfd_getfd 438
#endif
#if !defined(__NR_move_pages) && defined(__x86_64__)
#define __NR_move_pages 279
#endif

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
#ifndef MLOCK_ONFAULT
#define MLOCK_ONFAULT 1
#endif
#ifndef MPOL_MF_MOVE
#define MPOL_MF_MOVE (1 << 1)
#endif
#ifndef HUGETLBFS_MAGIC
#define HUGETLBFS_MAGIC 0x958458f6
#endif

/* /proc/<pid>/pagemap entry (Documentation/admin-guide/mm/pagemap.rst). */
#define PM_PRESENT (1ULL << 63)
#define PM_SWAP (1ULL << 62)
#define PM_PFN_MASK ((1ULL << 55) - 1)

/* io_uring refuses a fixed buffer larger than 1 GiB and more than 16384 of them. */
#define IOURING_MAX_BUFFER (1ULL << 30)
#define IOURING_MAX_BUFFERS 16384

/* pagemap entries per pread: 256 KiB of buffer, 128 MiB of 4 KiB pages.  Few
 * syscalls, and the buffer stays in L2 while the loop scans it. */
#define PAGEMAP_BATCH 32768

/* mincore() vector bytes per call. */
#define MINCORE_BATCH 65536

static uint64_t page_size(void)
{
    static uint64_t cached;
    if (!cached)
        cached = (uint64_t)sysconf(_SC_PAGESIZE);
    return cached;
}

/* Size of a PMD-mapped (transparent) huge page, 2 MiB on x86-64. */
static uint64_t pmd_size(void)
{
    static uint64_t cached;
    if (!cached) {
        uint64_t value = 2ULL << 20;
        int fd = open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size",
                      O_RDONLY | O_CLOEXEC);
        if (fd >= 0) {
            char text[32];
            ssize_t n = read(fd, text, sizeof text - 1);
            if (n > 0) {
                text[n] = 0;
                uint64_t parsed = strtoull(text, NULL, 10);
                if (parsed && !(parsed & (parsed - 1)))
                    value = parsed;
            }
            close(fd);
        }
        cached = value;
    }
    return cached;
}

static int check_span(uint64_t addr, uint64_t size)
{
    uint64_t mask = page_size() - 1;
    if (size == 0 || (addr & mask) || (size & mask) || addr + size < addr)
        return -EINVAL;
    return 0;
}

static void *as_ptr(uint64_t addr)
{
    return (void *)(uintptr_t)addr;
}

uint64_t ub_page_size(void)
{
    return page_size();
}

/* Apply MADV_HUGEPAGE (huge > 0) or MADV_NOHUGEPAGE (huge == 0); huge < 0 leaves
 * the kernel's default.  NOHUGEPAGE fails with EINVAL on a kernel without THP,
 * where it has nothing to prevent. */
static int advise_huge(void *p, uint64_t size, int huge)
{
    if (huge > 0)
        return madvise(p, size, MADV_HUGEPAGE) ? -errno : 0;
    if (huge == 0 && madvise(p, size, MADV_NOHUGEPAGE) && errno != EINVAL)
        return -errno;
    return 0;
}

int ub_map_anonymous(uint64_t size, int huge, uint64_t *addr_out)
{
    int ret = check_span(0, size);
    if (ret)
        return ret;
    /* A huge page can only back a PMD-aligned stretch, and the kernel aligns
     * anonymous mappings only on some versions: over-allocate, then trim both
     * ends.  Untouched anonymous memory costs nothing. */
    uint64_t align = (huge && size >= pmd_size()) ? pmd_size() : 0;
    uint64_t reserve = size + align;
    if (reserve < size)
        return -EINVAL;
    char *raw = mmap(NULL, reserve, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                     -1, 0);
    if (raw == MAP_FAILED)
        return -errno;
    char *p = raw;
    if (align) {
        p = (char *)(((uintptr_t)raw + align - 1) & ~(uintptr_t)(align - 1));
        if (p > raw)
            munmap(raw, p - raw);
        if (raw + reserve > p + size)
            munmap(p + size, raw + reserve - (p + size));
    }
    ret = advise_huge(p, size, huge ? 1 : 0);
    if (ret) {
        munmap(p, size);
        return ret;
    }
    *addr_out = (uint64_t)(uintptr_t)p;
    return 0;
}

int ub_map_shared(int fd, uint64_t size, uint64_t offset, int huge, uint64_t *addr_out)
{
    int ret = check_span(offset, size);
    if (ret)
        return ret;
    struct statfs fs;
    if (fstatfs(fd, &fs))
        return -errno;
    char *p;
    uint64_t align = pmd_size();
    if ((uint64_t)fs.f_type == HUGETLBFS_MAGIC || size < align) {
        /* hugetlbfs aligns to its own page size by itself. */
        p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)offset);
        if (p == MAP_FAILED)
            return -errno;
    } else {
        /* For tmpfs huge pages the address must agree with the file offset
         * modulo the huge page size.  Reserve address space, place the file
         * mapping inside it at such an address, and give back the rest. */
        uint64_t reserve = size + align;
        if (reserve < size)
            return -EINVAL;
        char *raw = mmap(NULL, reserve, PROT_NONE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (raw == MAP_FAILED)
            return -errno;
        /* The lowest address in the reservation that is congruent to the file
         * offset modulo the huge page size; it leaves `size` bytes before the
         * reservation ends because the reservation has `align` to spare. */
        uintptr_t mask = (uintptr_t)(align - 1);
        char *want = raw + (((uintptr_t)offset - (uintptr_t)raw) & mask);
        p = mmap(want, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd,
                 (off_t)offset);
        if (p == MAP_FAILED) {
            ret = -errno;
            munmap(raw, reserve);
            return ret;
        }
        if (p > raw)
            munmap(raw, p - raw);
        if (raw + reserve > p + size)
            munmap(p + size, raw + reserve - (p + size));
    }
    ret = advise_huge(p, size, huge);
    if (ret) {
        munmap(p, size);
        return ret;
    }
    *addr_out = (uint64_t)(uintptr_t)p;
    return 0;
}

int ub_count_missing(uint64_t addr, uint64_t size, uint64_t *missing_out)
{
    int ret = check_span(addr, size);
    if (ret)
        return ret;
    uint64_t psize = page_size();
    uint64_t pages = size / psize, missing = 0;
    unsigned char *vec = malloc(MINCORE_BATCH);
    if (!vec)
        return -ENOMEM;
    for (uint64_t done = 0; done < pages;) {
        uint64_t n = pages - done < MINCORE_BATCH ? pages - done : MINCORE_BATCH;
        if (mincore(as_ptr(addr + done * psize), n * psize, vec)) {
            ret = -errno;
            break;
        }
        /* Only bit 0 of each byte means "resident"; count eight at a time. */
        uint64_t i = 0, resident = 0;
        for (; i + 8 <= n; i += 8) {
            uint64_t word;
            memcpy(&word, vec + i, 8);
            resident += (uint64_t)__builtin_popcountll(word & 0x0101010101010101ULL);
        }
        for (; i < n; i++)
            resident += vec[i] & 1;
        missing += n - resident;
        done += n;
    }
    free(vec);
    if (!ret)
        *missing_out = missing;
    return ret;
}

int ub_lock(uint64_t addr, uint64_t size, uint64_t *missing_out, int *step_out)
{
    int ret = check_span(addr, size);
    if (ret)
        return ret;
    void *p = as_ptr(addr);
    /* Lock-on-fault plus MADV_POPULATE_WRITE walks the span once and faults
     * every page in writable, as the write pin that follows wants them.
     * mlock() would populate a shared mapping with read faults; on tmpfs with
     * 4 KiB pages that measured a third slower (Linux 6.18), and the same
     * otherwise.  MADV_POPULATE_WRITE also reports failure (EFAULT where a
     * fault would raise SIGBUS, ENOMEM), which MAP_POPULATE does not. */
    *step_out = 1;
    if (mlock2(p, size, MLOCK_ONFAULT) == 0) {
        *step_out = 2;
        if (madvise(p, size, MADV_POPULATE_WRITE) == 0)
            goto verify;
        if (errno != EINVAL) /* EINVAL: kernel older than 5.14 */
            ret = -errno;
    } else if (errno != EINVAL && errno != ENOSYS) { /* kernel older than 4.4 */
        ret = -errno;
    }
    if (!ret) {
        *step_out = 3;
        if (mlock(p, size))
            ret = -errno;
    }
verify:;
    /* mlock() and MAP_POPULATE can leave pages behind without saying so; count
     * what is really there, also after a failure, for the error message. */
    uint64_t missing = 0;
    int counted = ub_count_missing(addr, size, &missing);
    *missing_out = counted ? size / page_size() : missing;
    if (ret)
        return ret;
    return counted;
}

int ub_advise(uint64_t addr, uint64_t size, unsigned int flags, unsigned int *failed_out)
{
    static const struct {
        unsigned int flag;
        int advice;
    } table[] = {
        {UB_ADVISE_NOHUGEPAGE, MADV_NOHUGEPAGE},
        {UB_ADVISE_HUGEPAGE, MADV_HUGEPAGE},
        {UB_ADVISE_DONTDUMP, MADV_DONTDUMP},
        {UB_ADVISE_DONTFORK, MADV_DONTFORK},
    };
    int ret = check_span(addr, size);
    if (ret)
        return ret;
    *failed_out = 0;
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) {
        if (!(flags & table[i].flag))
            continue;
        if (madvise(as_ptr(addr), size, table[i].advice)) {
            *failed_out = table[i].flag;
            return -errno;
        }
    }
    return 0;
}

int ub_pin(uint64_t addr, uint64_t size, uint64_t buffer_size, int *ring_fd_out,
           int *stage_out)
{
    int ret = check_span(addr, size);
    if (ret)
        return ret;
    /* One fixed buffer per buffer_size bytes (io_uring's limit is 1 GiB). */
    if (buffer_size == 0 || buffer_size > IOURING_MAX_BUFFER || buffer_size % page_size())
        return -EINVAL;
    uint64_t n = size / buffer_size + (size % buffer_size != 0);
    if (n > IOURING_MAX_BUFFERS)
        return -E2BIG;

    /* The smallest ring there is: it never carries I/O, it only owns the pin. */
    *stage_out = UB_PIN_STAGE_SETUP;
    struct io_uring_params params;
    memset(&params, 0, sizeof params);
    int ring = (int)syscall(__NR_io_uring_setup, 1, &params);
    if (ring < 0)
        return -errno;

    *stage_out = UB_PIN_STAGE_REGISTER;
    struct iovec small[16];
    struct iovec *iov = n <= 16 ? small : calloc(n, sizeof *iov);
    if (!iov) {
        close(ring);
        return -ENOMEM;
    }
    for (uint64_t i = 0; i < n; i++) {
        uint64_t off = i * buffer_size;
        iov[i].iov_base = as_ptr(addr + off);
        iov[i].iov_len = size - off < buffer_size ? size - off : buffer_size;
    }
    long rc;
    do
        rc = syscall(__NR_io_uring_register, ring, IORING_REGISTER_BUFFERS, iov, (unsigned)n);
    while (rc < 0 && errno == EINTR);
    ret = rc < 0 ? -errno : 0;
    if (iov != small)
        free(iov);
    if (ret) {
        close(ring);
        return ret;
    }
    *ring_fd_out = ring;
    return 0;
}

int ub_unpin(int ring_fd)
{
    long rc;
    /* Unregister first: it drops the pins now, while the teardown that close()
     * starts runs later from a kernel worker.  ENXIO means nothing was
     * registered; any other failure (EBADF, or EOPNOTSUPP for an fd that is
     * not a ring) leaves the fd alone: it may be somebody else's. */
    do
        rc = syscall(__NR_io_uring_register, ring_fd, IORING_UNREGISTER_BUFFERS, NULL, 0);
    while (rc < 0 && errno == EINTR);
    if (rc < 0 && errno != ENXIO)
        return -errno;
    if (close(ring_fd) && errno != EINTR)
        return -errno;
    return 0;
}

/* Duplicate another process's fd into this one.  The way for a holder process
 * to take over a ring: Linux refuses io_uring fds in SCM_RIGHTS messages
 * (EINVAL, since 6.7 and in the stable kernels that took the CVE-2023-6531
 * fix), while pidfd_getfd() (5.6+) is not restricted.  Needs ptrace access
 * to `pid`.  Returns the errno of pidfd_open as is, and of pidfd_getfd as is. */
int ub_take_fd(int pid, int fd, int *fd_out)
{
    int pidfd = (int)syscall(__NR_pidfd_open, pid, 0);
    if (pidfd < 0)
        return -errno;
    int got = (int)syscall(__NR_pidfd_getfd, pidfd, fd, 0);
    int ret = got < 0 ? -errno : 0;
    close(pidfd);
    if (!ret)
        *fd_out = got;
    return ret;
}

/*
 * The pagemap scan.  `starts`/`counts` (runs) and `pfns` are each optional;
 * the two public wrappers below pass constants, so the compiler builds one
 * lean loop for each.
 */
static inline __attribute__((always_inline)) int
scan_pagemap(uint64_t addr, uint64_t size, uint64_t *starts, uint64_t *counts,
             uint64_t max_runs, uint64_t *pfns, struct ub_scan *scan)
{
    int ret = check_span(addr, size);
    if (ret)
        return ret;
    uint64_t psize = page_size();
    uint64_t pages = size / psize;
    memset(scan, 0, sizeof *scan);
    scan->pages = pages;
    scan->first_bad = UINT64_MAX;

    int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    uint64_t batch = pages < PAGEMAP_BATCH ? pages : PAGEMAP_BATCH;
    uint64_t *buf = malloc(batch * sizeof *buf);
    if (!buf) {
        close(fd);
        return -ENOMEM;
    }

    uint64_t first_page = addr / psize;
    uint64_t runs = 0, run_start = 0, run_end = 0; /* run_end == 0: no open run */
    uint64_t missing = 0, hidden = 0, first_bad = UINT64_MAX;
    for (uint64_t done = 0; done < pages && !ret;) {
        uint64_t n = pages - done < batch ? pages - done : batch;
        uint64_t got = 0;
        while (got < n * sizeof *buf) {
            ssize_t r = pread(fd, (char *)buf + got, n * sizeof *buf - got,
                              (off_t)((first_page + done) * sizeof *buf + got));
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0) {
                ret = r < 0 ? -errno : -EIO;
                break;
            }
            got += (uint64_t)r;
        }
        if (ret)
            break;
        for (uint64_t i = 0; i < n; i++) {
            uint64_t e = buf[i];
            uint64_t pfn = e & PM_PFN_MASK;
            if (__builtin_expect((e & (PM_PRESENT | PM_SWAP)) != PM_PRESENT || pfn == 0, 0)) {
                if ((e & (PM_PRESENT | PM_SWAP)) != PM_PRESENT)
                    missing++;
                else
                    hidden++;
                if (first_bad == UINT64_MAX)
                    first_bad = done + i;
                continue;
            }
            if (pfns)
                pfns[done + i] = pfn;
            if (starts) {
                if (pfn == run_end) {
                    run_end++;
                } else {
                    if (run_end) {
                        if (runs == max_runs) {
                            ret = -ENOSPC;
                            break;
                        }
                        starts[runs] = run_start;
                        counts[runs] = run_end - run_start;
                        runs++;
                    }
                    run_start = pfn;
                    run_end = pfn + 1;
                }
            }
        }
        done += n;
    }
    if (starts && !ret && run_end) {
        if (runs == max_runs) {
            ret = -ENOSPC;
        } else {
            starts[runs] = run_start;
            counts[runs] = run_end - run_start;
            runs++;
        }
    }
    free(buf);
    close(fd);
    scan->runs = runs;
    scan->missing = missing;
    scan->hidden = hidden;
    scan->first_bad = first_bad;
    return ret;
}

/* Sort runs by start (LSD radix sort, 11-bit digits, as many passes as the
 * largest start needs: three for 32 GiB of RAM), then merge runs that touch.
 * The buddy allocator hands out neighbouring frames in either direction, so
 * address order gives many short runs that merge once sorted.  Returns the
 * number of ranges left, -EEXIST if two runs overlap (a frame mapped twice
 * in the span), or -ENOMEM. */
static int64_t sort_and_merge(uint64_t *starts, uint64_t *counts, uint64_t n)
{
    if (n <= 1)
        return (int64_t)n;
    int sorted = 1;
    uint64_t max_start = starts[0];
    for (uint64_t i = 1; i < n; i++) {
        if (starts[i] < starts[i - 1])
            sorted = 0;
        if (starts[i] > max_start)
            max_start = starts[i];
    }
    if (!sorted) {
        enum { DIGIT_BITS = 11, BUCKETS = 1 << DIGIT_BITS };
        uint64_t *spare_starts = malloc(n * sizeof *starts);
        uint64_t *spare_counts = malloc(n * sizeof *counts);
        uint64_t *hist = malloc(BUCKETS * sizeof *hist);
        if (!spare_starts || !spare_counts || !hist) {
            free(spare_starts);
            free(spare_counts);
            free(hist);
            return -ENOMEM;
        }
        uint64_t *src_s = starts, *src_c = counts, *dst_s = spare_starts, *dst_c = spare_counts;
        for (unsigned shift = 0; shift < 64 && (max_start >> shift); shift += DIGIT_BITS) {
            memset(hist, 0, BUCKETS * sizeof *hist);
            for (uint64_t i = 0; i < n; i++)
                hist[(src_s[i] >> shift) & (BUCKETS - 1)]++;
            uint64_t sum = 0;
            for (unsigned b = 0; b < BUCKETS; b++) {
                uint64_t here = hist[b];
                hist[b] = sum;
                sum += here;
            }
            for (uint64_t i = 0; i < n; i++) {
                uint64_t pos = hist[(src_s[i] >> shift) & (BUCKETS - 1)]++;
                dst_s[pos] = src_s[i];
                dst_c[pos] = src_c[i];
            }
            uint64_t *t = src_s; src_s = dst_s; dst_s = t;
            t = src_c; src_c = dst_c; dst_c = t;
        }
        if (src_s != starts) {
            memcpy(starts, src_s, n * sizeof *starts);
            memcpy(counts, src_c, n * sizeof *counts);
        }
        free(spare_starts);
        free(spare_counts);
        free(hist);
    }
    uint64_t out = 0;
    for (uint64_t i = 1; i < n; i++) {
        uint64_t end = starts[out] + counts[out];
        if (starts[i] == end) {
            counts[out] += counts[i];
        } else if (starts[i] < end) {
            return -EEXIST;
        } else {
            out++;
            starts[out] = starts[i];
            counts[out] = counts[i];
        }
    }
    return (int64_t)(out + 1);
}

int ub_read_ranges(uint64_t addr, uint64_t size, uint64_t *starts, uint64_t *counts,
                   uint64_t max_runs, struct ub_scan *scan)
{
    if (!starts || !counts)
        return -EINVAL;
    int ret = scan_pagemap(addr, size, starts, counts, max_runs, NULL, scan);
    if (ret || scan->missing || scan->hidden)
        return ret;
    int64_t ranges = sort_and_merge(starts, counts, scan->runs);
    if (ranges < 0)
        return (int)ranges;
    scan->runs = (uint64_t)ranges;
    return 0;
}

int ub_read_pfns(uint64_t addr, uint64_t size, uint64_t *pfns, struct ub_scan *scan)
{
    if (!pfns)
        return -EINVAL;
    return scan_pagemap(addr, size, NULL, NULL, 0, pfns, scan);
}

int ub_release(uint64_t addr, uint64_t size)
{
    int ret = check_span(addr, size);
    if (ret)
        return ret;
    /* munmap() unlocks as it unmaps (the folios leave the unevictable list
     * with their last locked mapping); a separate munlock() walk first costs
     * up to twice as long on tmpfs chunks and changes nothing. */
    if (munmap(as_ptr(addr), size))
        return -errno;
    return 0;
}

int64_t ub_move_pages(int pid, uint64_t count, const uint64_t *addrs, const int *nodes,
                      int *status)
{
#ifdef __NR_move_pages
    long rc = syscall(__NR_move_pages, pid, (unsigned long)count, (void **)addrs, nodes,
                      status, nodes ? MPOL_MF_MOVE : 0);
    return rc < 0 ? -errno : rc;
#else
    (void)pid; (void)count; (void)addrs; (void)nodes; (void)status;
    return -ENOSYS;
#endif
}


/* ---- host side: freeing a guest's RAM file --------------------------------- */

int ub_punch_holes(int fd, uint64_t count, const uint64_t *offsets, const uint64_t *lengths,
                   uint64_t *done_out)
{
    uint64_t i;

    *done_out = 0;
    for (i = 0; i < count; i++) {
        if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offsets[i],
                      (off_t)lengths[i]) != 0)
            return -errno;
        *done_out = i + 1;
    }
    return 0;
}

int ub_ranges_with_data(int fd, uint64_t count, const uint64_t *offsets,
                        const uint64_t *lengths, uint8_t *has_data)
{
    uint64_t i;

    for (i = 0; i < count; i++) {
        off_t next = lseek(fd, (off_t)offsets[i], SEEK_DATA);

        if (next < 0) {
            if (errno != ENXIO) /* ENXIO: no data from here to the end of the file */
                return -errno;
            has_data[i] = 0;
            continue;
        }
        has_data[i] = (uint64_t)next < offsets[i] + lengths[i];
    }
    return 0;
}
