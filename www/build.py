"""Build the relay's web pages: ``<source>/*.md`` through one layout into static files.

Each Markdown source is first a Jinja template rendered with the relay's settings, then
Markdown, then put into ``layout.html``. Assets (``main.css``, ``logo.svg``,
``robots.txt``) come from the package's templates unless the source folder has its own.
The build is idempotent: only files whose bytes differ are written, files an earlier build
wrote but this one does not are removed, and the result says whether anything changed
(the Salt state runs it on every highstate with ``--salt-stateful``).

``chatmail-www --ini chatmail.ini --out DIR --serve`` builds into DIR, serves it on
localhost and rebuilds whenever a source, the layout or the ini changes.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import jinja2
import markdown
from chatmail_www.qr import qr_svg
from markupsafe import Markup, escape

from chatmaild.config import DEFAULT_INI_PATH, Config, ConfigError, read_config
from chatmaild.fileio import write_bytes_atomic

log = logging.getLogger("chatmail_www")

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_SOURCE = PACKAGE_DIR / "src"
TEMPLATE_DIR = PACKAGE_DIR / "templates"
LAYOUT = "layout.html"
DEFAULT_ASSETS = ("main.css", "logo.svg", "robots.txt")
SELF_SIGNED_SCRIPT = "account.js"
MANIFEST = ".chatmail-www-manifest"
NAV_ORDER = ("index", "info", "privacy")
NEW_ACCOUNT_PATH = "/new"
MARKDOWN_EXTENSIONS = ("attr_list", "sane_lists", "tables", "toc")
CONFLICT_MARKER = re.compile(r"^(<{7}|>{7}) ", re.MULTILINE)
# Characters Markdown would read as markup when they come from a setting (a domain with
# underscores, an operator's address with asterisks): written as character references.
MARKDOWN_ENTITIES = str.maketrans({c: f"&#{ord(c)};" for c in "\\`*_[]"})
NOT_PROVIDED = Markup('<em class="missing">not provided by the operator</em>')


class BuildError(Exception):
    """The pages cannot be built from these sources; nothing was written."""


@dataclass(frozen=True)
class Page:
    stem: str
    filename: str
    title: str
    nav_label: str


@dataclass(frozen=True)
class WriteResult:
    written: tuple[str, ...]
    removed: tuple[str, ...]

    @property
    def changed(self) -> bool:
        return bool(self.written or self.removed)


def source_dir(config: Config, ini_path: Path, override: Path | None = None) -> Path:
    """The folder with ``index.md``: ``--src``, else ini ``www_folder``, else the package's.

    Like upstream, a ``www_folder`` may hold the sources directly or in ``src/``; a relative
    one is relative to the ini file.
    """
    if override is not None:
        return Path(override)
    if config.www_folder.strip():
        folder = Path(config.www_folder.strip())
        if not folder.is_absolute():
            folder = ini_path.resolve().parent / folder
        return folder / "src" if (folder / "src" / "index.md").is_file() else folder
    return DEFAULT_SOURCE


def contact(value: str, kind: str = "text") -> Markup:
    """A privacy contact, visibly marked when the operator left it empty."""
    value = value.strip()
    if not value:
        return NOT_PROVIDED
    text = Markup("<br>").join(_markdown_safe(line.strip()) for line in value.splitlines())
    if kind == "mail":
        return Markup('<a href="mailto:{0}">{0}</a>').format(text)
    return text


def _markdown_safe(value: object) -> object:
    """Jinja ``finalize`` for Markdown sources: settings print as literal text."""
    if isinstance(value, Markup) or not isinstance(value, str):
        return value
    return Markup(str(escape(value)).translate(MARKDOWN_ENTITIES))


def account_link(config: Config) -> str:
    return f"DCACCOUNT:https://{config.mail_domain}{NEW_ACCOUNT_PATH}"


def qr_filename(config: Config) -> str:
    return f"qr-chatmail-invite-{config.mail_domain}.svg"


def account_block(config: Config) -> Markup:
    """The QR code and button that create an account (``{{ account_qr }}`` in Markdown)."""
    domain = escape(config.mail_domain)
    if config.tls_cert_mode == "self":
        # Credentials are fresh per visit: account.js asks /new and draws the dclogin: QR.
        return Markup(
            '<div class="account" id="account" data-new-url="{new}" data-domain="{domain}">\n'
            '<a class="qr" id="account-qr" href="#account">'
            '<span class="qr-placeholder">QR code for {domain}</span></a>\n'
            '<p><a class="button" id="account-link" href="#account" aria-disabled="true">'
            "Set up an account on {domain}</a></p>\n"
            '<p id="account-status" role="status">This page creates login credentials with '
            "JavaScript, because this relay has no publicly trusted certificate.</p>\n"
            '<p><button type="button" id="account-again" hidden>New credentials</button></p>\n'
            "</div>\n"
            '<script src="{script}"></script>'
        ).format(new=NEW_ACCOUNT_PATH, domain=domain, script=SELF_SIGNED_SCRIPT)
    link = account_link(config)
    label = f"QR code: create an account on {config.mail_domain}"
    return Markup(
        '<div class="account" id="account">\n'
        '<a class="qr" href="{link}">{svg}</a>\n'
        '<p><a class="button" href="{link}">Get an account on {domain}</a></p>\n'
        '<p class="hint"><a href="{file}" download>Download the QR code</a> to print it.</p>\n'
        "</div>"
    ).format(
        link=link,
        svg=Markup(qr_svg(link, config.mail_domain, label)),
        domain=domain,
        file=qr_filename(config),
    )


def page_context(config: Config) -> dict[str, object]:
    """What Markdown sources can use besides ``config`` itself."""
    return {
        "config": config,
        "domain": config.mail_domain,
        "address_domain": config.address_domain,
        "self_signed": config.tls_cert_mode == "self",
        "max_message_size_mb": round(config.max_message_size / 2**20),
        "contact": contact,
        "account_qr": account_block(config),
    }


def _environment(source: Path, **options: object) -> jinja2.Environment:
    loader = jinja2.ChoiceLoader(
        [jinja2.FileSystemLoader(source), jinja2.FileSystemLoader(TEMPLATE_DIR)]
    )
    return jinja2.Environment(
        loader=loader,
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        **options,
    )


def _title(body_html: str, stem: str) -> str:
    match = re.search(r"<h1[^>]*>(.*?)</h1>", body_html, re.DOTALL)
    if not match:
        return stem.replace("-", " ").capitalize()
    return html.unescape(re.sub(r"<[^>]+>", "", match.group(1))).strip()


def _nav_key(stem: str) -> tuple[int, str]:
    return (NAV_ORDER.index(stem) if stem in NAV_ORDER else len(NAV_ORDER), stem)


def _read_source(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BuildError(f"cannot read {path}: {exc}") from None
    if CONFLICT_MARKER.search(text):
        raise BuildError(f"{path} contains merge conflict markers")
    return text


def render_site(config: Config, source: Path) -> dict[str, bytes]:
    """Every file of the site, by relative path; pure apart from reading the sources."""
    if not (source / "index.md").is_file():
        raise BuildError(f"{source} has no index.md")
    markdown_env = _environment(source, finalize=_markdown_safe)
    layout_env = _environment(source)
    context = page_context(config)

    bodies: dict[str, str] = {}
    for path in sorted(source.glob("*.md"), key=lambda p: _nav_key(p.stem)):
        try:
            text = markdown_env.from_string(_read_source(path)).render(context)
        except jinja2.TemplateError as exc:
            raise BuildError(f"{path}: {exc}") from None
        bodies[path.stem] = markdown.markdown(text, extensions=list(MARKDOWN_EXTENSIONS))
    pages = [
        Page(
            stem=stem,
            filename=f"{stem}.html",
            title=_title(body, stem),
            nav_label="Home" if stem == "index" else stem.replace("-", " ").capitalize(),
        )
        for stem, body in bodies.items()
    ]

    if (source / LAYOUT).is_file():
        _read_source(source / LAYOUT)
    try:
        layout = layout_env.get_template(LAYOUT)
    except jinja2.TemplateError as exc:
        raise BuildError(f"{LAYOUT}: {exc}") from None

    files: dict[str, bytes] = {}
    for page in pages:
        try:
            rendered = layout.render(
                config=config, page=page, pages=pages, content=Markup(bodies[page.stem])
            )
        except jinja2.TemplateError as exc:
            raise BuildError(f"{LAYOUT} for {page.filename}: {exc}") from None
        files[page.filename] = rendered.encode("utf-8")

    for name in DEFAULT_ASSETS:
        files[name] = (TEMPLATE_DIR / name).read_bytes()
    if config.tls_cert_mode == "self":
        files[SELF_SIGNED_SCRIPT] = (TEMPLATE_DIR / SELF_SIGNED_SCRIPT).read_bytes()
    else:
        label = f"QR code: create an account on {config.mail_domain}"
        files[qr_filename(config)] = qr_svg(account_link(config), config.mail_domain, label).encode(
            "utf-8"
        )
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source).as_posix()
        if not path.is_file() or path.suffix == ".md" or relative == LAYOUT:
            continue
        if any(part.startswith(".") or part.endswith("~") for part in relative.split("/")):
            continue
        if path.suffix in (".css", ".html"):
            _read_source(path)
        try:
            files[relative] = path.read_bytes()
        except OSError as exc:
            raise BuildError(f"cannot read {path}: {exc}") from None
    return files


def _read_manifest(out: Path) -> set[str]:
    """Files an earlier build wrote; names leading outside ``out`` are ignored, not deleted."""
    try:
        names = set((out / MANIFEST).read_text(encoding="utf-8").split("\n")) - {""}
    except FileNotFoundError:
        return set()
    root = out.resolve()
    return {name for name in names if (root / name).resolve().is_relative_to(root)}


def _differs(path: Path, data: bytes) -> bool:
    try:
        return not (path.read_bytes() == data and (path.stat().st_mode & 0o777) == 0o644)
    except FileNotFoundError:
        return True


def _write_if_different(path: Path, data: bytes) -> bool:
    if not _differs(path, data):
        return False
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    write_bytes_atomic(path, data, mode=0o644)
    os.chmod(path, 0o644)  # readable by the web server whatever the umask
    return True


def _remove_files(out: Path, relatives: set[str]) -> list[str]:
    removed = []
    for relative in sorted(relatives):
        target = out / relative
        if target.is_file():
            target.unlink()
            removed.append(relative)
            # Drop directories the build made and nothing else uses.
            for parent in target.parents:
                if parent == out or any(parent.iterdir()):
                    break
                parent.rmdir()
    return removed


def write_site(files: dict[str, bytes], out: Path, dry_run: bool = False) -> WriteResult:
    """Make ``out`` hold exactly ``files`` plus whatever this builder never wrote.

    ``dry_run``: touch nothing, report what a build would write and remove (Salt's test mode).
    """
    stale = _read_manifest(out) - set(files)
    if dry_run:
        written = [name for name, data in sorted(files.items()) if _differs(out / name, data)]
        removed = [name for name in sorted(stale) if (out / name).is_file()]
        return WriteResult(written=tuple(written), removed=tuple(removed))
    out.mkdir(mode=0o755, parents=True, exist_ok=True)
    written = [
        name for name, data in sorted(files.items()) if _write_if_different(out / name, data)
    ]
    removed = _remove_files(out, stale)
    manifest = "".join(f"{name}\n" for name in sorted(files)).encode("utf-8")
    _write_if_different(out / MANIFEST, manifest)
    return WriteResult(written=tuple(written), removed=tuple(removed))


def clean_site(out: Path, dry_run: bool = False) -> WriteResult:
    """Remove every file an earlier build wrote (the pages are disabled)."""
    if dry_run:
        built = [name for name in sorted(_read_manifest(out)) if (out / name).is_file()]
        return WriteResult(written=(), removed=tuple(built))
    removed = _remove_files(out, _read_manifest(out))
    (out / MANIFEST).unlink(missing_ok=True)
    return WriteResult(written=(), removed=tuple(removed))


def build(
    ini_path: Path, out: Path, source: Path | None = None, dry_run: bool = False
) -> WriteResult:
    config = read_config(ini_path)
    files = render_site(config, source_dir(config, ini_path, source))
    return write_site(files, out, dry_run)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatmail-www", description="Build the relay's web pages from Markdown sources."
    )
    parser.add_argument("--ini", type=Path, default=DEFAULT_INI_PATH, help="chatmail.ini")
    parser.add_argument("--out", type=Path, required=True, help="folder the site is written to")
    parser.add_argument(
        "--src",
        type=Path,
        help="source folder (default: ini www_folder, else the pages shipped with chatmail)",
    )
    parser.add_argument(
        "--clean",
        action="store_true",
        help="remove the files an earlier build wrote instead of building",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="write nothing; report what the build (or --clean) would change",
    )
    parser.add_argument(
        "--salt-stateful",
        action="store_true",
        help="print one JSON line for Salt's cmd.run stateful protocol",
    )
    parser.add_argument(
        "--serve", action="store_true", help="serve the site on localhost and rebuild on changes"
    )
    parser.add_argument("--port", type=int, default=8000, help="port for --serve (0: any)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    if args.serve:
        from chatmail_www.preview import serve

        return serve(args.ini, args.out, args.src, args.port)
    try:
        if args.clean:
            result = clean_site(args.out, args.dry_run)
        else:
            result = build(args.ini, args.out, args.src, args.dry_run)
    except (BuildError, ConfigError) as exc:
        log.error("%s", exc)
        return 1
    except OSError as exc:
        log.error("cannot write the site to %s: %s", args.out, exc)
        return 1
    would = "would have " if args.dry_run else ""
    for name in result.written:
        log.info("%swritten %s", would, args.out / name)
    for name in result.removed:
        log.info("%sremoved %s", would, args.out / name)
    if args.salt_stateful:
        comment = (
            f"{would}{len(result.written)} written, {len(result.removed)} removed in {args.out}"
            if result.changed
            else f"{args.out} is up to date"
        )
        sys.stdout.write(
            json.dumps(
                {
                    "changed": result.changed,
                    "comment": comment,
                    "written": list(result.written),
                    "removed": list(result.removed),
                }
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
