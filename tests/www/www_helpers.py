"""Reading built pages back: HTML structure, links, QR codes, headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import zxingcpp
from PIL import Image, ImageDraw

# Distinct from the defaults and from each other, so each number on a page has one source.
SETTINGS = {
    "max_user_send_per_minute": 42,
    "max_user_send_burst_size": 7,
    "max_mailbox_size": "750M",
    "max_message_size": 20 * 2**20,
    "delete_mails_after": 17,
    "delete_large_after": 5,
    "delete_inactive_users_after": 123,
    "username_min_length": 8,
    "username_max_length": 11,
    "password_min_length": 13,
}

# Markdown-looking characters must come out literally.
CONTACTS = {
    "privacy_postal": "Relay *Ops* GmbH, Main_Street_1, 10115 Berlin",
    "privacy_mail": "privacy@example.org",
    "privacy_pdo": "Dr. [DPO] Jane Roe",
    "privacy_supervisor": "BfDI, Graurheindorfer Str. 153, Bonn",
}

PHONE = (390, 844)
DESKTOP = (1280, 900)


@dataclass
class ParsedPage:
    doctype: str | None = None
    lang: str | None = None
    tags: list[tuple[str, dict[str, str | None]]] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    text: list[str] = field(default_factory=list)
    title: str = ""

    def count(self, tag: str) -> int:
        return sum(1 for name, _ in self.tags if name == tag)

    def attrs(self, tag: str) -> list[dict[str, str | None]]:
        return [attrs for name, attrs in self.tags if name == tag]

    def urls(self) -> list[tuple[str, str, str]]:
        """(tag, attribute, value) of every href and src."""
        return [
            (name, key, value)
            for name, attrs in self.tags
            for key, value in attrs.items()
            if key in ("href", "src") and value is not None
        ]

    @property
    def plain_text(self) -> str:
        return re.sub(r"\s+", " ", "".join(self.text))


class _Parser(HTMLParser):
    def __init__(self, page: ParsedPage):
        super().__init__(convert_charrefs=True)
        self.page = page
        self.in_title = False
        self.skip = 0

    def handle_decl(self, decl):
        self.page.doctype = decl

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.page.tags.append((tag, attributes))
        if tag == "html":
            self.page.lang = attributes.get("lang")
        if "id" in attributes:
            self.page.ids.add(attributes["id"])
        if tag == "title":
            self.in_title = True
        if tag in ("script", "style"):
            self.skip += 1

    def handle_endtag(self, tag):
        if tag == "title":
            self.in_title = False
        if tag in ("script", "style"):
            self.skip -= 1

    def handle_data(self, data):
        if self.in_title:
            self.page.title += data
        elif not self.skip:
            self.page.text.append(data)


def parse_page(path: Path) -> ParsedPage:
    page = ParsedPage()
    parser = _Parser(page)
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return page


def unresolved_links(out: Path, allowed_absolute: set[str]) -> list[str]:
    """Every href/src of every built page that points nowhere, as readable problems."""
    problems = []
    pages = {path.name: parse_page(path) for path in out.glob("*.html")}
    for name, page in pages.items():
        for tag, attribute, value in page.urls():
            parts = urlsplit(value)
            if parts.scheme or value.startswith("//"):
                if value not in allowed_absolute:
                    problems.append(f"{name}: <{tag} {attribute}={value!r}> is not allowed")
                continue
            target_name = unquote(parts.path) or name
            target = out / target_name
            if not target.is_file():
                problems.append(f"{name}: <{tag} {attribute}={value!r}> has no file {target}")
                continue
            if parts.fragment:
                ids = pages[target_name].ids if target_name in pages else set()
                if parts.fragment not in ids:
                    problems.append(f"{name}: {value!r}: no id {parts.fragment!r} in {target_name}")
    return problems


def svg_to_image(svg: str, scale: int = 8) -> Image.Image:
    """Draw a QR SVG written by chatmail_www.qr or account.js (one path of row runs)."""
    width, height = (float(n) for n in re.search(r'viewBox="0 0 ([\d.]+) ([\d.]+)"', svg).groups())
    image = Image.new("L", (int(width * scale), int(height * scale)), 255)
    draw = ImageDraw.Draw(image)
    path = re.search(r'<path d="([^"]*)"', svg).group(1)
    for x, y, length in re.findall(r"M(\d+) (\d+)h(\d+)v1h-\d+z", path):
        x, y, length = int(x), int(y), int(length)
        draw.rectangle([x * scale, y * scale, (x + length) * scale - 1, (y + 1) * scale - 1], 0)
    return image


def decode_qr(image: Image.Image) -> list[str]:
    return [result.text for result in zxingcpp.read_barcodes(image.convert("L"))]


def chromium_binary() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail("chromium is not installed (apt-get install chromium; see HOST_PACKAGES)")
    return binary


def chromium(
    url: str,
    profile: Path,
    *,
    size: tuple[int, int],
    screenshot: Path | None = None,
    dump_dom: bool = False,
    dark: bool = False,
) -> str:
    """Run headless Chromium once; returns the DOM after scripts ran when ``dump_dom``."""
    args = [
        chromium_binary(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--no-first-run",
        "--force-color-profile=srgb",
        f"--user-data-dir={profile}",
        f"--window-size={size[0]},{size[1]}",
        # Lets fetch() and the QR drawing finish before the page is captured.
        "--virtual-time-budget=5000",
    ]
    if dark:
        args.append("--blink-settings=preferredColorScheme=0")  # prefers-color-scheme: dark
    if screenshot is not None:
        args.append(f"--screenshot={screenshot}")
    if dump_dom:
        args.append("--dump-dom")
    args.append(url)
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    if screenshot is not None:
        assert screenshot.is_file(), done.stderr[-2000:]
    return done.stdout
