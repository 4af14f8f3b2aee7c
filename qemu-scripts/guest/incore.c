/* incore DEVICE OFFSET LENGTH: prints how many pages of the byte range of DEVICE are in the
 * page cache (mincore on a shared read-only mapping: it reads nothing, so it never fills the
 * cache it looks at). OFFSET is a multiple of the page size. Busybox has no fincore. Exits 0
 * on success, 1 with the error on failure. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: incore DEVICE OFFSET LENGTH\n");
        return 2;
    }
    off_t off = (off_t)strtoull(argv[2], NULL, 0);
    size_t len = (size_t)strtoull(argv[3], NULL, 0);
    long page = sysconf(_SC_PAGESIZE);
    int fd = open(argv[1], O_RDONLY);
    if (fd < 0) {
        fprintf(stderr, "incore: open %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    void *map = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, off);
    if (map == MAP_FAILED) {
        fprintf(stderr, "incore: mmap: %s\n", strerror(errno));
        return 1;
    }
    size_t pages = (len + (size_t)page - 1) / (size_t)page;
    unsigned char *vec = malloc(pages);
    if (!vec || mincore(map, len, vec) != 0) {
        fprintf(stderr, "incore: mincore: %s\n", strerror(errno));
        return 1;
    }
    size_t n = 0;
    for (size_t i = 0; i < pages; i++)
        n += vec[i] & 1;
    printf("%zu\n", n);
    return 0;
}
