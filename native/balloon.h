/*
 * balloon.h - the C side of uballoon's native core (see balloon.c).
 *
 * Every function returns 0 (or a count, where documented) on success and a
 * negative errno on failure; results come back through out-parameters.  None
 * of them takes the GIL or allocates anything the caller must free.
 *
 * native/build.py hands the text between the two "cdef" markers to cffi's
 * cdef() verbatim, so that part must stay plain C declarations: no
 * preprocessor lines, no inline code.
 */
#ifndef UBALLOON_BALLOON_H
#define UBALLOON_BALLOON_H

#include <stdint.h>

/* ---- cdef begin ---- */

/* Bits for ub_advise(); several may be combined in one call. */
enum {
    UB_ADVISE_DONTDUMP = 1,    /* MADV_DONTDUMP: leave the chunk out of core dumps */
    UB_ADVISE_NOHUGEPAGE = 2,  /* MADV_NOHUGEPAGE: no THP, and khugepaged keeps off */
    UB_ADVISE_HUGEPAGE = 4,    /* MADV_HUGEPAGE: THP wanted (THP "madvise" mode) */
    UB_ADVISE_DONTFORK = 8     /* MADV_DONTFORK: a fork() does not copy the chunk */
};

/* Where ub_pin() failed. */
enum {
    UB_PIN_STAGE_SETUP = 1,     /* io_uring_setup() */
    UB_PIN_STAGE_REGISTER = 2   /* io_uring_register(IORING_REGISTER_BUFFERS) */
};

/* Outcome of one scan of /proc/self/pagemap over a span. */
struct ub_scan {
    uint64_t pages;      /* entries scanned (pages in the span) */
    uint64_t runs;       /* ranges written by ub_read_ranges() */
    uint64_t missing;    /* entries not present in RAM (not mapped, or swapped) */
    uint64_t hidden;     /* present entries whose PFN reads 0 (no CAP_SYS_ADMIN) */
    uint64_t first_bad;  /* index of the first missing/hidden entry, UINT64_MAX if none */
};

uint64_t ub_page_size(void);

int ub_map_anonymous(uint64_t size, int huge, uint64_t *addr_out);
int ub_map_shared(int fd, uint64_t size, uint64_t offset, int huge, uint64_t *addr_out);
int ub_lock(uint64_t addr, uint64_t size, uint64_t *missing_out, int *step_out);
int ub_count_missing(uint64_t addr, uint64_t size, uint64_t *missing_out);
int ub_advise(uint64_t addr, uint64_t size, unsigned int flags, unsigned int *failed_out);
int ub_pin(uint64_t addr, uint64_t size, uint64_t buffer_size, int *ring_fd_out,
           int *stage_out);
int ub_unpin(int ring_fd);
int ub_take_fd(int pid, int fd, int *fd_out);
/* The span's frames as ranges (start, count), sorted by start, disjoint and
 * not touching; -EEXIST if a frame appears twice.  Unchecked pages (missing or
 * hidden, see struct ub_scan) leave the arrays unspecified. */
int ub_read_ranges(uint64_t addr, uint64_t size, uint64_t *starts, uint64_t *counts,
                   uint64_t max_runs, struct ub_scan *scan);
/* Every page's PFN in address order. */
int ub_read_pfns(uint64_t addr, uint64_t size, uint64_t *pfns, struct ub_scan *scan);
int ub_release(uint64_t addr, uint64_t size);
int64_t ub_move_pages(int pid, uint64_t count, const uint64_t *addrs, const int *nodes,
                      int *status);
/* Host side: fallocate(PUNCH_HOLE | KEEP_SIZE) every byte range of a RAM file.
 * *done_out counts the ranges punched before a failure. */
int ub_punch_holes(int fd, uint64_t count, const uint64_t *offsets, const uint64_t *lengths,
                   uint64_t *done_out);
/* Host side: has_data[i] = 1 if any byte of range i is allocated (SEEK_DATA). */
int ub_ranges_with_data(int fd, uint64_t count, const uint64_t *offsets,
                        const uint64_t *lengths, uint8_t *has_data);

/* ---- cdef end ---- */

#endif /* UBALLOON_BALLOON_H */
