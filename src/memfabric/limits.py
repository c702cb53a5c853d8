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
MAX_OBJECTS_PER_LISTING = 1000  # objects per page of a namespace's listing (well inside one message)
# Batches of reads and writes across objects (Session.read_many/write_many, BM_BatchReadSec):
# items per call; per request to one server, spans and payload bytes (a larger share for one
# server goes as several requests, at most BATCH_REQUESTS_IN_FLIGHT per server at once).
MAX_BATCH_ITEMS = 4096
MAX_BATCH_SPANS_PER_REQUEST = 1024
MAX_BATCH_REQUEST_BYTES = 16 << 20
BATCH_REQUESTS_IN_FLIGHT = 8
MAX_GATHER_INPUTS = 1024
# memfabric.compat keeps the handles (layouts) of this many objects it used most recently, so
# their BM_ReadSec/BM_WriteSec ask no server: about 2 KiB each for a one-extent object (measured
# with tracemalloc), plus about 0.5 KiB per further extent.
COMPAT_HANDLES_KEPT = 8192
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
MAX_REQUEST_TIMEOUT_S = 24 * 3600.0
CONNECT_TIMEOUT_S = 5.0
# Server-to-server calls answer well within a client's own timeout, so a stuck peer costs
# the client an error about that peer, not a timeout of its own request.
PEER_TIMEOUT_S = 3.0
# Each request carries its caller's remaining time (`budget_s`). A server bounds the calls it
# makes to peers for that request by the budget less this share of it (at most
# DEADLINE_MARGIN_S): time for its own TIMEOUT answer to reach the caller before it gives up.
DEADLINE_MARGIN_S = 0.2
DEADLINE_MARGIN_SHARE = 0.25
# A request whose caller timed out leaves its link in use: the reply that comes later is
# dropped. A server that leaves this many requests of one link unanswered counts as gone.
MAX_UNANSWERED_REQUESTS = 64

# Segments: the largest size is configured (segment_size, 4 MiB by default); an owner's first
# is this small, and each next doubles its holding (core/allocator.py).
MIN_SEGMENT_BYTES = 64 << 10
# Spares kept made off the request path (fresh memory costs ~0.5 ms per MiB on a VM): this
# many of the largest and of the smallest size, within 1/DIVISOR of the pool's capacity.
SPARE_TOP_SEGMENTS = 2
SPARE_SMALL_SEGMENTS = 4
SPARE_CAPACITY_DIVISOR = 8
SEGMENT_KEEPER_INTERVAL_S = 0.05
# An allocation short of memory that is resting or being destroyed waits for it this long at most.
RESERVE_RETRY_S = 0.2

# Freed extents rest this long before reuse, so that a client copy that passed its
# generation check just before the free cannot land in the next object's bytes.
REUSE_GRACE_S = 0.05

# A side waiting for a message polls this long before it sleeps (transport/busy_poll.py):
# waking a sleeping process costs more than the whole control call on a VM. Bounded, and
# only while the peer keeps answering within it, so an idle connection costs no CPU.
BUSY_POLL_US = 200
MAX_BUSY_POLL_US = 10_000

# The metrics endpoint ([server] metrics_listen): scrapes served at once (more are closed at
# once), and how long one may take to send its request.
MAX_METRICS_SCRAPES = 4
METRICS_SCRAPE_TIMEOUT_S = 5.0

# `memfabric up`'s log (up.log): past this it moves to up.log.1 and a new one begins.
UP_LOG_MAX_BYTES = 64 << 20
# How long `memfabric down` waits for the fabric to stop, by default.
DOWN_TIMEOUT_S = 60.0

HEARTBEAT_INTERVAL_S = 0.5
LIVENESS_TIMEOUT_S = 3.0
# A server beats at least this often per liveness timeout: one late beat (a busy server) must
# not make the cluster take it for dead, nor MemKV refuse requests and forget its keys
# (kv/service.py). Without server.heartbeat_interval_s, the interval is derived to keep it.
MIN_BEATS_PER_LIVENESS_TIMEOUT = 4

# The embedded catalog's write lock: a write waits this long for another process to let go
# (healthy writes hold it for milliseconds), then fails saying so; while it stays held (a
# process stopped inside a write), later writes wait only the retry time.
CATALOG_LOCK_WAIT_S = 2.0
CATALOG_LOCK_RETRY_S = 0.1

