"""Configuration from the environment (and an optional TOML file of DOKU clients), read in one place.

Loading never fails on what a command does not need; :meth:`Settings.require_serving` is the strict
check ``dipc serve`` runs. Every problem is a :class:`ConfigError`, which the CLI turns into exit code 2.
"""

from __future__ import annotations

import ipaddress
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from server.doku import conventions
from server.doku.auth import Client
from server.doku.channels import BinConfigError, BinTable

# Fixed demo credentials for ``dipc serve --demo``: printed at start, never for production.
DEMO_CLIENT_ID = "MCH-DEMO-0001"
DEMO_SECRET_KEY = "SK-demo-do-not-use-in-production"  # noqa: S105 - documented demo secret
DEMO_ADMIN_TOKEN = "demo-admin-token"  # noqa: S105 - documented demo token
DEMO_BINS = "ALFA:88965:direct,INDOMARET:33012:direct"
# ``DATABASE_URL=embedded``: the embedded PostgreSQL under $DIPC_DATA_DIR, chosen on purpose.
EMBEDDED = "embedded"

# DOKU's API for Check Status (spec §8): production, and the sandbox for rehearsals.
DOKU_API_URL = "https://api.doku.com"
DOKU_SANDBOX_API_URL = "https://api-sandbox.doku.com"
# Seconds after an invoice's first quote when it is checked (spec §8 rule 2).
DEFAULT_RECONCILE_SCHEDULE = (120.0, 900.0, 3600.0, 21600.0, 86400.0, 259200.0)


class ConfigError(Exception):
    """The configuration is unusable; the message says which variable and why."""


