/* Calls system calls the sandbox denies, and some it allows, and prints one line for each:
 * "<name> <result>", the result being "ok" or the errno's name (e.g. EPERM). Used by
 * tests/test_seccomp.py, in the manner of Flatpak's tests/test-seccomp.sh. Arguments are
 * chosen so that each call would succeed, or fail with another errno, without the filter. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/sched.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/personality.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#ifndef AF_VSOCK
#define AF_VSOCK 40
#endif
#ifndef AF_ALG
#define AF_ALG 38
#endif
#define NETLINK_ROUTE 0
#define NETLINK_AUDIT 9

static void report(const char *name, long result) {
    if (result < 0)
        printf("%s %s\n", name, strerrorname_np(errno));
    else
        printf("%s ok\n", name);
}

/* A direct system call, so that the C library's wrappers change nothing. */
#define CALL(name, ...) report(name, syscall(__VA_ARGS__))

static void *thread_main(void *arg) { return arg; }

static int pid1_state(void) {
    char buf[256];
    int fd = open("/proc/1/stat", O_RDONLY);
    ssize_t n = fd < 0 ? -1 : read(fd, buf, sizeof buf - 1);
    if (fd >= 0) close(fd);
    if (n <= 0) return '?';
    buf[n] = 0;
    char *end = strrchr(buf, ')');
    return end && end[1] && end[2] ? end[2] : '?';
}

#if defined(__x86_64__)
/* An i386 system call from this 64-bit process (int 0x80): the kernel numbers them
 * differently, and a filter that knows only the x86_64 ABI lets them through. */
static long ia32_call(long nr, long a, long b, long c) {
    long result;
    __asm__ volatile("int $0x80" : "=a"(result) : "a"(nr), "b"(a), "c"(b), "d"(c) : "memory");
    return result;
}

static void ia32_report(const char *name, long result) {
    if (result < 0 && result > -4096)
        printf("%s %s\n", name, strerrorname_np((int)-result));
    else
        printf("%s ok\n", name);
}
#endif

