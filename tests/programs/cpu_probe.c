/* What the sandbox's CPU limits leave a payload, for tests/test_cpu_limits.py.
 *   cpu_probe affinity      asks for every CPU (sched_setaffinity), prints "allowed N"
 *                           with the number it then has (sched_getaffinity)
 *   cpu_probe burn SECONDS  spins for SECONDS of wall-clock time and prints "share X":
 *                           the CPU time it got over the wall-clock time */
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double seconds(clockid_t clock) {
    struct timespec now;
    clock_gettime(clock, &now);
    return (double)now.tv_sec + (double)now.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc == 2 && strcmp(argv[1], "affinity") == 0) {
        cpu_set_t every;
        CPU_ZERO(&every);
        for (int cpu = 0; cpu < CPU_SETSIZE; cpu++) CPU_SET(cpu, &every);
        /* The kernel keeps what it may of the mask; the call fails only if that is nothing. */
        int result = sched_setaffinity(0, sizeof every, &every);
        cpu_set_t allowed;
        sched_getaffinity(0, sizeof allowed, &allowed);
        printf("setaffinity %d\nallowed %d\n", result, CPU_COUNT(&allowed));
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "burn") == 0) {
        double duration = atof(argv[2]);
        double wall_start = seconds(CLOCK_MONOTONIC), cpu_start = seconds(CLOCK_PROCESS_CPUTIME_ID);
        volatile unsigned long spins = 0;
        while (seconds(CLOCK_MONOTONIC) - wall_start < duration) spins++;
        double wall = seconds(CLOCK_MONOTONIC) - wall_start;
        printf("share %.3f\n", (seconds(CLOCK_PROCESS_CPUTIME_ID) - cpu_start) / wall);
        return 0;
    }
    fprintf(stderr, "usage: cpu_probe affinity | cpu_probe burn SECONDS\n");
    return 2;
}
