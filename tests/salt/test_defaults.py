"""The formula's chatmail.ini defaults (parameters/defaults.yaml) against chatmaild's.

Both state a default for every ``[params]`` key: the formula for the ini it writes,
chatmaild for an ini that leaves a key out (an upstream one). They must agree, except
where the formula deploys something else on purpose: those keys are listed with why.
"""

from __future__ import annotations

import pytest
import yaml
from saltsupport import REPO

from chatmaild.config import DEFAULT_INI_PATH, Config, parse_params

DEFAULTS = yaml.safe_load((REPO / "salt/chatmail/parameters/defaults.yaml").read_text())

#: Keys whose formula default differs from chatmaild's on purpose.
DELIBERATE = {
    # The formula deploys no iroh-relay: it advertises none ("") instead of upstream's
    # https://<mail_domain> (None), which would point clients at nothing.
    "iroh_relay",
    # The formula runs unbound on the relay: filtermail asks it directly (see the
    # comment in defaults.yaml); chatmaild alone falls back to /etc/resolv.conf ("").
    "dns_resolver",
}

#: Keys map.jinja derives from other map keys (ipv6, tls, paths); not in settings.
DERIVED = {
    "mail_domain",
    "tls_mode",
    "disable_ipv6",
    "tls_external_cert_and_key",
    "mailboxes_dir",
    "nocreate_file",
    "counters_dir",
    "blocklist_file",
}


def ini_value(value: object) -> str:
    """A map value as the chatmail.ini template writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def test_every_ini_key_has_a_formula_default():
    assert set(DEFAULTS["settings"]) == set(Config.model_fields) - DERIVED


@pytest.mark.parametrize("key", sorted(set(Config.model_fields) - DERIVED - DELIBERATE))
def test_formula_default_is_chatmaild_default(key):
    value = DEFAULTS["settings"][key]
    chatmaild = Config(mail_domain="chat.example.org")
    if value is None:  # left out of the ini: chatmaild's default must mean "not set"
        assert getattr(chatmaild, key) is None
        return
    formula = parse_params({"mail_domain": "chat.example.org", key: ini_value(value)}).config
    assert getattr(formula, key) == getattr(chatmaild, key)


@pytest.mark.parametrize("key", sorted(DELIBERATE))
def test_deliberate_differences_still_differ(key):
    """A listed key that came to agree leaves the list."""
    value = DEFAULTS["settings"][key]
    formula = parse_params({"mail_domain": "chat.example.org", key: ini_value(value)}).config
    assert getattr(formula, key) != getattr(Config(mail_domain="chat.example.org"), key)


def test_derived_path_defaults_agree():
    """map.jinja writes these from paths: its defaults are chatmaild's (and upstream's)."""
    paths = DEFAULTS["paths"]
    assert paths["ini"] == str(DEFAULT_INI_PATH)
    chatmaild = Config(mail_domain="chat.example.org")
    assert paths["nocreate"] == str(chatmaild.nocreate_file)
    assert paths["counters"] == str(chatmaild.counters_dir)
    assert f"{paths['vmail_home']}/mail/chat.example.org" == str(chatmaild.mailboxes_path)
