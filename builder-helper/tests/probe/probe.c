/* A static probe run as a builder (or by one) inside the build sandbox. Each mode tries one
 * thing the sandbox must refuse and says what happened on stdout:
 *   "done"          the attempt succeeded (the defence did not hold),
 *   "refused <n>"   it failed with errno n.
 * Exit status: 0 when done, 1 when refused, 2 on a usage error. Built by
 * tests/sandbox_probes.rs with `cc -static`.
 * `pass-fd NAME PATH` is the exception: it writes PATH, which must then be registered, so it
 * says "pass-fd: sent" or "pass-fd: refused (<reason>)" and exits 0 either way. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stddef.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <unistd.h>

static int report(int rc) {
    if (rc == 0) {
        printf("done\n");
        return 0;
    }
    printf("refused %d\n", errno);
    return 1;
}

static int child_exit(void *arg) {
    (void) arg;
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    const char *mode = argv[1];
    const char *arg = argc > 2 ? argv[2] : "";

    if (!strcmp(mode, "io_uring")) {
        /* io_uring_setup(1, params): a descriptor means io_uring is reachable. */
        char params[120];
        memset(params, 0, sizeof params);
        long fd = syscall(__NR_io_uring_setup, 1, params);
        return report(fd >= 0 ? 0 : -1);
    }
    if (!strcmp(mode, "setxattr")) {
        return report(setxattr(arg, "user.stockade", "x", 1, 0));
    }
    if (!strcmp(mode, "acl")) {
        /* A minimal POSIX ACL (version 2, user::rw-, group::r--, other::r--). */
        unsigned char acl[4 + 3 * 8] = {2, 0, 0, 0};
        unsigned short tags[3] = {0x01, 0x04, 0x20};
        unsigned short perms[3] = {6, 4, 4};
        for (int i = 0; i < 3; i++) {
            unsigned char *e = acl + 4 + i * 8;
            memcpy(e, &tags[i], 2);
            memcpy(e + 2, &perms[i], 2);
            memset(e + 4, 0xff, 4);
        }
        return report(setxattr(arg, "system.posix_acl_access", acl, sizeof acl, 0));
    }
    if (!strcmp(mode, "unshare-user")) {
        return report(unshare(CLONE_NEWUSER));
    }
    if (!strcmp(mode, "clone-user")) {
        static char stack[64 * 1024];
        pid_t pid = clone(child_exit, stack + sizeof stack, CLONE_NEWUSER | SIGCHLD, NULL);
        if (pid < 0) return report(-1);
        waitpid(pid, NULL, 0);
        return report(0);
    }
    if (!strcmp(mode, "mknod")) {
        return report(mknod(arg, S_IFCHR | 0666, makedev(1, 3)));
    }
    if (!strcmp(mode, "setuid")) {
        return report(chmod(arg, 04755));
    }
    if (!strcmp(mode, "setgid")) {
        return report(chmod(arg, 02755));
    }
    if (!strcmp(mode, "connect-abstract")) {
        int s = socket(AF_UNIX, SOCK_STREAM, 0);
        if (s < 0) return report(-1);
        struct sockaddr_un a;
        memset(&a, 0, sizeof a);
        a.sun_family = AF_UNIX;
        size_t n = strlen(arg);
        if (n > sizeof a.sun_path - 1) return 2;
        memcpy(a.sun_path + 1, arg, n);
        return report(connect(s, (struct sockaddr *) &a, offsetof(struct sockaddr_un, sun_path) + 1 + n));
    }
    if (!strcmp(mode, "pass-fd")) {
        /* CVE-2024-27297's shape: the output, open read-write, handed to a process outside
         * over an abstract socket, to be written after it is registered. */
        if (argc < 4) return 2;
        static const char body[] = "original\n";
        int f = open(argv[3], O_RDWR | O_CREAT | O_EXCL, 0644);
        if (f < 0 || write(f, body, sizeof body - 1) != (ssize_t) (sizeof body - 1)) return 2;
        int s = socket(AF_UNIX, SOCK_STREAM, 0);
        if (s < 0) return 2;
        struct sockaddr_un a;
        memset(&a, 0, sizeof a);
        a.sun_family = AF_UNIX;
        size_t n = strlen(arg);
        if (n > sizeof a.sun_path - 1) return 2;
        memcpy(a.sun_path + 1, arg, n);
        if (connect(s, (struct sockaddr *) &a, offsetof(struct sockaddr_un, sun_path) + 1 + n)) {
            printf("pass-fd: refused (%s)\n", strerror(errno));
            return 0;
        }
        /* One byte of data carries the descriptor (SOCK_STREAM sends no bare ancillary data). */
        char byte = 'f';
        struct iovec iov = {.iov_base = &byte, .iov_len = 1};
        union {
            struct cmsghdr h;
            char buf[CMSG_SPACE(sizeof(int))];
        } c;
        memset(&c, 0, sizeof c);
        struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = c.buf,
                           .msg_controllen = sizeof c.buf};
        struct cmsghdr *h = CMSG_FIRSTHDR(&m);
        h->cmsg_level = SOL_SOCKET;
        h->cmsg_type = SCM_RIGHTS;
        h->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(h), &f, sizeof f);
        if (sendmsg(s, &m, 0) != 1) {
            printf("pass-fd: refused (%s)\n", strerror(errno));
            return 0;
        }
        /* Stay until the receiver holds it: the build (and registration) waits for us. */
        printf(read(s, &byte, 1) == 1 ? "pass-fd: sent\n" : "pass-fd: sent (no ack)\n");
        return 0;
    }
    if (!strcmp(mode, "kill")) {
        return report(kill((pid_t) atoi(arg), SIGUSR1));
    }
    if (!strcmp(mode, "ptrace")) {
        return report(ptrace(PTRACE_ATTACH, (pid_t) atoi(arg), NULL, NULL) == 0 ? 0 : -1);
    }
    if (!strcmp(mode, "vm-read")) {
        /* One byte from the other process: the pid and permission checks come before the
         * address is looked at, so anything but ESRCH or EPERM means the process was reached. */
        char byte;
        struct iovec local = {&byte, 1}, remote = {(void *) 0x400000, 1};
        return report(process_vm_readv((pid_t) atoi(arg), &local, 1, &remote, 1, 0) == 1 ? 0 : -1);
    }
    return 2;
}
