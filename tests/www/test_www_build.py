"""The builder: pages, settings on them, links, HTML5 structure, idempotence, overrides."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from pathlib import Path

import html5lib
import pytest
from chatmail_www.build import MANIFEST, BuildError, build, clean_site, main, render_site
from www_helpers import CONTACTS, SETTINGS, decode_qr, parse_page, svg_to_image, unresolved_links

PAGES = ("index.html", "info.html", "privacy.html")


def allowed_absolute(site) -> set[str]:
    allowed = {"https://delta.chat/", "https://delta.chat/download", "https://chatmail.at/"}
    if site.config.tls_cert_mode != "self":
        allowed.add(f"DCACCOUNT:https://{site.config.mail_domain}/new")
    if site.config.privacy_mail:
        allowed.add(f"mailto:{site.config.privacy_mail}")
    return allowed


def test_builds_the_three_pages_and_assets(site):
    built = {p.relative_to(site.out).as_posix() for p in site.out.rglob("*") if p.is_file()}
    expected = {*PAGES, "main.css", "logo.svg", "robots.txt", MANIFEST}
    if site.config.tls_cert_mode == "self":
        expected.add("account.js")
    else:
        expected.add(f"qr-chatmail-invite-{site.config.mail_domain}.svg")
    assert built == expected
    for path in site.out.iterdir():
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_robots_txt_disallows_everything(site):
    lines = (site.out / "robots.txt").read_text().splitlines()
    assert lines == ["User-agent: *", "Disallow: /"]
    for name in PAGES:
        assert {"name": "robots", "content": "noindex, nofollow"} in parse_page(
            site.out / name
        ).attrs("meta")


@pytest.mark.parametrize("name", PAGES)
def test_html5_structure(site, name):
    source = (site.out / name).read_text(encoding="utf-8")
    # html5lib in strict mode raises on every parse error of the HTML5 algorithm.
    html5lib.HTMLParser(strict=True, namespaceHTMLElements=False).parse(source)
    page = parse_page(site.out / name)
    assert page.doctype.lower() == "doctype html"
    assert page.lang == "en"
    metas = page.attrs("meta")
    assert {"charset": "utf-8"} in metas
    assert {"name": "viewport", "content": "width=device-width, initial-scale=1"} in metas
    assert page.count("h1") == 1
    assert site.config.mail_domain in page.title
    assert page.count("main") == 1 and page.count("nav") == 1
    for img in page.attrs("img"):
        assert "alt" in img, img
    # Headings never skip a level (h1 -> h3).
    levels = [int(tag[1]) for tag, _ in page.tags if re.fullmatch(r"h[1-6]", tag)]
    assert all(b - a <= 1 for a, b in itertools.pairwise(levels)), levels
    for svg in page.attrs("svg"):
        assert svg.get("role") == "img" and svg.get("aria-label"), svg


def test_every_link_resolves(site):
    assert unresolved_links(site.out, allowed_absolute(site)) == []


def test_no_external_resources(site):
    for name in PAGES:
        page = parse_page(site.out / name)
        for tag, attribute, value in page.urls():
            if tag in ("script", "img", "link", "iframe", "source", "video", "audio"):
                assert "://" not in value and not value.startswith("//"), (name, tag, value)
    css = (site.out / "main.css").read_text()
    assert "url(" not in css and "@import" not in css and "@font-face" not in css


def test_pages_show_the_relays_settings(site):
    text = {name: parse_page(site.out / name).plain_text for name in PAGES}
    domain = site.config.mail_domain
    for name in PAGES:
        assert domain in text[name], name
    info = text["info.html"]
    for fact in (
        "42 messages per minute, in bursts of up to 7",
        "20 MB",
        "750 MB",
        "deleted after 17 days",
        "after 5 days",
        "removed after 123 days",
        "8 to 11 characters",
        "at least 13 characters",
        f"name@{domain}",
    ):
        assert fact in info, fact
    assert "after 17 days at the latest" in text["index.html"]
    assert "123 days" in text["index.html"]
    privacy = text["privacy.html"]
    for fact in ("17 days", "5 days", "123 days", "750 MB", "11 random characters"):
        assert fact in privacy, fact
    # No Jinja left over, no Markdown syntax leaked.
    for name in PAGES:
        assert "{{" not in text[name] and "{%" not in text[name] and "**" not in text[name]


def test_privacy_contacts_are_shown_or_marked_missing(site):
    page = parse_page(site.out / "privacy.html")
    missing = page.plain_text.count("not provided by the operator")
    if site.config.mail_domain == "_relay.test":
        assert missing == 4
        assert "mailto:" not in (site.out / "privacy.html").read_text()
    else:
        assert missing == 0
        for value in CONTACTS.values():
            assert value in page.plain_text, value
        assert {"href": "mailto:privacy@example.org"} in page.attrs("a")
        # The operator's asterisks and underscores are text, not emphasis.
        assert page.count("em") == 0


def test_public_relay_qr_code_holds_the_account_link(public_site):
    site = public_site
    link = f"DCACCOUNT:https://{site.config.mail_domain}/new"
    index = (site.out / "index.html").read_text()
    inline_svg = re.search(r"<svg.*?</svg>", index, re.DOTALL).group(0)
    standalone = (site.out / f"qr-chatmail-invite-{site.config.mail_domain}.svg").read_text()
    assert inline_svg == standalone
    assert decode_qr(svg_to_image(standalone)) == [link]
    assert f">{site.config.mail_domain}</text>" in standalone
    hrefs = [a.get("href") for a in parse_page(site.out / "index.html").attrs("a")]
    assert hrefs.count(link) == 2  # the QR code itself and the button for phones


def test_self_signed_relay_page_has_no_static_credentials(self_site):
    site = self_site
    index = parse_page(site.out / "index.html")
    assert "DCACCOUNT" not in (site.out / "index.html").read_text()
    assert {"src": "account.js"} in index.attrs("script")
    account = next(a for a in index.attrs("div") if a.get("id") == "account")
    assert account["data-new-url"] == "/new" and account["data-domain"] == "_relay.test"
    # Without JavaScript the retry button would do nothing: the script reveals it.
    assert {"type": "button", "id": "account-again", "hidden": None} in index.attrs("button")


def test_self_signed_ordinary_domain_page_fetches_credentials(tmp_path, make_config):
    """``tls: mode: self`` on a normal domain: the mode, not the domain, picks the page."""
    make_config("relay.example.org", tls_mode="self", **SETTINGS)
    build(tmp_path / "chatmail.ini", tmp_path / "www")
    index = parse_page(tmp_path / "www" / "index.html")
    assert "DCACCOUNT" not in (tmp_path / "www" / "index.html").read_text()
    assert {"src": "account.js"} in index.attrs("script")


def test_second_build_changes_nothing(site):
    before = {p: p.stat().st_mtime_ns for p in site.out.iterdir()}
    result = build(site.ini, site.out)
    assert not result.changed
    assert {p: p.stat().st_mtime_ns for p in site.out.iterdir()} == before


def test_setting_change_rewrites_only_affected_files(site, make_config):
    domain = site.config.mail_domain
    contacts = CONTACTS if domain == "chat.example.org" else {}
    make_config(domain, **{**SETTINGS, "delete_mails_after": 9}, **contacts)
    result = build(site.ini, site.out)
    assert set(result.written) == set(PAGES)
    assert "deleted after 9 days" in parse_page(site.out / "info.html").plain_text


def test_custom_source_replaces_pages_and_stale_files_go(site, tmp_path):
    source = tmp_path / "operator-www"
    (source / "img").mkdir(parents=True)
    (source / "index.md").write_text(
        "# Hello from {{ domain }}\n\n{{ account_qr }}\n\n[Rules](rules.html)\n"
    )
    (source / "rules.md").write_text(
        "# House rules\n\nBe nice. Limit: {{ config.max_user_send_per_minute }}/min.\n"
    )
    (source / "img" / "team.png").write_bytes(b"\x89PNG fake")
    (source / ".hidden").write_text("not published")
    (site.out / "unrelated.txt").write_text("someone else's file")

    result = build(site.ini, site.out, source)
    assert "info.html" in result.removed and "privacy.html" in result.removed
    names = {p.relative_to(site.out).as_posix() for p in site.out.rglob("*") if p.is_file()}
    assert {"index.html", "rules.html", "img/team.png", "unrelated.txt"} <= names
    assert not {"info.html", "privacy.html", ".hidden"} & names
    rules = parse_page(site.out / "rules.html")
    assert "Limit: 42/min." in rules.plain_text
    assert [a["href"] for a in rules.attrs("a") if "aria-current" in a] == ["rules.html"]
    assert unresolved_links(site.out, allowed_absolute(site)) == []


def test_ini_www_folder_is_used(tmp_path, make_config):
    folder = tmp_path / "site"
    (folder / "src").mkdir(parents=True)
    (folder / "src" / "index.md").write_text("# Operator page for {{ domain }}\n")
    make_config("chat.example.org", www_folder="site")  # relative to the ini
    build(tmp_path / "chatmail.ini", tmp_path / "out")
    assert parse_page(tmp_path / "out" / "index.html").title == "Operator page for chat.example.org"
    assert not (tmp_path / "out" / "privacy.html").exists()


def test_operator_layout_overrides_the_default(tmp_path, make_config):
    source = tmp_path / "src"
    source.mkdir()
    (source / "index.md").write_text("# Hi\n")
    (source / "layout.html").write_text(
        "<!doctype html><title>{{ page.title }}</title>{{ content }}\n"
    )
    config = make_config()
    files = render_site(config, source)
    assert files["index.html"] == b'<!doctype html><title>Hi</title><h1 id="hi">Hi</h1>\n'
    assert "layout.html" not in files


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"info.md": "# no index\n"}, "has no index.md"),
        ({"index.md": "# {{ no_such_setting }}\n"}, "no_such_setting"),
        ({"index.md": "# {% if %}\n"}, "index.md"),
        ({"index.md": "<<<<<<< HEAD\na\n=======\nb\n>>>>>>> branch\n"}, "merge conflict"),
        ({"index.md": "# ok\n", "main.css": "<<<<<<< HEAD\n"}, "merge conflict"),
    ],
    ids=["no-index", "undefined-variable", "template-syntax", "conflict-md", "conflict-css"],
)
def test_bad_sources_fail_and_leave_the_site_alone(tmp_path, make_config, files, message):
    make_config()
    out = tmp_path / "out"
    build(tmp_path / "chatmail.ini", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    source = tmp_path / "bad"
    source.mkdir()
    for name, text in files.items():
        (source / name).write_text(text)
    with pytest.raises(BuildError, match=message):
        build(tmp_path / "chatmail.ini", out, source)
    assert (
        main(["--ini", str(tmp_path / "chatmail.ini"), "--out", str(out), "--src", str(source)])
        == 1
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_bad_ini_is_a_clean_error(tmp_path, caplog):
    ini = tmp_path / "chatmail.ini"
    ini.write_text("[params]\nmail_domain = chat.example.org\nmax_mailbox_size = lots\n")
    assert main(["--ini", str(ini), "--out", str(tmp_path / "out")]) == 1
    assert "max_mailbox_size" in caplog.text
    assert not (tmp_path / "out").exists()


def test_cli_salt_stateful_reports_changes_then_none(site, tmp_path):
    out = tmp_path / "fresh"
    command = [
        sys.executable,
        "-m",
        "chatmail_www.build",
        "--ini",
        str(site.ini),
        "--out",
        str(out),
        "--salt-stateful",
    ]
    first = subprocess.run(command, capture_output=True, text=True, check=True)
    second = subprocess.run(command, capture_output=True, text=True, check=True)
    assert '"changed": true' in first.stdout and "index.html" in first.stdout
    assert second.stdout.strip().startswith('{"changed": false')
    assert len(second.stdout.strip().splitlines()) == 1  # Salt parses stdout as one JSON object


def test_dry_run_reports_without_writing(site, make_config, tmp_path):
    """Salt's test mode runs the build with --dry-run: nothing pending on a built site, the
    pending change after a setting change, and no file touched either way."""
    def snapshot():
        return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in site.out.rglob("*") if p.is_file()}

    before = snapshot()
    assert not build(site.ini, site.out, dry_run=True).changed
    domain = site.config.mail_domain
    contacts = CONTACTS if domain == "chat.example.org" else {}
    make_config(domain, **{**SETTINGS, "delete_mails_after": 9}, **contacts)
    pending = build(site.ini, site.out, dry_run=True)
    assert set(pending.written) == set(PAGES) and not pending.removed
    assert set(clean_site(site.out, dry_run=True).removed) >= set(PAGES)
    fresh = build(site.ini, tmp_path / "never-made", dry_run=True)
    assert set(PAGES) <= set(fresh.written) and not (tmp_path / "never-made").exists()
    assert snapshot() == before


def test_clean_removes_only_built_files(site):
    (site.out / "unrelated.txt").write_text("keep me")
    result = clean_site(site.out)
    assert set(PAGES) <= set(result.removed)
    assert [p.name for p in site.out.iterdir()] == ["unrelated.txt"]
    assert not clean_site(site.out).changed


def test_markdown_sources_are_packaged():
    import chatmail_www

    package = Path(chatmail_www.__file__).parent
    assert {p.name for p in (package / "src").glob("*.md")} == {"index.md", "info.md", "privacy.md"}
    assert (package / "templates" / "layout.html").is_file()


def test_ipv4_relay_pages(tmp_path, make_config):
    config = make_config("203.0.113.5")
    out = tmp_path / "www"
    build(tmp_path / "chatmail.ini", out)
    assert config.tls_cert_mode == "self"
    info = parse_page(out / "info.html").plain_text
    assert "name@[203.0.113.5]" in info
    assert (out / "account.js").is_file()
    assert (
        unresolved_links(
            out, {"https://delta.chat/", "https://delta.chat/download", "https://chatmail.at/"}
        )
        == []
    )


def test_a_tampered_manifest_never_deletes_outside_the_site(site, tmp_path):
    outside = tmp_path / "precious.txt"
    outside.write_text("keep")
    (site.out / MANIFEST).write_text("index.html\n../precious.txt\n/etc/hostname\n")
    clean_site(site.out)
    assert outside.read_text() == "keep"
    assert not (site.out / "index.html").exists()


def test_unwritable_output_is_a_clean_error(tmp_path, make_config, caplog):
    make_config()
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the site folder should be")
    argv = ["--ini", str(tmp_path / "chatmail.ini"), "--out", str(blocker / "www")]
    assert main(argv) == 1
    assert "cannot write the site" in caplog.text