int main(void) {
    char byte = 'x';
    static char buffer[64];
    struct iovec local = {buffer, sizeof buffer}, remote = {buffer, sizeof buffer};

    setvbuf(stdout, NULL, _IOLBF, 0); /* each line out at once, should the run hang */

    /* Denied. */
    CALL("io_uring_setup", SYS_io_uring_setup, 1, NULL);
    CALL("perf_event_open", SYS_perf_event_open, NULL, 0, -1, -1, 0);
    CALL("keyctl", SYS_keyctl, 0 /* KEYCTL_GET_KEYRING_ID */, -3 /* session */, 0);
    CALL("add_key", SYS_add_key, "user", "probe", "x", 1, -3);
    CALL("request_key", SYS_request_key, "user", "probe", NULL, 0);
    CALL("userfaultfd", SYS_userfaultfd, 1 /* UFFD_USER_MODE_ONLY */);
    CALL("bpf", SYS_bpf, 0, NULL, 0);
    CALL("syslog", SYS_syslog, 10 /* SYSLOG_ACTION_SIZE_BUFFER */, NULL, 0);
    CALL("socket_vsock", SYS_socket, AF_VSOCK, SOCK_STREAM, 0);
    CALL("socket_alg", SYS_socket, AF_ALG, SOCK_SEQPACKET, 0);
    CALL("socket_packet", SYS_socket, AF_PACKET, SOCK_DGRAM, 0);
    CALL("socket_netlink_audit", SYS_socket, AF_NETLINK, SOCK_RAW, NETLINK_AUDIT);
    CALL("socket_unix_high_bits", SYS_socket, (1UL << 32) | AF_UNIX, SOCK_STREAM, 0);
    CALL("ioctl_tiocsti", SYS_ioctl, 0, TIOCSTI, &byte);
    CALL("ioctl_tiocsti_high_bits", SYS_ioctl, 0, (1UL << 32) | TIOCSTI, &byte);
    CALL("ioctl_tioclinux", SYS_ioctl, 0, TIOCLINUX, &byte);
    CALL("unshare_user", SYS_unshare, CLONE_NEWUSER);
    CALL("unshare_net", SYS_unshare, CLONE_NEWNET);
    CALL("setns", SYS_setns, 0, 0);
    CALL("clone_newnet", SYS_clone, CLONE_NEWNET | SIGCHLD, 0, 0, 0, 0);
    CALL("clone_newpid", SYS_clone, CLONE_NEWPID | SIGCHLD, 0, 0, 0, 0);
    CALL("clone3", SYS_clone3, NULL, 0);
    CALL("mount", SYS_mount, "none", "/tmp", "tmpfs", 0, NULL);
    CALL("umount2", SYS_umount2, "/tmp", 0);
    CALL("pivot_root", SYS_pivot_root, "/tmp", "/tmp");
    CALL("chroot", SYS_chroot, "/");
    CALL("fsopen", SYS_fsopen, "tmpfs", 0);
    CALL("open_tree", SYS_open_tree, AT_FDCWD, "/tmp", 1 /* OPEN_TREE_CLONE */);
    CALL("mount_setattr", SYS_mount_setattr, AT_FDCWD, "/tmp", 0, NULL, 0);
    CALL("personality_bsd", SYS_personality, 0x0006 /* PER_BSD */);
    CALL("personality_query", SYS_personality, 0xffffffffUL);
    CALL("ptrace_attach_pid1", SYS_ptrace, PTRACE_ATTACH, 1, 0, 0);
    CALL("ptrace_traceme", SYS_ptrace, PTRACE_TRACEME, 0, 0, 0);
    CALL("process_vm_readv_pid1", SYS_process_vm_readv, 1, &local, 1, &remote, 1, 0);
    CALL("process_vm_writev_self", SYS_process_vm_writev, getpid(), &local, 1, &remote, 1, 0);
    int pidfd = (int)syscall(SYS_pidfd_open, 1, 0);
    CALL("pidfd_getfd_pid1", SYS_pidfd_getfd, pidfd, 0, 0);
    CALL("kcmp", SYS_kcmp, getpid(), getpid(), 0 /* KCMP_FILE */, 0, 0);
    report("open_pid1_mem", open("/proc/1/mem", O_RDWR));
    report("open_pid1_task_mem", open("/proc/1/task/1/mem", O_RDWR));

    /* Signals to pid 1 are accepted and dropped: it stays running. */
    report("kill_stop_pid1", kill(1, SIGSTOP));
    usleep(100000);
    printf("pid1_state %c\n", pid1_state());

    /* Allowed. */
    int fds[2];
    report("pipe", pipe(fds));
    report("write", write(fds[1], "x", 1));
    void *map = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    report("mmap", map == MAP_FAILED ? -1 : 0);
    pthread_t thread;
    int error = pthread_create(&thread, NULL, thread_main, NULL);
    if (error == 0) error = pthread_join(thread, NULL);
    errno = error;
    report("thread", error ? -1 : 0);
    pid_t child = fork();
    if (child == 0) _exit(7);
    int status = 0;
    report("fork", child < 0 || waitpid(child, &status, 0) != child || WEXITSTATUS(status) != 7
                       ? -1 : 0);
    CALL("socket_unix", SYS_socket, AF_UNIX, SOCK_STREAM, 0);
    CALL("socket_inet", SYS_socket, AF_INET, SOCK_STREAM, 0);
    CALL("socket_inet6", SYS_socket, AF_INET6, SOCK_DGRAM, 0);
    CALL("socket_netlink_route", SYS_socket, AF_NETLINK, SOCK_RAW, NETLINK_ROUTE);
    CALL("personality_sandbox", SYS_personality, 0x0040000 /* ADDR_NO_RANDOMIZE */);
    CALL("pidfd_open_pid1", SYS_pidfd_open, 1, 0);

#if defined(__x86_64__)
    /* The i386 ABI: getpid (20) tells whether this kernel runs 32-bit calls at all. */
    if (ia32_call(20, 0, 0, 0) == getpid()) {
        ia32_report("ia32_ptrace_attach_pid1", ia32_call(26, PTRACE_ATTACH, 1, 0));
        ia32_report("ia32_unshare_net", ia32_call(310, CLONE_NEWNET, 0, 0));
        ia32_report("ia32_io_uring_setup", ia32_call(425, 1, 0, 0));
        ia32_report("ia32_socket_vsock", ia32_call(359, AF_VSOCK, SOCK_STREAM, 0));
        /* socketcall's arguments are in memory (below 4 GiB: a static, non-PIE binary). */
        static unsigned int socket_args[3] = {AF_VSOCK, SOCK_STREAM, 0};
        ia32_report("ia32_socketcall_vsock", ia32_call(102, 1 /* SYS_SOCKET */,
                                                       (long)(uintptr_t)socket_args, 0));
        ia32_report("ia32_keyctl", ia32_call(288, 0, -3, 0));
        ia32_report("ia32_getppid", ia32_call(64, 0, 0, 0));
    } else {
        printf("ia32 unsupported\n");
    }
#endif
    return 0;
}