@dataclass(frozen=True)
class Settings:
    # None: the embedded PostgreSQL under ``data_dir`` (only when chosen: see ``database_chosen``).
    database_url: str | None = None
    # False when DATABASE_URL is unset outside --demo: production must never fall back to an embedded
    # database inside a container's filesystem without a word.
    database_chosen: bool = True
    data_dir: Path = Path(".dipc")
    host: str = "127.0.0.1"
    port: int = 8080
    # The admin API and /metrics on a port of their own (server/http/ports.py); None: all on `port`.
    admin_port: int | None = None
    admin_host: str | None = None  # None: `host`
    workers: int = 1
    clients: Mapping[str, Client] = field(default_factory=dict)
    admin_tokens: tuple[str, ...] = ()
    bins: BinTable = field(default_factory=BinTable)
    inquiry_path: str = "/doku/inquiry"
    notification_path: str = "/doku/notification"
    max_skew_s: int = conventions.DEFAULT_MAX_SKEW_S
    notification_max_age_s: int = conventions.DEFAULT_NOTIFICATION_MAX_AGE_S
    max_body_bytes: int = conventions.DEFAULT_MAX_BODY_BYTES
    import_max_bytes: int = 1024 * 1024 * 1024
    # Budget for database work while a store counter waits (spec: answer within 1 s at worst).
    doku_db_timeout_s: float = 0.8
    # A notification is not waited on at a counter, but DOKU's call has a timeout of its own.
    notification_db_timeout_s: float = 5.0
    admin_db_timeout_s: float = 30.0
    # Batches of inquiries one worker has at the database at once; the inquiries that arrive meanwhile
    # wait and share the next batch's statement and commit (store/inquiries.py, InquiryBatches).
    inquiry_batches: int = 1
    db_pool_min: int = 2
    db_pool_max: int = 10
    db_connect_timeout_s: float = 5.0
    # asyncpg's prepared-statement cache per connection. 0 behind pgbouncer < 1.21 in transaction mode
    # (or with max_prepared_statements = 0): named statements do not survive a change of server.
    db_statement_cache_size: int = 100
    # The event feed's LISTEN needs a session of its own: behind a transaction-pooling pgbouncer, point
    # this at PostgreSQL directly (or at a session-mode pool). Unset: DATABASE_URL.
    listen_database_url: str | None = None
    webhook_url: str | None = None
    webhook_secrets: tuple[bytes, ...] = ()
    webhook_max_attempts: int = 20
    webhook_backoff_base_s: float = 1.0
    webhook_backoff_cap_s: float = 3600.0
    webhook_timeout_s: float = 10.0
    webhook_concurrency: int = 8
    # Reconciliation with DOKU's Check Status (spec §8). None: no DOKU API (--demo without a stand-in);
    # load_settings defaults to DOKU's production API outside --demo.
    doku_api_url: str | None = None
    doku_api_timeout_s: float = 10.0
    reconcile: bool = True
    reconcile_schedule: tuple[float, ...] = DEFAULT_RECONCILE_SCHEDULE
    reconcile_rps: float = 5.0
    reconcile_concurrency: int = 4
    log_format: str = "auto"
    log_level: str = "INFO"
    shutdown_timeout_s: float = 20.0
    # How often every serving process samples database-derived gauges (server/ops/sampler.py).
    metrics_sample_s: float = 5.0
    # The HTTP edge (README "Security and reliability"): how long a client may take to send its request
    # line and headers, then its body, and how many bodies of callers not yet authenticated are read at
    # once (each holds up to max_body_bytes; past the cap the answer is a deliberate 503).
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    max_body_reads: int = 128
    # Event-feed long-polls waiting at once per process: each event wakes and answers every one of them, on
    # the process that answers DOKU (past the cap the answer is a deliberate 503; a read without wait is not
    # counted). 1,000 of them took an inquiry from 3 to 256 ms (bench/README "Long-polls").
    feed_max_waiters: int = 100
    # Peers whose X-Forwarded-For names the caller in logs (load balancers, reverse proxies).
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    demo: bool = False

    @property
    def client_ids(self) -> frozenset[str]:
        return frozenset(self.clients)

    @property
    def reconciling(self) -> bool:
        """Whether this process runs a reconciler: DIPC_RECONCILE on, and DOKU's API to ask."""
        return self.reconcile and self.doku_api_url is not None

    @property
    def embedded(self) -> bool:
        return self.database_url is None

    def require_database(self) -> None:
        """Every command that opens the database: it must have been chosen, never defaulted."""
        if not self.database_chosen:
            raise ConfigError(
                "no database chosen: set DATABASE_URL=postgresql://user:password@host/dbname for an "
                f"external PostgreSQL, or DATABASE_URL={EMBEDDED} for the embedded one under "
                f"{self.data_dir}/ (or pass --demo to try dipc out)"
            )

    def database_description(self) -> str:
        """Where the data lives, for logs and messages: never the password."""
        if self.database_url is None:
            return f"embedded PostgreSQL in {self.data_dir.expanduser().resolve()}/pgdata"
        return f"external PostgreSQL {describe_dsn(self.database_url)}"

    def require_serving(self) -> None:
        """What ``dipc serve`` needs beyond what every command needs."""
        if not self.clients:
            raise ConfigError(
                "no DOKU client configured: set DIPC_CLIENT_ID and DIPC_SECRET_KEY "
                "(or DIPC_CLIENTS_FILE), or run `dipc serve --demo`"
            )
        keyless = sorted(client_id for client_id, client in self.clients.items() if not client.secret_keys)
        if keyless:
            raise ConfigError(f"no secret key for DOKU client(s) {', '.join(keyless)}: set DIPC_SECRET_KEY")
        if self.admin_port is not None and self.admin_port == self.port:
            raise ConfigError(
                f"DIPC_ADMIN_PORT={self.admin_port} is DIPC_PORT too: the admin API needs a port of its own"
            )
        if self.webhook_url and not self.webhook_secrets:
            raise ConfigError("DIPC_WEBHOOK_URL needs DIPC_WEBHOOK_SECRET: webhooks are always signed")


def describe_dsn(dsn: str) -> str:
    """``user@host:port/dbname`` of a DSN, without its password or query (safe to log)."""
    parts = urlsplit(dsn)
    query = dict(parse_qsl(parts.query))
    host = parts.hostname or query.get("host", "")
    port = f":{parts.port}" if parts.port else ""
    user = f"{parts.username or query.get('user', '')}@" if parts.username or query.get("user") else ""
    return f"{user}{host}{port}{parts.path or '/'}"


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int = 0) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} must be at least {minimum}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}={value} must be a positive number")
    return value