# secIds are kept only as salted scrypt hashes (core/namespaces.py). N=2**14, r=8, p=1 is the
# scrypt paper's figure for interactive logins and Django's default: 16 MiB and about 47 ms of
# one core per hash on this project's 2-vCPU test host (PBKDF2 with 2,000 rounds, used before:
# 0.6 ms, and no memory to speak of). It is paid when a namespace is created and once per server
# process per namespace (server/sec_ids.py remembers what matched), so it never shows per call;
# an attacker with a copy of the catalog pays it per guess, in memory too.
SEC_HASH_SCRYPT_N = 2 ** 14
SEC_HASH_SCRYPT_R = 8
SEC_HASH_SCRYPT_P = 1
SEC_HASH_MAX_MEMORY_BYTES = 64 << 20     # a stored hash asking for more matches nothing
SEC_HASH_LEGACY_PBKDF2_ROUNDS = 2000     # records written before scrypt: still verified
SEC_HASH_CONCURRENCY = 4                 # slow hashes at once per server (16 MiB each)
SEC_HASH_WAIT_S = 5.0                    # for one of those slots, then BUSY
# Wrong secIds each client may give (as the kernel or the transport names it: a uid over IPC,
# an address over RPC): a burst, then one more per 1/rate seconds; meanwhile LIMIT_EXCEEDED,
# without hashing, so guessing cannot take the server's CPU.
SEC_ID_FAILURE_BURST = 10
SEC_ID_FAILURES_PER_S = 2.0
MAX_NAMESPACES_PER_CLIENT = MAX_NAMESPACES // 4   # default of [server] max_namespaces_per_client

# RPC between hosts. A payload is at most one extent's span, so one segment bounds it.
MAX_RPC_PAYLOAD_BYTES = 64 << 20
MAX_RPC_IN_FLIGHT = 256        # pipelined requests per connection
# Objects one RPC connection may have span grants for (bigmemory/span_grants.py): its span
# reads and writes of those are served in compiled code; past this, the oldest is forgotten.
# An object with more extents on one server than this is served there by Python: a grant
# costs memory per extent (MAX_SPAN_GRANTS_PER_CONNECTION of them bound a connection's).
MAX_SPAN_GRANTS_PER_CONNECTION = 1024
MAX_EXTENTS_PER_SPAN_GRANT = 16
# Remote gets of values up to this many bytes are answered in compiled code (_kvget.c) on a
# connection granted their keyspace (kv/get_grants.py): a reply buffer of this size per
# connection. Larger ones, and keyspaces beyond the first few, segments beyond the first
# few of a keyspace, are Python's.
KV_COMPILED_GET_MAX_BYTES = 64 << 10
MAX_GET_GRANTS_PER_CONNECTION = 64
MAX_SEGMENTS_PER_GET_GRANT = 64
# Same-host puts answered in the IPC loop (kv/put_grants.py): keyspaces one connection has
# grants for, and the chunks a grant is stocked with (at most this many bytes of them: what
# a connection that stops putting keeps from the pool until it goes or the keeper takes it back).
MAX_PUT_GRANTS_PER_CONNECTION = 4
KV_PUT_STOCK_CHUNKS = 64
KV_PUT_STOCK_BYTES = 1 << 20
HANDSHAKE_TIMEOUT_S = 5.0

# MemKV.
MAX_KV_KEY_BYTES = 64 << 10
MAX_KV_VALUE_BYTES = 1 << 30        # "at least 512 MiB" asked; a value is copied once each side
MAX_KV_REPLICAS = 8
MAX_KV_BATCH = 4096                 # keys per batch call, per server
# A link closing with requests given up on waits this long at most for their replies, to
# undo what they did for no one (datapath/link.py settle).
SETTLE_S = 1.0
MAX_KV_CLIENTS = 256                # clients of one keyspace on one server that count their own gets
KV_INLINE_BYTES = 192 << 10         # a key and value ride in a request up to this; larger: reserve, fill, commit
MAX_KV_PENDING_PER_CLIENT = 16      # large values one connection is filling at once
# A kv_get_many reply over RPC carries values as its payload, sent from where they lie, up to
# this in all; the keys that did not fit are asked again (one more request, not one per key).
KV_GET_MANY_PAYLOAD_BYTES = 8 << 20
MAX_KV_HOLDS_PER_CLIENT = 64        # large values one connection is reading at once (each held from reuse)
# ... and one server's link to another, which carries the reads of all its door's clients.
MAX_KV_HOLDS_PER_PEER = 4096

