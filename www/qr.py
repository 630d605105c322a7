"""QR codes as small SVG documents with a caption under the code.

The drawing matches ``templates/account.js`` (the in-browser encoder for self-signed relays),
so both kinds of relay show the same picture: quiet zone of 4 modules, one path of dark
modules, the caption (the relay's domain) legible below.
"""

from __future__ import annotations

from xml.sax.saxutils import escape, quoteattr

import qrcode
from qrcode.constants import ERROR_CORRECT_M

QUIET_ZONE = 4
CAPTION_HEIGHT = 5


def qr_matrix(text: str) -> list[list[bool]]:
    """Rows of modules (True = dark) without quiet zone; level M, smallest version that fits."""
    code = qrcode.QRCode(error_correction=ERROR_CORRECT_M, border=0)
    code.add_data(text.encode("utf-8"))
    code.make(fit=True)
    return code.get_matrix()


def matrix_svg(matrix: list[list[bool]], caption: str, label: str) -> str:
    width = len(matrix) + 2 * QUIET_ZONE
    height = width + (CAPTION_HEIGHT if caption else 0)
    runs = []
    for y, row in enumerate(matrix):
        x = 0
        while x < len(row):
            if not row[x]:
                x += 1
                continue
            end = x
            while end + 1 < len(row) and row[end + 1]:
                end += 1
            length = end - x + 1
            runs.append(f"M{x + QUIET_ZONE} {y + QUIET_ZONE}h{length}v1h-{length}z")
            x = end + 1
    parts = [
        (
            f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
            f'role="img" aria-label={quoteattr(label)}>'
        ),
        f"<title>{escape(label)}</title>",
        f'<rect width="{width}" height="{height}" fill="#fff"/>',
        f'<path d="{"".join(runs)}" fill="#000" shape-rendering="crispEdges"/>',
    ]
    if caption:
        # Shrink long domains so they stay inside the code's width.
        font_size = min(3.2, (width - 2) / (0.6 * len(caption)))
        parts.append(
            f'<text x="{width / 2:g}" y="{width + 1.5:g}" text-anchor="middle" '
            f'font-family="sans-serif" font-size="{font_size:.2f}">{escape(caption)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def qr_svg(text: str, caption: str, label: str) -> str:
    """An SVG document showing ``text`` as a QR code with ``caption`` under it."""
    return matrix_svg(qr_matrix(text), caption, label)
