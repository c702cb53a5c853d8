"""Every bound the fabric enforces, in one place. Units are in the names."""

PAGE_SIZE_BYTES = 4096

# Control messages (IPC and, later, RPC headers). Data never rides in them on one host.
MAX_MESSAGE_BYTES = 256 * 1024
MAX_FDS_PER_MESSAGE = 64

MAX_NAME_CHARS = 64            # pool and namespace names
MAX_NAMESPACES = 1024          # per cluster: keeps a whole catalog listing inside one message
MAX_SEC_ID_BYTES = 256
MAX_EXTENTS_PER_OBJECT = 4096
MAX_OBJECTS_PER_NAMESPACE = 65536   # per home server; sizes the shared generation table
MAX_BATCH_IDS = 4096           # BM_BatchFreeSec
MAX_GATHER_INPUTS = 1024
MAX_OBJECT_BYTES = 1 << 40

MAX_CLIENTS_PER_SERVER = 256
# An error message quotes the input it refuses; past this it is cut, so that the error reply
# to any request fits in one message.
MAX_ERROR_MESSAGE_CHARS = 4096
# A front door that cannot accept (out of fds or memory) retries after a pause that doubles
# from the first to the last of these.
ACCEPT_BACKOFF_MIN_S = 0.01
ACCEPT_BACKOFF_MAX_S = 1.0
# Log lines about what clients send (garbage, failed handshakes, bugs they trigger): at most
# this many per kind in each interval; the next one after says how many were held back.
LOG_LINES_PER_KIND = 10
LOG_INTERVAL_S = 60.0
DEFAULT_REQUEST_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0
# Server-to-server calls answer well within a client's own timeout, so a stuck peer costs
# the client an error about that peer, not a timeout of its own request.
PEER_TIMEOUT_S = 3.0

# Freed extents rest this long before reuse, so that a client copy that passed its
# generation check just before the free cannot land in the next object's bytes.
REUSE_GRACE_S = 0.05

# A side waiting for a message polls this long before it sleeps (transport/busy_poll.py):
# waking a sleeping process costs more than the whole control call on a VM. Bounded, and
# only while the peer keeps answering within it, so an idle connection costs no CPU.
BUSY_POLL_US = 200
MAX_BUSY_POLL_US = 10_000

HEARTBEAT_INTERVAL_S = 0.5
LIVENESS_TIMEOUT_S = 3.0

# secIds are kept only as salted PBKDF2 hashes; verified once per connection.
SEC_HASH_ITERATIONS = 2000

# RPC between hosts. A payload is at most one extent's span, so one segment bounds it.
MAX_RPC_PAYLOAD_BYTES = 64 << 20
MAX_RPC_IN_FLIGHT = 256        # pipelined requests per connection
HANDSHAKE_TIMEOUT_S = 5.0
