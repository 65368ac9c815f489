/* The splice floor: the least a CONNECT relay can do, as a yardstick for throughput.
 *
 * bench/peers.py compiles and runs this beside the proxies so that one run says how close
 * splicegate's native engine comes to what the kernel allows a relay on this machine: no
 * policy, no DNS, no timeouts, no accounting, no event loop. A connection gets a thread;
 * the head must name an IPv4 literal; then each direction is a thread of its own that
 * moves bytes socket -> pipe -> socket with blocking splice(2) and a 1 MiB pipe (the same
 * size the native engine asks for), and passes EOF on with shutdown(SHUT_WR).
 *
 * It is not a proxy: it answers 400 or 502 for anything it cannot do and nothing else, and
 * its thread per connection is not how anyone should take thousands of them. peers.py
 * therefore measures it in the throughput parts only.
 *
 * usage: floor PORT    (listens on 127.0.0.1:PORT; loopback only)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define PIPE_SIZE (1 << 20)
#define HEAD_MAX 8192

static const char ESTABLISHED[] = "HTTP/1.1 200 Connection established\r\n\r\n";
static const char BAD_REQUEST[] = "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n";
static const char BAD_GATEWAY[] = "HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n";

struct direction {
    int src, dst;
};

static void answer(int fd, const char *text) { send(fd, text, strlen(text), MSG_NOSIGNAL); }

/* Moves one direction until EOF or an error, then half-closes the destination. */
static void *pump(void *arg) {
    struct direction *d = arg;
    int pipefd[2];
    if (pipe2(pipefd, O_CLOEXEC) == 0) {
        fcntl(pipefd[1], F_SETPIPE_SZ, PIPE_SIZE); /* a smaller pipe still works */
        for (;;) {
            ssize_t n = splice(d->src, NULL, pipefd[1], NULL, PIPE_SIZE, SPLICE_F_MOVE);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                break;
            while (n > 0) {
                ssize_t m = splice(pipefd[0], NULL, d->dst, NULL, n, SPLICE_F_MOVE);
                if (m < 0 && errno == EINTR)
                    continue;
                if (m <= 0)
                    goto out;
                n -= m;
            }
        }
    out:
        close(pipefd[0]);
        close(pipefd[1]);
    }
    shutdown(d->dst, SHUT_WR);
    return NULL;
}

/* Reads the head (nothing past it may follow: the client waits for the 200), dials the
 * IPv4 literal it names, answers 200 and relays until both directions ended. */
static void *serve(void *arg) {
    int client = (int)(long)arg, origin = -1, one = 1;
    char head[HEAD_MAX + 1];
    size_t len = 0;
    for (;;) {
        ssize_t n = recv(client, head + len, HEAD_MAX - len, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            goto done;
        len += (size_t)n;
        head[len] = '\0';
        if (strstr(head, "\r\n\r\n"))
            break;
        if (len == HEAD_MAX) {
            answer(client, BAD_REQUEST);
            goto done;
        }
    }
    char host[16];
    unsigned port;
    struct sockaddr_in to = {.sin_family = AF_INET};
    if (sscanf(head, "CONNECT %15[0-9.]:%u HTTP/1.", host, &port) != 2 || port == 0 ||
        port > 65535 || inet_pton(AF_INET, host, &to.sin_addr) != 1) {
        answer(client, BAD_REQUEST);
        goto done;
    }
    to.sin_port = htons((unsigned short)port);
    origin = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (origin < 0 || connect(origin, (struct sockaddr *)&to, sizeof to) < 0) {
        answer(client, BAD_GATEWAY);
        goto done;
    }
    setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(origin, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    answer(client, ESTABLISHED);
    struct direction up = {client, origin}, down = {origin, client};
    pthread_t thread;
    if (pthread_create(&thread, NULL, pump, &up) != 0)
        goto done;
    pump(&down);
    pthread_join(thread, NULL);
done:
    close(client);
    if (origin >= 0)
        close(origin);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s PORT\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    int listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
    struct sockaddr_in at = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[1]))};
    inet_pton(AF_INET, "127.0.0.1", &at.sin_addr);
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(listener, (struct sockaddr *)&at, sizeof at) < 0 || listen(listener, 4096) < 0) {
        perror("floor: listen"); /* peers.py retries another port on "in use" */
        return 1;
    }
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    for (;;) {
        int client = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
        if (client < 0) {
            usleep(1000); /* out of descriptors, say: do not spin */
            continue;
        }
        pthread_t thread;
        if (pthread_create(&thread, &attr, serve, (void *)(long)client) != 0)
            close(client);
    }
}
