/* blkzero DEVICE OFFSET LENGTH: zeroes a byte range of a block device with BLKZEROOUT, which
 * the kernel turns into WRITE_ZEROES requests when the device offers them. Busybox has no
 * equivalent. Exits 0 on success, 1 with the error on failure. */
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
    if (argc != 4) {
        fprintf(stderr, "usage: blkzero DEVICE OFFSET LENGTH\n");
        return 2;
    }
    int fd = open(argv[1], O_WRONLY);
    if (fd < 0) {
        fprintf(stderr, "blkzero: open %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    uint64_t range[2] = {strtoull(argv[2], NULL, 0), strtoull(argv[3], NULL, 0)};
    if (ioctl(fd, BLKZEROOUT, range) != 0) {
        fprintf(stderr, "blkzero: BLKZEROOUT: %s\n", strerror(errno));
        return 1;
    }
    close(fd);
    return 0;
}
