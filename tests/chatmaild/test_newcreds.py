"""Credentials proposed by ``POST /new`` and ``chatmail-newcreds``."""

from __future__ import annotations

import json
import re
import string
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from chatmaild.newcreds import Credentials, create_credentials, main, make_dclogin_url


def test_defaults(make_config):
    config = make_config("chat.example.org")
    creds = create_credentials(config)
    localpart, domain = creds.email.split("@")
    assert domain == "chat.example.org"
    assert re.fullmatch(r"[a-z0-9]{9}", localpart)
    assert len(creds.password) == 12  # password_min_length + 3
    assert set(creds.password) <= set(string.ascii_letters + string.digits + string.punctuation)
    assert creds.dclogin_url is None  # acme mode


def test_lengths_follow_the_config(make_config):
    config = make_config("chat.example.org", username_max_length=20, password_min_length=30)
    creds = create_credentials(config)
    assert len(creds.email.split("@")[0]) == 20
    assert len(creds.password) == 33


def test_two_calls_differ(make_config):
    config = make_config("chat.example.org")
    many = [create_credentials(config) for _ in range(50)]
    assert len({c.email for c in many}) == 50
    assert len({c.password for c in many}) == 50


def test_external_tls_has_no_dclogin_url(make_config, tmp_path):
    config = make_config(
        "chat.example.org", tls_external_cert_and_key=f"{tmp_path}/c.pem {tmp_path}/k.pem"
    )
    assert config.tls_cert_mode == "external"
    assert create_credentials(config).dclogin_url is None


def test_underscore_domain_gets_dclogin_url_without_ip_hosts(make_config):
    config = make_config("_chat.example.org")
    assert config.tls_cert_mode == "self"
    creds = create_credentials(config)
    assert creds.email.endswith("@_chat.example.org")
    url = urlsplit(creds.dclogin_url)
    assert url.scheme == "dclogin"
    assert unquote(url.path) == creds.email
    query = parse_qs(url.query)
    assert query == {"p": [creds.password], "v": ["1"], "ic": ["3"]}
    assert creds.dclogin_url.endswith("&v=1&ic=3")


def test_ipv4_relay(make_config):
    config = make_config("1.3.3.7")
    creds = create_credentials(config)
    assert re.fullmatch(r"[a-z0-9]{9}@\[1\.3\.3\.7\]", creds.email)
    assert creds.dclogin_url.startswith(f"dclogin:{creds.email}?p=")
    assert creds.dclogin_url.endswith("&v=1&ih=1.3.3.7&sh=1.3.3.7&ic=3")


def test_password_is_percent_encoded(make_config):
    config = make_config("1.3.3.7")
    url = make_dclogin_url(config, "user@[1.3.3.7]", "p@ss w+rd&x=1")
    assert url == (
        "dclogin:user@[1.3.3.7]?p=p%40ss%20w%2Brd%26x%3D1&v=1&ih=1.3.3.7&sh=1.3.3.7&ic=3"
    )


def test_unreadable_ini_is_a_clear_error(caplog, capsys):
    assert main(["/nonexistent/chatmail.ini"]) == 2
    assert "cannot read /nonexistent/chatmail.ini" in caplog.text
    assert capsys.readouterr().out == ""


def test_unknown_option_is_a_usage_error():
    with pytest.raises(SystemExit) as exc:
        main(["--remove"])
    assert exc.value.code == 2


def test_console_script_prints_json(make_config, ini_path):
    make_config("1.3.3.7")
    exe = Path(sys.executable).parent / "chatmail-newcreds"
    proc = subprocess.run(
        [str(exe), str(ini_path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert set(data) == {"email", "password", "dclogin_url"}
    Credentials(**data)


def test_console_script_omits_dclogin_url_for_acme(make_config, ini_path, capsys):
    make_config("chat.example.org")
    assert main([str(ini_path)]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"email", "password"}
