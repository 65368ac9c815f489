/* Small helpers the engine's nogil code needs and Cython cannot spell directly. */
#ifndef SG_SYS_H
#define SG_SYS_H

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <time.h>

/* Seconds on the monotonic clock: the same clock as Python's time.monotonic(). */
static inline double sg_monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Counters written by engine threads and read by stats() in the hub, or shared by the
   threads (the pipe count). Relaxed ordering is enough, nothing is synchronised through
   them. Returns the new value, so a thread can reserve one unit and see whether it fits. */
static inline int64_t sg_add(int64_t *counter, int64_t n) {
    return __atomic_add_fetch(counter, n, __ATOMIC_RELAXED);
}

static inline int64_t sg_load(int64_t *counter) {
    return __atomic_load_n(counter, __ATOMIC_RELAXED);
}

/* errno as a function, so Cython code reads it right after the failing call. */
static inline int sg_errno(void) { return errno; }

#ifndef SIOCOUTQNSD
#define SIOCOUTQNSD 0x894B /* <linux/sockios.h>'s; not every libc's headers carry it */
#endif

/* The bytes a TCP socket holds that it has not sent yet; 0 where it cannot tell. What it
   did send travels ahead of any reset that follows, and the peer may still read it. One
   ioctl: for the rare moments that need it, never for each transfer. */
static inline int64_t sg_unsent(int fd) {
    int n = 0;
    return ioctl(fd, SIOCOUTQNSD, &n) < 0 ? 0 : n;
}

#ifndef SIOCOUTQ
#define SIOCOUTQ TIOCOUTQ /* <linux/sockios.h>'s name; not every libc's headers carry it */
#endif

/* The bytes a TCP socket holds that its peer has not acknowledged, sent or not; 0 where it
   cannot tell. It shrinks while the peer reads. One ioctl, as for sg_unsent. */
static inline int64_t sg_unacked(int fd) {
    int n = 0;
    return ioctl(fd, SIOCOUTQ, &n) < 0 ? 0 : n;
}

#ifndef SCHED_BATCH
#define SCHED_BATCH 3 /* Linux's value; glibc only names it with _GNU_SOURCE */
#endif

/* A thread to SCHED_BATCH. pthread_setschedparam, not sched_setscheduler: musl's
   sched_setscheduler is a stub that fails with ENOSYS, its pthread_setschedparam works on
   the thread (as glibc's does). Returns 0 or an error number. */
static inline int sg_batch_thread(pthread_t thread) {
    struct sched_param p = {0};
    return pthread_setschedparam(thread, SCHED_BATCH, &p);
}

/* "sg-relay-N", as top -H, ps -L and /proc/PID/task/TID/comm show a relay thread. Linux
   takes 15 characters at most; a refusal changes nothing but the name. */
static inline void sg_name_thread(pthread_t thread, int index) {
    char name[16];
    snprintf(name, sizeof name, "sg-relay-%d", index);
    pthread_setname_np(thread, name);
}

#endif
