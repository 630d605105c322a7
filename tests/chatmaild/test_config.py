import pytest

from chatmaild.config import ConfigError, load_config, parse_params, parse_size_mb


@pytest.mark.parametrize(
    ("text", "mb"),
    [("500M", 500), ("2G", 2048), (" 1g ", 1024), ("100MB", 100), ("256", 256)],
    ids=["M", "G", "spaces-lower", "MB", "bare"],
)
def test_parse_size_mb(text, mb):
    assert parse_size_mb(text) == mb


def test_parse_size_rejects_garbage():
    with pytest.raises(ValueError):
        parse_size_mb("lots")


def test_defaults_match_upstream(make_config):
    config = make_config("chat.example.org")
    assert config.max_user_send_per_minute == 60
    assert config.max_user_send_burst_size == 10
    assert config.max_mailbox_size_mb == 500
    assert config.max_message_size == 31457280
    assert (config.delete_mails_after, config.delete_large_after) == (20, 7)
    assert config.delete_inactive_users_after == 90
    assert (config.username_min_length, config.username_max_length) == (9, 9)
    assert config.password_min_length == 9
    assert config.tls_cert_mode == "acme"
    assert config.iroh_relay_url == "https://chat.example.org"


def test_underscore_domain_is_self_signed(make_config):
    assert make_config("_chat.example.org").tls_cert_mode == "self"


def test_ipv4_relay(make_config):
    config = make_config("1.2.3.4")
    assert config.ipv4_relay == "1.2.3.4"
    assert config.address_domain == "[1.2.3.4]"
    assert config.tls_cert_mode == "self"


def test_external_tls_takes_precedence(make_config):
    config = make_config("_x.org", tls_external_cert_and_key="/c.pem /k.pem")
    assert config.tls_cert_mode == "external"


@pytest.mark.parametrize("mode", ["acme", "self", "external"])
def test_tls_mode_key_wins_over_the_domain(mode):
    """The formula writes its mode (pillar tls:mode) as our own key ``tls_mode``."""
    params = {"mail_domain": "chat.example.org", "tls_mode": mode}
    if mode == "external":
        params["tls_external_cert_and_key"] = "/c.pem /k.pem"
    loaded = parse_params(params)
    assert loaded.config.tls_cert_mode == mode
    assert loaded.unused_keys == ()


@pytest.mark.parametrize(
    "params",
    [
        {"tls_mode": "external"},
        {"tls_mode": "self", "tls_external_cert_and_key": "/c.pem /k.pem"},
        {"tls_mode": "letsencrypt"},
    ],
    ids=["external-without-files", "files-without-external", "unknown-mode"],
)
def test_tls_mode_contradictions_name_the_key(params):
    with pytest.raises(ConfigError, match="tls_mode"):
        parse_params({"mail_domain": "x.org", **params})


def test_unknown_keys_are_reported_not_fatal():
    loaded = parse_params({"mail_domain": "x.org", "passthrough_senders": "a@b"})
    assert loaded.unused_keys == ("passthrough_senders",)


def test_bad_value_names_key_in_one_line():
    with pytest.raises(ConfigError) as excinfo:
        parse_params({"mail_domain": "x.org", "max_user_send_per_minute": "many"})
    message = str(excinfo.value)
    assert "max_user_send_per_minute" in message
    assert "many" in message
    assert "\n" not in message


def test_missing_domain_is_an_error():
    with pytest.raises(ConfigError, match="mail_domain"):
        parse_params({})


def test_boolean_values(make_config):
    assert make_config("x.org", disable_ipv6="TRUE").disable_ipv6 is True
    with pytest.raises(ConfigError, match="disable_ipv6"):
        make_config("x.org", disable_ipv6="maybe")


def test_missing_params_section(tmp_path):
    path = tmp_path / "chatmail.ini"
    path.write_text("[other]\nmail_domain = x.org\n")
    with pytest.raises(ConfigError, match=r"\[params\]"):
        load_config(path)


def test_empty_iroh_relay_advertises_nothing(make_config):
    config = make_config("x.org", iroh_relay="")
    assert config.iroh_relay_url == ""
    assert not config.enable_iroh_relay