# MemPlog.
MAX_PLOG_RECORD_BYTES = 32 << 20      # one record's payload: within one RPC payload, header and all
MAX_PLOG_BATCH = 4096                 # records per append_many
MAX_PLOG_CAPACITY_BYTES = 1 << 40
# How far a plog may be written before it says so on disk (its metadata's reach): a restart reads
# and zeroes its log up to there, not its whole capacity. Raised ahead of the appends by the log's
# length, at least the first figure and at most the second: a metadata write every so often, and
# a restart reads at most twice the log, or the log and 1 GiB.
PLOG_REACH_STEP_BYTES = 64 << 20
PLOG_REACH_STEP_MOST_BYTES = 1 << 30
# A pmem plog's memory is made ready (zeros written and flushed) before its records go there:
# a first write into blocks fallocate'd but never written is a change of the file's metadata,
# which every append's fdatasync would carry (1 MiB appends here: 705/s on ready memory, 421/s
# on memory never written). Not over its whole capacity at create (a 2 GiB log took 4 s, a
# 100 GiB one minutes, and the disk wrote all of it): its first part at create, then by a thread
# of the server, a round at a time, starting when the log comes this close to what is ready.
# A round writes its zeros a piece at a time, under the plog's lock and only past the log's
# end, so appends never wait for it (but for a piece). Only for logs whose flushes are small
# (records of a few KiB: a group commit's flushes gain ~2x): beside appends of large records
# the disk would write every byte twice, and their flushes would wait behind the round's
# (1 MiB appends: 389/s, p99 10-60 ms, against 421/s on memory never written). A log that
# outran a round is not made ready again until it has grown by PLOG_PREPARE_SKIP_BYTES. A
# delete waits for the round under way on its plog (it holds its memory) at most
# PLOG_PREPARE_WAIT_S.
PLOG_PREPARE_AT_CREATE_BYTES = 256 << 20
PLOG_PREPARE_AHEAD_BYTES = 32 << 20
PLOG_PREPARE_ROUND_BYTES = 32 << 20
PLOG_PREPARE_PIECE_BYTES = 256 << 10
PLOG_PREPARE_FLUSH_MOST_BYTES = 256 << 10
PLOG_PREPARE_SKIP_BYTES = 256 << 20
PLOG_PREPARE_WAIT_S = 30.0
MAX_PLOGS_PER_NAMESPACE = 512         # per server: ns.plogs() gets one server's in one message
# Threads appending through one plog handle at once go together (plog/combine.py): a batch of
# theirs carries at most this many bytes past its first record (more would keep that record
# waiting for the others' copying), and a record waits for others' batches and its own at most
# twice the session's timeout (one batch ahead of it, then its own) plus this.
PLOG_COMBINE_MOST_BYTES = 4 << 20
PLOG_COMBINE_SLACK_S = 1.0
PLOG_INLINE_BYTES = 192 << 10         # records (and read replies) ride in an IPC message up to this
PLOG_RPC_READ_BYTES = 16 << 20        # the most one read or records reply carries over RPC
MAX_PLOG_STAGED_BYTES = 64 << 20      # bytes one connection has staged (large records over IPC) at once
MAX_PLOG_STAGES_PER_CLIENT = 16
PLOG_SHARED_STAGE_MIN_BYTES = 1 << 20  # a same-host client's shared stage (plog_share_stage), at the least
# A connection keeps a stage up to this size for its next batches; a larger one serves one batch
# (kept, it counted against MAX_PLOG_BUFFERED_BYTES for the connection's life: four idle ones of
# 64 MiB refused every other batch). 64 idle connections to take it all; a 2 MiB stage made for
# each batch cost 4.7 ms per 2 x 1 MiB batch against 1.1 ms kept.
PLOG_SHARED_STAGE_KEPT_BYTES = 4 << 20
# The slowest a server may make a new plog's memory ready (a pmem file's blocks written with
# zeros and flushed, on a disk under load): creating a plog waits for the home and each copy
# this long per byte made ready at create, beyond the usual timeouts, so that a slow disk is
# not taken for a dead peer.
PLOG_PREPARE_BYTES_PER_S = 32 << 20
MAX_PLOG_BUFFERED_BYTES = 256 << 20   # record bytes a server holds being sent (stages, RPC payloads), in all
MAX_PLOG_REPLICAS = 8                 # copies of a plog (its home's included), each on its own server
MAX_PLOG_FAST_GRANTS_PER_CONNECTION = 64   # plogs one IPC connection appends to through the compiled path
# Log bytes a home forwards to a replica per message: within MAX_MESSAGE_BYTES, with 16 KiB for
# the request's other fields (names, secId: under 1 KiB). Above a client's inline records
# (PLOG_INLINE_BYTES), so a record that came inline, or staged up to here, goes to a copy in one
# piece, which its receive loop serves: each further piece costs a round trip through Python
# on both sides (a 200 KiB record took 7x a single copy's append in two 128 KiB pieces).
PLOG_REPLICA_PIECE_BYTES = 240 << 10
# A same-host copy reads a longer forward from its home's segment files itself (the message
# names where the bytes lie): this many bytes per message at most, which the copy holds in
# memory while it checks them. A 1 MiB record in 240 KiB pieces cost 4x a single copy's append.
PLOG_PULL_BYTES = 8 << 20
MAX_PLOG_PULL_PLACES = 64             # (segment, offset, length) places one such message names
# The Redis-protocol door (kv/resp/). Redis's own limits, so that a client sees the same
# errors at the same sizes: an inline line or a length line of at most 64 KiB, a bulk of at
# most 512 MiB (proto-max-bulk-len), a query buffer of at most 1 GiB (client-query-buffer-limit).
RESP_INLINE_MAX_BYTES = 64 << 10
RESP_BULK_MAX_BYTES = 512 << 20
RESP_QUERY_BUFFER_MAX_BYTES = 1 << 30
RESP_MAX_ARGS = 1 << 20             # arguments of one command (Redis allows INT_MAX; each costs us ~60 bytes)
RESP_UNAUTH_MAX_ARGS = 10           # before AUTH, where AUTH is required (as Redis)
RESP_UNAUTH_BULK_MAX_BYTES = 16384
RESP_RECV_BYTES = 256 << 10         # one read at most: as Redis, whatever is there (a long inline line sent at once is whole)
RESP_MAX_CLIENTS = 4096             # door connections at once (a thread each; Redis allows 10,000)
# Where AUTH is required: at most this share of the clients may be connections that have not
# authenticated yet (a newcomer past it closes the oldest of them), each closed when it has not
# authenticated within RESP_AUTH_TIMEOUT_S. Anyone who reaches the door can open connections:
# they must never take the slots of the clients that can AUTH.
RESP_UNAUTH_CLIENTS_SHARE = 0.25
RESP_AUTH_TIMEOUT_S = 10.0
RESP_REPLY_BUFFER_BYTES = 64 << 10  # replies gathered before they are sent
RESP_SEND_TIMEOUT_S = 60.0          # a client that reads nothing for this long is dropped
RESP_MGET_REPLY_MAX_BYTES = 512 << 20   # the values of one MGET (it holds a few batches of them at a time)
# Bytes of values all the door's MGET replies hold at once (server.resp_reply_budget), and how
# long one waits for room before it is refused (or, half sent, its connection closed). A reply
# takes a batch's most (KV_GET_MANY_PAYLOAD_BYTES) before it asks: the budget is at least two.
RESP_REPLY_BUDGET_BYTES = 1 << 30
RESP_REPLY_BUDGET_MIN_BYTES = 2 * KV_GET_MANY_PAYLOAD_BYTES
RESP_REPLY_BUDGET_WAIT_S = 10.0
# A large value's reply (GET, GETDEL, ...) is read from where it lies this many bytes at a time,
# into one buffer taken from the budget for as long as the reply is sent (kv/resp/held.py).
RESP_VALUE_PIECE_BYTES = 1 << 20
