"""QR codes of otpauth:// URIs, as PNG and SVG images (segno encodes, we draw the PNG).

Encoding the symbol (segno.make) is most of the cost: about 80 % of it is segno trying
the eight data masks and scoring each (ISO/IEC 18004 §7.8.3), which we keep, so scanners
get the symbol the standard asks for. So a caller asks for the images it shows, and the
symbol is encoded once for all of them.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Collection
from dataclasses import dataclass

import segno

from twofactor_server.domain.errors import InvalidArgument

PNG = "png"
SVG = "svg"
FORMATS = (PNG, SVG)
PNG_SCALE = 6  # pixels per module
SVG_SCALE = 4  # user units per module
BORDER = 4  # the quiet zone the standard asks for, in modules
_ERROR = "m"  # 15 % of the symbol can be lost; segno raises it when that fits the same version


@dataclass(frozen=True)
class QrImages:
    png: bytes = b""
    svg: str = ""


def qr_images(text: str, formats: Collection[str]) -> QrImages:
    """The images of `text`'s QR code in `formats` (PNG, SVG; none drawn for an empty collection)."""
    require_known(formats)
    if not formats:
        return QrImages()
    symbol = segno.make(text, error=_ERROR, micro=False)
    return QrImages(
        png=png_image(symbol.matrix) if PNG in formats else b"",
        svg=svg_document(symbol) if SVG in formats else "",
    )


def require_known(formats: Collection[str]) -> None:
    if not set(formats) <= set(FORMATS):
        raise InvalidArgument("INVALID_QR_CODE_FORMAT", f"QR code formats are {', '.join(FORMATS)}")


def svg_document(symbol: segno.QRCode) -> str:
    buffer = io.BytesIO()
    symbol.save(buffer, kind="svg", scale=SVG_SCALE, border=BORDER, xmldecl=False)
    return buffer.getvalue().decode()


def png_image(matrix: tuple[bytearray, ...], *, scale: int = PNG_SCALE, border: int = BORDER) -> bytes:
    """A 1-bit greyscale PNG of a module matrix (1 = dark), black on white.

    The same pixels as segno's PNG writer, which packs every pixel in Python (1.8 ms at
    scale 6); a module row drawn once as an integer and repeated `scale` times, compressed
    at zlib's default level (level 9 doubles the time for the same size), takes 0.2 ms.
    """
    modules = len(matrix) + 2 * border
    width = modules * scale
    row_bytes = (width + 7) // 8
    light = b"\0" + b"\xff" * row_bytes  # filter type 0, then white pixels (1 bits)
    lines = [light * (border * scale)]
    pixels = {0: "0" * scale, 1: "1" * scale}  # a module's pixels as bits, 1 = dark
    for row in matrix:
        bits = int(bytes(row).decode("latin-1").translate(pixels), 2)
        # The light border (0 bits) on both sides and the padding to whole bytes, then invert:
        # in a greyscale PNG 1 is white.
        bits <<= border * scale + (row_bytes * 8 - width)
        inverted = bits ^ ((1 << (row_bytes * 8)) - 1)
        line = b"\0" + inverted.to_bytes(row_bytes, "big")
        lines.append(line * scale)
    lines.append(light * (border * scale))
    header = struct.pack(">IIBBBBB", width, width, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", zlib.compress(b"".join(lines))),
            _chunk(b"IEND", b""),
        )
    )


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def qr_terminal(text: str) -> str:
    """The QR code drawn with Unicode blocks, for a terminal."""
    buffer = io.StringIO()
    segno.make(text, error=_ERROR, micro=False).terminal(out=buffer, compact=True)
    return buffer.getvalue()
