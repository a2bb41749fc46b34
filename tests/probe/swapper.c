/* A builder's accomplice for tests/tests/build_dir_attacks.rs (V5, V9): in the current
 * directory it makes N directories d<i> (each holding a file) and N symlinks l<i> to TARGET,
 * then a detached child exchanges each pair atomically (renameat2 RENAME_EXCHANGE) in a tight
 * loop for as long as it lives, so that whoever walks the directory by name finds d<i> a
 * directory one moment and a symlink to TARGET the next (a pair someone removed is made
 * again). The parent exits once the child has
 * made one full pass. Usage: swapper TARGET N */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef RENAME_EXCHANGE
#define RENAME_EXCHANGE (1 << 1)
#endif

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    int n = atoi(argv[2]);
    if (n < 1 || n > 4096) return 2;
    char d[32], l[32];
    for (int i = 0; i < n; i++) {
        snprintf(d, sizeof d, "d%d", i);
        snprintf(l, sizeof l, "l%d", i);
        if (mkdir(d, 0755) || symlink(argv[1], l)) return 3;
        char f[48];
        snprintf(f, sizeof f, "%s/x", d);
        int fd = open(f, O_WRONLY | O_CREAT | O_EXCL, 0644);
        if (fd < 0) return 3;
        close(fd);
    }
    int p[2];
    if (pipe(p)) return 4;
    pid_t pid = fork();
    if (pid < 0) return 4;
    if (pid == 0) {
        close(p[0]);
        setsid();
        /* Holding the log pipe would keep the build's log open. */
        int null = open("/dev/null", O_RDWR);
        dup2(null, 0), dup2(null, 1), dup2(null, 2);
        for (long pass = 0;; pass++) {
            for (int i = 0; i < n; i++) {
                snprintf(d, sizeof d, "d%d", i);
                snprintf(l, sizeof l, "l%d", i);
                if (syscall(SYS_renameat2, AT_FDCWD, d, AT_FDCWD, l, RENAME_EXCHANGE)) {
                    /* Whoever walks the tree removed one of the pair: make it again. */
                    mkdir(d, 0755);
                    (void) !symlink(argv[1], l);
                }
            }
            if (pass == 0) {
                (void) !write(p[1], "r", 1);
                close(p[1]);
            }
        }
    }
    close(p[1]);
    char c;
    if (read(p[0], &c, 1) != 1) return 5;
    printf("swapper: swapping %d pairs\n", n);
    return 0;
}
