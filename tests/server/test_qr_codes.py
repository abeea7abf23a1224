"""QR code drawings (domain/qr_codes.py) decode back to their text, whatever the symbol's size."""

from __future__ import annotations

import io

import pytest
from PIL import Image

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
