"""QR code drawings (domain/qr_codes.py) decode back to their text, whatever the symbol's size."""

from __future__ import annotations

import io
import struct

import pytest
from PIL import Image, ImageOps

from tests.server.qr_decoding import decoded, decoded_svg, decoded_terminal
from twofactor_server.domain import qr_codes
from twofactor_server.domain.errors import InvalidArgument

SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
TEXTS = [
    "otpauth://totp/a?secret=AAAA",  # a small symbol
    f"otpauth://totp/twofactor:alice%40example.com?secret={SECRET}&issuer=twofactor",
    # the longest account name
    f"otpauth://totp/Ex%C3%A4mple:{'b' * 256}?secret={SECRET}&issuer=Ex%C3%A4mple",
]


@pytest.mark.parametrize("text", TEXTS)
def test_png_svg_and_terminal_drawings_decode_to_the_text(text: str) -> None:
    images = qr_codes.qr_images(text, [qr_codes.PNG, qr_codes.SVG])
    png = Image.open(io.BytesIO(images.png))
    assert png.mode == "1" and png.size[0] == png.size[1]
    modules = len(qr_codes.module_rows(text))
    assert png.size[0] == (modules + 2 * qr_codes.BORDER) * qr_codes.PNG_SCALE
    assert decoded(png) == [text]
    assert decoded_svg(images.svg) == [text]
    assert decoded_terminal(qr_codes.qr_terminal(text)) == [text]


def test_the_quiet_zone_is_light_on_every_side() -> None:
    png = Image.open(io.BytesIO(qr_codes.qr_images(TEXTS[1], [qr_codes.PNG]).png)).convert("L")
    band = qr_codes.BORDER * qr_codes.PNG_SCALE
    side = png.size[0]
    far = side - band
    for box in ((0, 0, side, band), (0, far, side, side), (0, 0, band, side), (far, 0, side, side)):
        assert png.crop(box).getextrema() == (255, 255), box


def test_nothing_is_drawn_unless_asked_and_unknown_formats_are_refused() -> None:
    assert qr_codes.qr_images(TEXTS[1], ()) == qr_codes.QrImages(b"", "")
    only_svg = qr_codes.qr_images(TEXTS[1], [qr_codes.SVG])
    assert only_svg.png == b"" and only_svg.svg.startswith("<svg")
    with pytest.raises(InvalidArgument) as refused:
        qr_codes.qr_images(TEXTS[1], ["gif"])
    assert refused.value.reason == "INVALID_QR_CODE_FORMAT"


def test_the_rows_hold_one_entry_per_module_and_every_drawing_a_four_module_quiet_zone() -> None:
    # ISO/IEC 18004 asks for a light border of 4 modules. module_rows holds the symbol alone, one
    # entry per module: 4 * version + 17 rows of as many, a finder pattern in three corners.
    rows = qr_codes.module_rows(TEXTS[0])
    size = len(rows)
    assert (size - 17) % 4 == 0 and all(len(row) == size for row in rows)
    finder = b"\x01" * 7 + b"\x00"
    assert rows[0].startswith(finder) and rows[0].endswith(finder[::-1]) and rows[-1].startswith(finder)
    images = qr_codes.qr_images(TEXTS[0], [qr_codes.PNG, qr_codes.SVG])
    png = Image.open(io.BytesIO(images.png)).convert("L")
    quiet = 4 * qr_codes.PNG_SCALE
    assert png.size == ((size + 8) * qr_codes.PNG_SCALE,) * 2
    assert ImageOps.invert(png).getbbox() == (quiet, quiet, png.size[0] - quiet, png.size[1] - quiet)
    side = (size + 8) * qr_codes.SVG_SCALE
    assert f'width="{side}" height="{side}" viewBox="0 0 {size + 8} {size + 8}"' in images.svg
    assert 'fill="#000" d="M4 4h7v1h-7z' in images.svg


def test_the_png_header_is_the_one_every_decoder_reads() -> None:
    # PNG's IHDR: width, height, bit depth 1, colour type 0 (greyscale), and 0 for compression
    # (deflate), filtering and interlacing, the only values strict decoders such as libpng take.
    png = qr_codes.qr_images(TEXTS[0], [qr_codes.PNG]).png
    assert png[:16] == b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR"
    width, height, *rest = struct.unpack(">IIBBBBB", png[16:29])
    assert width == height == Image.open(io.BytesIO(png)).size[0] and rest == [1, 0, 0, 0, 0]
