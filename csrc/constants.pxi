# The engine's constants, compiled in.

cdef enum:
    CLIENT = 0
    ORIGIN = 1
    PROXY = 2

    UP = 0              # client -> origin
    DOWN = 1            # origin -> client

    # reasons, indexes into REASONS
    R_EOF = 0
    R_RESET = 1
    R_IDLE = 2
    R_HALF_CLOSED = 3
    R_LIFETIME = 4
    R_SHUTDOWN = 5
    R_ERROR = 6

    # worker commands
    CMD_RUN = 0
    CMD_CLOSE_ALL = 1
    CMD_EXIT = 2

    # what fill() and flush() return besides a byte count
    WOULD_BLOCK = 0
    NO_ROOM = -1
    AT_EOF = -2
    FAILED = -3

    COPY_SIZE = 65536           # the copy path's chunk
    BATCH = 256                 # epoll events per wait
    PUMP_BUDGET = 4194304       # bytes one tunnel moves per turn before others get theirs
    DEFAULT_PIPE_SIZE = 1048576  # the most an unprivileged process may ask for (pipe-max-size)
    POOL_KEEP = 16              # empty pipes a thread keeps at most for the next transfer

# Seconds before spill() may move a tunnel again; a C double, as the enum holds ints only.
cdef double MOVE_PAUSE = 1.0
