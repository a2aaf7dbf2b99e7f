"""Configuration from the environment: defaults, clients, key rotation lists, and clear refusals."""

from __future__ import annotations

import pytest

from server.config import DEMO_CLIENT_ID, ConfigError, load_settings


def test_defaults_need_nothing():
    settings = load_settings({})
    assert settings.database_url is None
    assert (settings.host, settings.port, settings.workers) == ("127.0.0.1", 8080, 1)
    assert settings.inquiry_path == "/doku/inquiry"
    assert settings.max_skew_s == 300
    assert settings.max_body_bytes == 64 * 1024
    assert not settings.clients
    assert not settings.bins


def test_one_client_with_rotated_keys_newest_first():
    settings = load_settings({"DIPC_CLIENT_ID": "MCH-1", "DIPC_SECRET_KEY": "new, old"})
    assert settings.clients["MCH-1"].secret_keys == (b"new", b"old")
    settings.require_serving()


def test_serving_needs_a_client_and_a_key():
    with pytest.raises(ConfigError, match="DIPC_CLIENT_ID"):
        load_settings({}).require_serving()
    with pytest.raises(ConfigError, match="no secret key"):
        load_settings({"DIPC_CLIENT_ID": "MCH-1"}).require_serving()


def test_demo_uses_the_fixed_identity_whatever_the_environment_says():
    settings = load_settings({"DIPC_CLIENT_ID": "MCH-REAL", "DIPC_SECRET_KEY": "real"}, demo=True)
    assert list(settings.clients) == [DEMO_CLIENT_ID]
    assert settings.bins
    assert settings.admin_tokens


def test_clients_file_declares_several_merchants(tmp_path):
    path = tmp_path / "clients.toml"
    path.write_text(
        """
[[clients]]
client_id = "MCH-1"
secret_keys = ["k1-new", "k1-old"]

[[clients]]
client_id = "MCH-2"
secret_keys_env = "MCH2_KEYS"
"""
    )
    settings = load_settings({"DIPC_CLIENTS_FILE": str(path), "MCH2_KEYS": "k2"})
    assert settings.clients["MCH-1"].secret_keys == (b"k1-new", b"k1-old")
    assert settings.clients["MCH-2"].secret_keys == (b"k2",)
    assert "k1-new" not in repr(settings.clients["MCH-1"])


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DIPC_BINS": "ALFA:12"}, "DIPC_BINS"),
        ({"DIPC_PORT": "eighty"}, "DIPC_PORT"),
        ({"DIPC_WORKERS": "0"}, "DIPC_WORKERS"),
        ({"DIPC_INQUIRY_PATH": "doku/inquiry"}, "DIPC_INQUIRY_PATH"),
        ({"DIPC_INQUIRY_PATH": "/x", "DIPC_NOTIFICATION_PATH": "/x"}, "must differ"),
        # (Found by review.) DOKU's path took the route of the health check, which then answered 405.
        ({"DIPC_NOTIFICATION_PATH": "/healthz"}, "DIPC_NOTIFICATION_PATH.*served"),
        ({"DIPC_INQUIRY_PATH": "/metrics"}, "DIPC_INQUIRY_PATH.*served"),
        ({"DIPC_INQUIRY_PATH": "/v1/doku"}, "DIPC_INQUIRY_PATH.*served"),
        ({"DIPC_LOG_FORMAT": "xml"}, "DIPC_LOG_FORMAT"),
        ({"DIPC_CLIENTS_FILE": "/nonexistent/clients.toml"}, "cannot read"),
        ({"DIPC_DOKU_DB_TIMEOUT_S": "-1"}, "positive"),
    ],
)
def test_malformed_settings_are_refused_naming_the_variable(env, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(env)


def test_a_broken_clients_file_is_refused(tmp_path):
    path = tmp_path / "clients.toml"
    path.write_text("[[clients]]\nsecret_keys = ['k']\n")
    with pytest.raises(ConfigError, match="client_id is required"):
        load_settings({"DIPC_CLIENTS_FILE": str(path)})
    path.write_text("not toml [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings({"DIPC_CLIENTS_FILE": str(path)})


def test_the_database_is_chosen_on_purpose_outside_demo():
    unset = load_settings({})
    assert unset.embedded
    assert not unset.database_chosen
    with pytest.raises(ConfigError, match="DATABASE_URL=embedded"):
        unset.require_database()
    load_settings({}, demo=True).require_database()  # --demo means the embedded database
    embedded = load_settings({"DATABASE_URL": "embedded"})
    embedded.require_database()
    assert embedded.embedded
    external = load_settings(
        {"DATABASE_URL": "postgresql://app:s3cret@db.internal:5432/dipc?sslmode=require"}
    )
    assert not external.embedded
    assert external.database_description() == "external PostgreSQL app@db.internal:5432/dipc"
    with pytest.raises(ConfigError, match="postgresql://"):
        load_settings({"DATABASE_URL": "embeded"})


def test_the_http_edge_limits_have_documented_defaults_and_refuse_nonsense():
    settings = load_settings({})
    assert (settings.header_timeout_s, settings.body_timeout_s, settings.max_body_reads) == (10.0, 10.0, 128)
    assert settings.feed_max_waiters == 100
    assert load_settings({"DIPC_FEED_MAX_WAITERS": "8"}).feed_max_waiters == 8
    assert settings.trusted_proxies == ()
    settings = load_settings({"DIPC_TRUSTED_PROXIES": "10.0.0.0/8, 192.168.1.7,::1"})
    assert [str(network) for network in settings.trusted_proxies] == [
        "10.0.0.0/8",
        "192.168.1.7/32",
        "::1/128",
    ]
    for name, value in [
        ("DIPC_TRUSTED_PROXIES", "10.0.0.0/8,proxy.local"),
        ("DIPC_BODY_TIMEOUT_S", "nan"),
        ("DIPC_HEADER_TIMEOUT_S", "inf"),
        ("DIPC_MAX_BODY_READS", "0"),
        ("DIPC_FEED_MAX_WAITERS", "0"),
    ]:
        with pytest.raises(ConfigError, match=name):
            load_settings({name: value})


def test_an_admin_port_is_a_port_of_its_own():
    assert load_settings({}).admin_port is None
    settings = load_settings({"DIPC_ADMIN_PORT": "9090", "DIPC_ADMIN_HOST": "127.0.0.1"})
    assert (settings.admin_port, settings.admin_host) == (9090, "127.0.0.1")
    for bad in ("http", "-1", "70000"):
        with pytest.raises(ConfigError, match="DIPC_ADMIN_PORT"):
            load_settings({"DIPC_ADMIN_PORT": bad})
    same = load_settings({"DIPC_ADMIN_PORT": "8080", "DIPC_CLIENT_ID": "M", "DIPC_SECRET_KEY": "K"})
    with pytest.raises(ConfigError, match="a port of its own"):
        same.require_serving()


def test_the_paths_a_doku_path_may_not_take_are_every_other_path_the_app_serves():
    """config.OTHER_PATHS and ADMIN_PREFIX refuse a DOKU path that would take (or lose) a route of dipc's
    own; a route added to the app without them would not be refused."""
    from server.app import make_app
    from server.config import ADMIN_PREFIX, OTHER_PATHS
    from tests.conftest import make_settings

    settings = make_settings()
    app = make_app(settings, "postgresql://nowhere.invalid/dipc")  # nothing connects until it starts
    served = {resource.canonical for resource in app.router.resources()}
    assert served - {settings.inquiry_path, settings.notification_path} == {*OTHER_PATHS, ADMIN_PREFIX}
