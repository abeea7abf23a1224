"""QR codes of otpauth:// URIs: PNG and SVG images for an app to show, and text for a terminal.

zxing-cpp encodes the symbol (its writer is zint, in C): error correction level M and the
data mask chosen by the standard's penalty rules (ISO/IEC 18004 §7.8.3), in about 0.4 ms.
segno, pure Python, took 5.5 ms for the same symbol, 80 % of it applying and scoring the
eight masks. The images are drawn here from the module rows, each in well under a
millisecond; a caller asks for the ones it shows (StartEnrollmentRequest.qr_formats).
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Collection
from dataclasses import dataclass

import zxingcpp

from twofactor_server.domain.errors import InvalidArgument

PNG = "png"
SVG = "svg"
FORMATS = (PNG, SVG)
PNG_SCALE = 6  # pixels per module
SVG_SCALE = 4  # user units per module
BORDER = 4  # the quiet zone the standard asks for, in modules
_DARK = bytes.maketrans(b"\x00\xff", b"\x01\x00")  # zxing-cpp's image: 0 is dark, 255 light
_RUN = re.compile(b"\x01+")


@dataclass(frozen=True)
class QrImages:
    png: bytes = b""
    svg: str = ""


def require_known(formats: Collection[str]) -> None:
    if not set(formats) <= set(FORMATS):
        raise InvalidArgument("INVALID_QR_CODE_FORMAT", f"QR code formats are {', '.join(FORMATS)}")


def qr_images(text: str, formats: Collection[str]) -> QrImages:
    """The images of `text`'s QR code in `formats` (PNG, SVG); the symbol is encoded once, and not
    at all for an empty collection."""
    require_known(formats)
    if not formats:
        return QrImages()
    rows = module_rows(text)
    return QrImages(
        png=png_image(rows) if PNG in formats else b"",
        svg=svg_document(rows) if SVG in formats else "",
    )


def module_rows(text: str) -> list[bytes]:
    """The symbol's modules, row by row, without the quiet zone: 1 is dark, 0 light."""
    symbol = zxingcpp.create_barcode(text, zxingcpp.BarcodeFormat.QRCode, ec_level="M")
    image = symbol.to_image(scale=1, add_quiet_zones=False)
    height, width = image.shape
    modules = bytes(memoryview(image)).translate(_DARK)  # type: ignore[arg-type]  # a buffer; the stub omits it
    return [modules[i * width : (i + 1) * width] for i in range(height)]


def png_image(rows: list[bytes], *, scale: int = PNG_SCALE, border: int = BORDER) -> bytes:
    """A 1-bit greyscale PNG, black on white, the quiet zone included.

    A module row is drawn once as an integer and repeated `scale` times, and compressed at
    zlib's default level (level 9 doubles the time for the same size): about 0.2 ms.
    """
    width = (len(rows[0]) + 2 * border) * scale
    row_bytes = (width + 7) // 8
    light = b"\0" + b"\xff" * row_bytes  # filter type 0, then white pixels (1 bits)
    lines = [light * (border * scale)]
    pixels = {0: "0" * scale, 1: "1" * scale}  # a module's pixels as bits, 1 = dark
    for row in rows:
        bits = int(row.decode("latin-1").translate(pixels), 2)
        # The light border (0 bits) on both sides and the padding to whole bytes, then invert:
        # in a greyscale PNG 1 is white.
        bits <<= border * scale + (row_bytes * 8 - width)
        inverted = bits ^ ((1 << (row_bytes * 8)) - 1)
        lines.append((b"\0" + inverted.to_bytes(row_bytes, "big")) * scale)
    lines.append(light * (border * scale))
    header = struct.pack(">IIBBBBB", width, width, 1, 0, 0, 0, 0)  # square, 1 bit, greyscale
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", zlib.compress(b"".join(lines))),
            _chunk(b"IEND", b""),
        )
    )


def svg_document(rows: list[bytes], *, scale: int = SVG_SCALE, border: int = BORDER) -> str:
    """An SVG document: a white square (the quiet zone included) and one black path, a
    rectangle per run of dark modules in a row; no XML declaration, so it can be inlined."""
    size = len(rows[0]) + 2 * border
    runs = "".join(
        f"M{border + run.start()} {border + y}h{len(run.group())}v1h-{len(run.group())}z"
        for y, row in enumerate(rows)
        for run in _RUN.finditer(row)
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{size * scale}" height="{size * scale}" '
        f'viewBox="0 0 {size} {size}" shape-rendering="crispEdges">'
        f'<path fill="#fff" d="M0 0h{size}v{size}H0z"/><path fill="#000" d="{runs}"/></svg>'
    )


def qr_terminal(text: str, *, border: int = BORDER) -> str:
    """The QR code in Unicode half blocks for a terminal, two module rows a line. Light modules
    are the blocks (the terminal's light text colour), dark ones the dark background."""
    rows = module_rows(text)
    blank = bytes(len(rows[0]) + 2 * border)
    padded = [blank] * border + [bytes(border) + row + bytes(border) for row in rows] + [blank] * border
    if len(padded) % 2:
        padded.append(bytes(len(blank)))
    half_blocks = {(0, 0): "█", (0, 1): "▀", (1, 0): "▄", (1, 1): " "}  # (top, bottom), 1 = dark
    lines = (
        "".join(half_blocks[pair] for pair in zip(top, bottom, strict=True))
        for top, bottom in zip(padded[::2], padded[1::2], strict=True)
    )
    return "\n".join(lines) + "\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