def _schedule(env: Mapping[str, str]) -> tuple[float, ...]:
    raw = env.get("DIPC_RECONCILE_SCHEDULE", "").strip()
    if not raw:
        return DEFAULT_RECONCILE_SCHEDULE
    problem = (
        f"DIPC_RECONCILE_SCHEDULE={raw!r} must be increasing positive seconds after the first quote, "
        "comma-separated, e.g. 120,900,3600"
    )
    try:
        schedule = tuple(float(item) for item in raw.split(","))
    except ValueError:
        raise ConfigError(problem) from None
    if any(not 0 < value < 10**8 for value in schedule) or list(schedule) != sorted(set(schedule)):
        raise ConfigError(problem)
    return schedule


def _switch(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("on", "true", "1", "yes"):
        return True
    if raw in ("off", "false", "0", "no"):
        return False
    raise ConfigError(f"{name}={raw!r} must be on or off")


def _doku_api_url(env: Mapping[str, str], demo: bool) -> str | None:
    url = env.get("DIPC_DOKU_API_URL", "").strip().rstrip("/")
    if not url:
        # The demo's credentials mean nothing to DOKU: it talks to a stand-in or to nobody.
        return None if demo else DOKU_API_URL
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(f"DIPC_DOKU_API_URL={url!r} must be an http:// or https:// base URL")
    if parts.username or parts.password:
        raise ConfigError(
            "DIPC_DOKU_API_URL must not carry credentials: DOKU's API is signed, not logged in to"
        )
    # A paid answer becomes a payment: outside a rehearsal on this machine, only over TLS.
    if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise ConfigError(
            f"DIPC_DOKU_API_URL={url!r} must be https:// (plain http only for a stand-in on loopback)"
        )
    if demo and (parts.hostname == "doku.com" or parts.hostname.endswith(".doku.com")):
        raise ConfigError(
            "--demo never calls the real DOKU: point DIPC_DOKU_API_URL at a stand-in "
            "(`dipc simulate doku-api --demo`) or leave it unset"
        )
    return url


# Paths dipc serves besides DOKU's two (server/http/ops.py, and the admin API under its prefix): a DOKU
# path there would take (or lose) their routes.
HEALTH_PATH = "/healthz"
READY_PATH = "/readyz"
METRICS_PATH = "/metrics"
OTHER_PATHS = (HEALTH_PATH, READY_PATH, METRICS_PATH)
ADMIN_PREFIX = "/v1"


def _path(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name, "").strip() or default
    if not value.startswith("/"):
        raise ConfigError(f"{name}={value!r} must be a path starting with '/'")
    if value in OTHER_PATHS or value == ADMIN_PREFIX or value.startswith(ADMIN_PREFIX + "/"):
        mine = ", ".join(OTHER_PATHS)
        raise ConfigError(f"{name}={value!r} is served already: {mine} and /v1/… are dipc's own")
    return value


def _networks(env: Mapping[str, str], name: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for item in env.get(name, "").split(","):
        if not item.strip():
            continue
        try:
            networks.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ConfigError(f"{name}: {item.strip()!r} is not an IP address or CIDR network") from None
    return tuple(networks)


def _keys(text: str) -> tuple[bytes, ...]:
    return tuple(key.strip().encode() for key in text.split(",") if key.strip())


def _clients_from_file(path: Path, env: Mapping[str, str]) -> dict[str, Client]:
    """``[[clients]]`` tables: ``client_id`` and ``secret_keys`` (a list) or ``secret_keys_env``."""
    try:
        document = tomllib.loads(path.read_text("utf-8"))
    except OSError as error:
        raise ConfigError(f"DIPC_CLIENTS_FILE: cannot read {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"DIPC_CLIENTS_FILE: {path} is not valid TOML: {error}") from None
    clients: dict[str, Client] = {}
    for index, table in enumerate(document.get("clients", [])):
        where = f"DIPC_CLIENTS_FILE {path}, clients[{index}]"
        client_id = table.get("client_id")
        if not isinstance(client_id, str) or not client_id.strip():
            raise ConfigError(f"{where}: client_id is required")
        if "secret_keys_env" in table:
            keys = _keys(env.get(str(table["secret_keys_env"]), ""))
        else:
            raw_keys = table.get("secret_keys", [])
            if not isinstance(raw_keys, list) or not all(isinstance(key, str) for key in raw_keys):
                raise ConfigError(f"{where}: secret_keys must be a list of strings")
            keys = tuple(key.encode() for key in raw_keys if key)
        if client_id in clients:
            raise ConfigError(f"{where}: client_id {client_id} appears twice")
        clients[client_id] = Client(client_id=client_id.strip(), secret_keys=keys)
    if not clients:
        raise ConfigError(f"DIPC_CLIENTS_FILE {path} declares no [[clients]]")
    return clients


def load_settings(env: Mapping[str, str] | None = None, *, demo: bool = False) -> Settings:
    """Settings from ``env`` (default: the process environment); ``demo`` uses the fixed demo identity."""
    env = os.environ if env is None else env
    if demo:
        clients = {DEMO_CLIENT_ID: Client(DEMO_CLIENT_ID, (DEMO_SECRET_KEY.encode(),))}
        admin_tokens: tuple[str, ...] = (DEMO_ADMIN_TOKEN,)
        bins_spec: str | None = DEMO_BINS
    else:
        clients = {}
        if env.get("DIPC_CLIENTS_FILE", "").strip():
            clients = _clients_from_file(Path(env["DIPC_CLIENTS_FILE"].strip()), env)
        elif env.get("DIPC_CLIENT_ID", "").strip():
            client_id = env["DIPC_CLIENT_ID"].strip()
            clients = {client_id: Client(client_id, _keys(env.get("DIPC_SECRET_KEY", "")))}
        admin_tokens = tuple(t.strip() for t in env.get("DIPC_ADMIN_TOKEN", "").split(",") if t.strip())
        bins_spec = env.get("DIPC_BINS")
    try:
        bins = BinTable.parse(bins_spec)
    except BinConfigError as error:
        raise ConfigError(f"DIPC_BINS: {error}") from None
    webhook_url = env.get("DIPC_WEBHOOK_URL", "").strip() or None
    if webhook_url and not webhook_url.startswith(("http://", "https://")):
        raise ConfigError(f"DIPC_WEBHOOK_URL={webhook_url!r} must be an http:// or https:// URL")
    log_format = env.get("DIPC_LOG_FORMAT", "auto").strip().lower() or "auto"
    if log_format not in ("auto", "json", "console"):
        raise ConfigError(f"DIPC_LOG_FORMAT={log_format!r} must be json, console or auto")
    log_level = env.get("DIPC_LOG_LEVEL", "INFO").strip().upper() or "INFO"
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"DIPC_LOG_LEVEL={log_level!r} must be DEBUG, INFO, WARNING or ERROR")
    raw_database_url = env.get("DATABASE_URL", "").strip()
    if raw_database_url and raw_database_url != EMBEDDED and "://" not in raw_database_url:
        raise ConfigError(
            f"DATABASE_URL must be a postgresql:// URL or {EMBEDDED!r}, not {raw_database_url[:20]!r}…"
        )
    settings = Settings(
        database_url=None if raw_database_url in ("", EMBEDDED) else raw_database_url,
        database_chosen=bool(raw_database_url) or demo,
        data_dir=Path(env.get("DIPC_DATA_DIR", "").strip() or ".dipc"),
        host=env.get("DIPC_HOST", "").strip() or "127.0.0.1",
        port=_int(env, "DIPC_PORT", 8080),
        admin_port=_int(env, "DIPC_ADMIN_PORT", 0, minimum=0) or None,
        admin_host=env.get("DIPC_ADMIN_HOST", "").strip() or None,
        workers=_int(env, "DIPC_WORKERS", 1, minimum=1),
        clients=clients,
        admin_tokens=admin_tokens,
        bins=bins,
        inquiry_path=_path(env, "DIPC_INQUIRY_PATH", "/doku/inquiry"),
        notification_path=_path(env, "DIPC_NOTIFICATION_PATH", "/doku/notification"),
        max_skew_s=_int(env, "DIPC_MAX_SKEW_S", conventions.DEFAULT_MAX_SKEW_S, minimum=1),
        notification_max_age_s=_int(
            env, "DIPC_NOTIFICATION_MAX_AGE_S", conventions.DEFAULT_NOTIFICATION_MAX_AGE_S, minimum=1
        ),
        max_body_bytes=_int(env, "DIPC_MAX_BODY_BYTES", conventions.DEFAULT_MAX_BODY_BYTES, minimum=1024),
        import_max_bytes=_int(env, "DIPC_IMPORT_MAX_BYTES", 1024 * 1024 * 1024, minimum=1024),
        doku_db_timeout_s=_float(env, "DIPC_DOKU_DB_TIMEOUT_S", 0.8),
        notification_db_timeout_s=_float(env, "DIPC_NOTIFICATION_DB_TIMEOUT_S", 5.0),
        admin_db_timeout_s=_float(env, "DIPC_ADMIN_DB_TIMEOUT_S", 30.0),
        inquiry_batches=_int(env, "DIPC_INQUIRY_BATCHES", 1, minimum=1),
        db_pool_min=_int(env, "DIPC_DB_POOL_MIN", 2, minimum=0),
        db_pool_max=_int(env, "DIPC_DB_POOL_MAX", 10, minimum=1),
        db_connect_timeout_s=_float(env, "DIPC_DB_CONNECT_TIMEOUT_S", 5.0),
        db_statement_cache_size=_int(env, "DIPC_DB_STATEMENT_CACHE_SIZE", 100),
        listen_database_url=env.get("DIPC_LISTEN_DATABASE_URL", "").strip() or None,
        webhook_url=webhook_url,
        webhook_secrets=_keys(env.get("DIPC_WEBHOOK_SECRET", "")),
        webhook_max_attempts=_int(env, "DIPC_WEBHOOK_MAX_ATTEMPTS", 20, minimum=1),
        webhook_backoff_base_s=_float(env, "DIPC_WEBHOOK_BACKOFF_BASE_S", 1.0),
        webhook_backoff_cap_s=_float(env, "DIPC_WEBHOOK_BACKOFF_CAP_S", 3600.0),
        webhook_timeout_s=_float(env, "DIPC_WEBHOOK_TIMEOUT_S", 10.0),
        webhook_concurrency=_int(env, "DIPC_WEBHOOK_CONCURRENCY", 8, minimum=1),
        doku_api_url=_doku_api_url(env, demo),
        doku_api_timeout_s=_float(env, "DIPC_DOKU_API_TIMEOUT_S", 10.0),
        reconcile=_switch(env, "DIPC_RECONCILE", True),
        reconcile_schedule=_schedule(env),
        reconcile_rps=_float(env, "DIPC_RECONCILE_RPS", 5.0),
        reconcile_concurrency=_int(env, "DIPC_RECONCILE_CONCURRENCY", 4, minimum=1),
        log_format=log_format,
        log_level=log_level,
        shutdown_timeout_s=_float(env, "DIPC_SHUTDOWN_TIMEOUT_S", 20.0),
        metrics_sample_s=_float(env, "DIPC_METRICS_SAMPLE_S", 5.0),
        header_timeout_s=_float(env, "DIPC_HEADER_TIMEOUT_S", 10.0),
        body_timeout_s=_float(env, "DIPC_BODY_TIMEOUT_S", 10.0),
        max_body_reads=_int(env, "DIPC_MAX_BODY_READS", 128, minimum=1),
        feed_max_waiters=_int(env, "DIPC_FEED_MAX_WAITERS", 100, minimum=1),
        trusted_proxies=_networks(env, "DIPC_TRUSTED_PROXIES"),
        demo=demo,
    )
    if settings.inquiry_path == settings.notification_path:
        raise ConfigError("DIPC_INQUIRY_PATH and DIPC_NOTIFICATION_PATH must differ")
    if settings.admin_port is not None and settings.admin_port > 65535:
        raise ConfigError(f"DIPC_ADMIN_PORT={settings.admin_port} is not a TCP port")
    if settings.db_pool_min > settings.db_pool_max:
        raise ConfigError("DIPC_DB_POOL_MIN must not exceed DIPC_DB_POOL_MAX")
    if settings.inquiry_batches > settings.db_pool_max:
        raise ConfigError(
            "DIPC_INQUIRY_BATCHES must not exceed DIPC_DB_POOL_MAX: each batch holds a connection"
        )
    return settings
