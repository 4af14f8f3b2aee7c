/* blkzero DEVICE OFFSET LENGTH [punch]: zeroes a byte range of a block device. Plain, it uses
 * BLKZEROOUT, which the kernel sends as WRITE_ZEROES without UNMAP; with "punch" it uses
 * fallocate(PUNCH_HOLE), sent as WRITE_ZEROES with UNMAP. Busybox has neither. Exits 0 on
 * success, 1 with the error on failure. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <sys/ioctl.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 4 && !(argc == 5 && strcmp(argv[4], "punch") == 0)) {
        fprintf(stderr, "usage: blkzero DEVICE OFFSET LENGTH [punch]\n");
        return 2;
    }
    int fd = open(argv[1], O_WRONLY);
    if (fd < 0) {
        fprintf(stderr, "blkzero: open %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    uint64_t range[2] = {strtoull(argv[2], NULL, 0), strtoull(argv[3], NULL, 0)};
    if (argc == 5) {
        if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)range[0],
                      (off_t)range[1]) != 0) {
            fprintf(stderr, "blkzero: fallocate(PUNCH_HOLE): %s\n", strerror(errno));
            return 1;
        }
    } else if (ioctl(fd, BLKZEROOUT, range) != 0) {
        fprintf(stderr, "blkzero: BLKZEROOUT: %s\n", strerror(errno));
        return 1;
    }
    close(fd);
    return 0;
}
