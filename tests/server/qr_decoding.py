"""Reading our QR code drawings back to text with zxing-cpp's reader: the PNG as it is, the SVG
and the terminal drawing turned into pixels first."""

from __future__ import annotations

import re

import zxingcpp
from PIL import Image


def decoded(image: Image.Image) -> list[str]:
    found = zxingcpp.read_barcodes(image)
    assert all(d.format == zxingcpp.BarcodeFormat.QRCode for d in found)
    return [d.text for d in found]


def decoded_svg(svg: str) -> list[str]:
    """Draw the SVG as pixels and decode that. The document is a white square and one black path
    of rectangles, `M x y h w v1 h-w z` each (a run of dark modules), in a viewBox of modules."""
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    size = re.search(r'viewBox="0 0 (\d+) (\d+)"', svg)
    width = re.search(r' width="(\d+)"', svg)
    dark = re.search(r'<path fill="#000" d="([^"]*)"/>', svg)
    assert size and width and dark and size[1] == size[2], svg
    assert f'<path fill="#fff" d="M0 0h{size[1]}v{size[1]}H0z"/>' in svg  # the light square, quiet zone in
    assert re.fullmatch(r"(M\d+ \d+h\d+v1h-\d+z)*", dark[1]), "a path this test can't draw"
    scale = int(width[1]) // int(size[1])
    image = Image.new("L", (int(width[1]), int(width[1])), 255)
    for x, y, w in re.findall(r"M(\d+) (\d+)h(\d+)", dark[1]):
        left, top = int(x) * scale, int(y) * scale
        image.paste(0, (left, top, left + int(w) * scale, top + scale))
    return decoded(image)


def decoded_terminal(text: str) -> list[str]:
    """Draw the half-block lines as pixels (a block is light, as on a dark terminal) and decode."""
    lines = text.splitlines()
    assert lines and len({len(line) for line in lines}) == 1, "a ragged drawing"
    image = Image.new("L", (len(lines[0]) * 4, len(lines) * 8), 0)
    for y, line in enumerate(lines):
        for x, char in enumerate(line):
            assert char in "█▀▄ ", char
            if char in "█▀":
                image.paste(255, (x * 4, y * 8, x * 4 + 4, y * 8 + 4))
            if char in "█▄":
                image.paste(255, (x * 4, y * 8 + 4, x * 4 + 4, y * 8 + 8))
    return decoded(image)
