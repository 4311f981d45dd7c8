"""Settings: every tunable of the hub in one frozen dataclass.

Precedence is flags over environment (``HUB_<FIELD>``) over a TOML file over
the defaults below. Building a :class:`Settings` has no side effects; the
object is passed down explicitly, never imported as a global.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from .keys import is_cell

__all__ = ["MAX_WORKERS", "ConfigError", "RedisDSN", "Settings"]

MAX_WORKERS = 1024
"""Most hub processes one ``hub serve --workers`` runs."""


class ConfigError(ValueError):
    """A setting has a value that cannot be used."""

    def __init__(self, name: str, value: object, reason: str):
        super().__init__(name, value, reason)
        self.name = name
        self.value = value
        self.reason = reason

    def __str__(self) -> str:
        return f"invalid setting {self.name}={self.value!r}: {self.reason}"


@dataclasses.dataclass(frozen=True)
class RedisDSN:
    """A parsed Redis URL (``redis://``, ``rediss://`` or ``unix://``)."""

    scheme: str
    host: str | None
    port: int | None
    path: str | None
    db: int
    username: str | None
    password: str | None

    @classmethod
    def parse(cls, url: str) -> RedisDSN:
        """Parse ``url``; raise :class:`ConfigError` when it is not a Redis URL."""
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ConfigError("redis_url", _redact(url), "scheme must be redis, rediss or unix")
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else None
        if parts.scheme == "unix":
            if not parts.path:
                raise ConfigError("redis_url", _redact(url), "unix:// needs a socket path")
            query = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p)
            return cls(
                "unix", None, None, parts.path, int(query.get("db", "0")), username, password
            )
        try:
            port = parts.port or 6379
        except ValueError as exc:
            raise ConfigError("redis_url", _redact(url), "bad port") from exc
        db_text = parts.path.lstrip("/") or "0"
        if not db_text.isdigit():
            raise ConfigError("redis_url", _redact(url), "database must be a number")
        return cls(
            parts.scheme,
            parts.hostname or "localhost",
            port,
            None,
            int(db_text),
            username,
            password,
        )

    def redacted(self) -> str:
        """The URL with the password replaced by ``***``, for logs."""
        auth = ""
        if self.username or self.password:
            auth = f"{self.username or ''}{':***' if self.password else ''}@"
        if self.scheme == "unix":
            return f"unix://{auth}{self.path}"
        return f"{self.scheme}://{auth}{self.host}:{self.port}/{self.db}"


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything configurable, with production-safe defaults.

    ``None`` disables a limit or a timeout where a field allows it.
    """

    # Network
    host: str = "127.0.0.1"
    """Address to listen on. Open mode (no auth) is allowed only on loopback."""
    port: int = 8765
    """TCP port; 0 picks a free one."""
    hub_id: str | None = None
    """This hub's id in Redis; ``None`` makes a random one at start."""
    tls_cert: str | None = None
    """PEM certificate to serve wss:// directly; ``None`` serves plain ws://."""
    tls_key: str | None = None
    """PEM private key for ``tls_cert``."""
    insecure: bool = False
    """Allow open mode (no auth) on a non-loopback address."""
    workers: str = "1"
    """Hub processes ``hub serve`` runs on the port (``SO_REUSEPORT``), each with
    its own id (``<hub_id>-w<k>``), under a supervisor: a number, or ``auto``
    for one per CPU this process may run on. 1 runs the hub in this process."""
    reuse_port: bool = False
    """Bind the port with ``SO_REUSEPORT``, so that several hub processes of
    this user listen on it at once and the kernel spreads connections over
    them (the workers of ``hub serve --workers`` always do)."""

    # Redis
    redis_url: str | None = dataclasses.field(default=None, repr=False)
    """``redis://``, ``rediss://`` or ``unix://``; ``None`` starts an embedded server."""
    data_dir: str = ".hub-data"
    """Directory of the embedded Redis server (socket, append-only file)."""
    cell: str = "0"
    """Scheduling cell: the hash tag shared by every key (``hub:v1:{cell}:``). The hub's
    default cell: its nodes' and sessions' unless they name another it serves."""
    cells: tuple[str, ...] = ()
    """Every cell this hub serves (``--cells a,b``), ``cell`` included whether listed or
    not; empty: ``cell`` only. Hubs sharing a Redis deployment should list the same cells."""
    spill: int = 0
    """Other cells a job may try, one dispatch call each, when its cell has no free node
    for its pair, before it queues in its own cell; 0: never leaves its cell."""
    redis_cluster: bool = False
    """``redis_url`` is a seed node of a Redis Cluster: the cell's calls go to
    the master of its slot, found from the seed (``MOVED`` and ``ASK``
    followed, a failover located again); the bus uses sharded pub/sub."""
    redis_wait_replicas: int = 0
    """After each pipeline of script calls, ``WAIT`` until this many replicas
    have its writes before acting on the replies, so that a failover to one
    of them loses none of what clients were told; 0 does not wait (a
    failover may then lose the last moments of writes; the hubs reconcile)."""
    redis_wait_ms: int = 50
    """Longest ``WAIT`` per pipeline, milliseconds; the replies are acted on
    after it even if the replicas have not caught up."""
    redis_timeout_s: float = 2.0
    """Timeout of one Redis command (connect and read), seconds."""
    redis_reply_timeout_s: float = 10.0
    """How long Redis may be silent while script replies are due before the
    calls fail (Redis unavailable). Counted on the wire: a reply that waits
    only because this hub was busy does not count."""

    # Scheduling
    queue_max: int = 1000
    """Jobs waiting for a slot, per language pair; more get ``QUEUE_FULL``."""
    queue_wait_ms: int = 2000
    """How long a job may wait for a slot; 0 rejects at once (``NO_AVAILABLE_NODE``)."""
    job_timeout_ms: int = 30000
    """A job's default time budget from acceptance (``JOB_TIMEOUT`` after it)."""
    max_job_timeout_ms: int = 600000
    """Largest ``timeout_ms`` a session may ask for."""
    max_attempts: int = 3
    """Attempts per job, counting the first, when nodes are lost."""
    job_ttl_ms: int = 120000
    """How long an ended job's record (status, result) stays in Redis."""
    sweep_interval_ms: int = 250
    """How often a hub tries to run the sweep (timeouts, queue waits, leases)."""
    sweep_batch: int = 200
    """Most jobs or nodes one sweep call handles, so Redis is never blocked long."""

    # Liveness
    heartbeat_interval_ms: int = 5000
    """The hub pings each node this often; each pong runs heartbeat.lua."""
    node_lease_ms: int | None = None
    """A node silent this long is lost; ``None`` means three heartbeat intervals."""
    register_timeout_s: float = 5.0
    """A node must send ``register`` this soon after connecting."""
    resume_window_s: float = 60.0
    """How long a disconnected session's jobs and results wait for it to resume."""
    session_idle_timeout_s: float | None = 600.0
    """Close a session that sends nothing for this long; ``None`` never."""
    shutdown_grace_s: float = 5.0
    """On SIGTERM, how long nodes may finish their jobs before sockets close."""

    # Limits
    max_frame_bytes: int = 2 * 1024 * 1024
    """Largest WebSocket message accepted (close 1009 above it)."""
    max_payload_bytes: int = 64 * 1024
    """Largest encoded ``payload`` object of a job."""
    max_audio_bytes: int = 1024 * 1024
    """Largest audio part of a binary job frame."""
    max_result_bytes: int = 256 * 1024
    """Largest encoded ``result`` a node may send."""
    max_id_length: int = 64
    """Longest node id, session id, job ref or pool name."""
    max_jobs_per_node: int = 256
    """Largest ``max_jobs`` a node may claim."""
    max_inflight_per_session: int = 64
    """Unfinished (accepted or queued) jobs per session."""
    max_queued_per_session: int = 32
    """Queued jobs per session."""
    session_rate_per_s: float | None = 50.0
    """Sustained job rate per session (token bucket); ``None`` is unlimited."""
    session_burst: int = 100
    """Token bucket size for ``session_rate_per_s``."""
    max_connections: int | None = 20000
    """Open WebSockets per hub; ``None`` is unlimited."""
    max_connections_per_ip: int | None = 1000
    """Open WebSockets per client address; ``None`` is unlimited."""
    send_buffer_bytes: int = 4 * 1024 * 1024
    """Bytes waiting to be written to one connection; a connection over it is
    too slow and is closed (4005)."""
    audio_budget_bytes: int = 128 * 1024 * 1024
    """Audio of unfinished jobs this hub keeps in memory (never in Redis); a
    job that does not fit is refused ``OVERLOADED``."""

    # HTTP job API (protocol.md §11)
    http_max_wait_ms: int = 60000
    """Longest ``wait_ms`` of a job request; a longer one is lowered to it."""
    http_idle_timeout_s: float = 30.0
    """An HTTP connection whose next request is not whole within this many seconds
    (head and body) is closed; also the keep-alive idle time between requests."""

    # Load shedding: past any of these a hub refuses new jobs OVERLOADED, with no Redis call
    shed_loop_lag_ms: int = 25
    """Event-loop lag (how late a 50 ms timer fires), on two ticks in a row."""
    shed_script_calls: int = 2000
    """Script calls waiting for a pipeline or in flight."""
    shed_dispatch_ms: int = 15
    """Moving average of the time from a submit to its dispatch reply, above
    the fastest dispatch of the last 30 s (the round trip to Redis)."""
    shed_send_bytes: int = 64 * 1024 * 1024
    """Bytes waiting in all connections' write buffers."""
    shed_retry_after_ms: int = 1000
    """The ``retry_after_ms`` of an ``OVERLOADED`` refusal."""

    # Auth
    node_secret: str | None = dataclasses.field(default=None, repr=False)
    """Shared fleet secret for nodes (``Authorization: Bearer``); ``None`` is open."""
    node_token_key: str | None = dataclasses.field(default=None, repr=False)
    """HS256 key of per-node JWTs naming the ids a node may use."""
    session_jwt_key: str | None = dataclasses.field(default=None, repr=False)
    """HS256 secret or EdDSA public key (PEM) that signs session tokens."""
    session_jwt_algorithm: str = "HS256"
    """``HS256`` or ``EdDSA``."""
    resume_secret: str | None = dataclasses.field(default=None, repr=False)
    """Key of the sessions' resume tokens; ``None`` shares a random one through Redis."""
    allowed_origins: tuple[str, ...] | None = None
    """Origin allowlist for browser sessions; ``None`` accepts any origin."""
    admin_token_key: str | None = dataclasses.field(default=None, repr=False)
    """HS256 key of admin JWTs (``hub token --admin``), needed by ``/dashboard`` and
    ``/v1/watch``; ``None``: those answer loopback peers only, and only in open mode."""

    # Observability
    log_level: str = "INFO"
    """Log level of the ``hub`` loggers."""
    watch_interval_s: float = 1.0
    """How often the hub publishes its own figures to Redis and sends one
    snapshot to its ``/v1/watch`` watchers, seconds."""
    max_watchers: int | None = 64
    """Open ``/v1/watch`` streams per hub; ``None`` is unlimited."""
    watch_max_nodes: int = 1000
    """Most nodes listed in a snapshot (the most recently seen first)."""
    latency_window_s: float = 300.0
    """The span of the latency percentiles (end to end, time to accepted), seconds."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError("port", self.port, "must be 0..65535")
        if self.redis_url is not None:
            RedisDSN.parse(self.redis_url)
        for name in (
            "queue_max",
            "max_attempts",
            "max_jobs_per_node",
            "heartbeat_interval_ms",
            "job_timeout_ms",
            "max_frame_bytes",
            "sweep_batch",
            "max_id_length",
            "sweep_interval_ms",
            "send_buffer_bytes",
            "audio_budget_bytes",
            "shed_loop_lag_ms",
            "shed_script_calls",
            "shed_dispatch_ms",
            "shed_send_bytes",
            "shed_retry_after_ms",
            "http_max_wait_ms",
            "watch_max_nodes",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(name, getattr(self, name), "must be at least 1")
        for name in (
            "queue_wait_ms",
            "job_ttl_ms",
            "resume_window_s",
            "register_timeout_s",
            "redis_timeout_s",
            "redis_reply_timeout_s",
            "shutdown_grace_s",
            "http_idle_timeout_s",
            "redis_wait_replicas",
            "redis_wait_ms",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(name, getattr(self, name), "must not be negative")
        self.worker_count()
        if not self.cell or any(c in self.cell for c in "{}: \t\r\n"):
            raise ConfigError(
                "cell", self.cell, "must be non-empty without braces, colons or spaces"
            )
        for cell in self.cells:
            if not is_cell(cell):
                raise ConfigError("cells", cell, "a cell is 1-64 letters, digits, '_' or '-'")
        if len(self.served_cells) > 1 and not is_cell(self.cell):
            raise ConfigError("cell", self.cell, "a cell is 1-64 letters, digits, '_' or '-'")
        if self.spill < 0:
            raise ConfigError("spill", self.spill, "must not be negative")
        if self.session_jwt_algorithm not in ("HS256", "EdDSA"):
            raise ConfigError(
                "session_jwt_algorithm", self.session_jwt_algorithm, "must be HS256 or EdDSA"
            )
        # RFC 7518 §3.2: an HS256 key must be at least as long as the hash (32 bytes).
        if self.node_token_key is not None and len(self.node_token_key.encode()) < 32:
            raise ConfigError("node_token_key", "***", "an HS256 key needs at least 32 bytes")
        if (
            self.session_jwt_key is not None
            and self.session_jwt_algorithm == "HS256"
            and len(self.session_jwt_key.encode()) < 32
        ):
            raise ConfigError("session_jwt_key", "***", "an HS256 key needs at least 32 bytes")
        if self.admin_token_key is not None and len(self.admin_token_key.encode()) < 32:
            raise ConfigError("admin_token_key", "***", "an HS256 key needs at least 32 bytes")
        for name in ("watch_interval_s", "latency_window_s"):
            if not 0.05 <= getattr(self, name) <= 3600:
                raise ConfigError(name, getattr(self, name), "must be 0.05..3600 seconds")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert", self.tls_cert, "tls_cert and tls_key go together")

    # Derived values

    @property
    def served_cells(self) -> tuple[str, ...]:
        """The cells this hub serves: ``cell`` first, then the others of ``cells``."""
        return (self.cell, *dict.fromkeys(c for c in self.cells if c != self.cell))

    @property
    def lease_ms(self) -> int:
        """The node lease in milliseconds (three heartbeat intervals by default)."""
        if self.node_lease_ms is not None:
            return self.node_lease_ms
        return 3 * self.heartbeat_interval_ms

    def worker_count(self) -> int:
        """The number of hub processes ``workers`` asks for (``auto``: usable CPUs).

        Raises:
            ConfigError: if ``workers`` is neither ``auto`` nor 1 to 1024.
        """
        text = self.workers.strip().lower()
        if text == "auto":
            # The CPUs this process may run on (taskset, cpusets), not every CPU.
            return max(1, len(os.sched_getaffinity(0)))
        if not text.isdigit() or not 1 <= int(text) <= MAX_WORKERS:
            raise ConfigError("workers", self.workers, f"must be auto or 1..{MAX_WORKERS}")
        return int(text)

    # Loading

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of every field, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, source: str = "settings") -> Settings:
        """Build from a mapping of field name to value (strings are converted).

        Raises:
            ConfigError: on an unknown field or a value of the wrong type.
        """
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for name, value in values.items():
            if name not in hints:
                raise ConfigError(name, value, f"unknown setting in {source}")
            kwargs[name] = _convert(name, value, hints[name])
        return cls(**kwargs)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """Return the ``HUB_<FIELD>`` variables of ``environ`` as field -> text.

        This is the only reader of ``os.environ``.
        """
        env = os.environ if environ is None else environ
        found = {}
        for name in cls.field_names():
            key = f"HUB_{name.upper()}"
            if key in env:
                found[name] = env[key]
        return found

    @classmethod
    def load(
        cls,
        *,
        flags: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
        config_file: str | Path | None = None,
    ) -> Settings:
        """Merge defaults, a TOML file, the environment and flags, in that order.

        Raises:
            ConfigError: on an unreadable file, an unknown key or a bad value.
        """
        merged: dict[str, Any] = {}
        env = cls.from_env(environ)
        path = config_file if config_file is not None else env.pop("config", None)
        if path is not None:
            try:
                with open(path, "rb") as f:
                    data = tomllib.load(f)
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError("config", str(path), str(exc)) from exc
            merged.update(data.get("hub", data))
        merged.update(env)
        merged.update({k: v for k, v in (flags or {}).items() if v is not None})
        return cls.from_mapping(merged)


def _convert(name: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
            return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected a boolean")
        if hint is int:
            if isinstance(value, bool):
                raise ValueError("expected an integer")
            return int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return str(value)
        if origin is tuple:
            if isinstance(value, str):
                return tuple(v.strip() for v in value.split(",") if v.strip())
            return tuple(str(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(name, value, str(exc)) from exc
    raise ConfigError(name, value, f"unsupported type {hint}")
