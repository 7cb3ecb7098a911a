"""Image URLs of lmmrt serve's requests: what decodes, and a 400 naming the image and the problem for the rest."""

from __future__ import annotations

import base64
import io
import urllib.parse

import numpy as np
import pytest
from PIL import Image

from lmmrt.serve.images import MAX_IMAGE_PIXELS, load_image, load_images
from lmmrt.serve.openai_schema import APIError


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def refused(url: str, match: str, **kw):
    with pytest.raises(APIError, match=match) as e:
        load_image(url, "messages[0].content[1]", **kw)
    assert e.value.status == 400 and "messages[0].content[1]" in e.value.message


def test_data_and_file_urls_decode_to_the_same_pixels(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    data = png(Image.fromarray(pixels))
    path = tmp_path / "a b.png"  # a space: the file URL is percent-encoded
    path.write_bytes(data)
    from_data = load_image(data_url(data), "x")
    from_file = load_image(path.as_uri(), "x", local_root=str(tmp_path.resolve()))
    assert np.array_equal(np.asarray(from_data), pixels) and np.array_equal(np.asarray(from_file), pixels)
    rgba = load_image(data_url(png(Image.new("RGBA", (5, 4), (1, 2, 3, 4)))), "x")
    assert rgba.mode == "RGBA"  # unconverted: the model's family decides how alpha goes


def test_bad_urls_are_refused_naming_the_image(tmp_path):
    refused(data_url(b"not an image"), "in no image format")
    refused(data_url(png(Image.new("RGB", (4, 4)))[:40]), "cannot decode")  # truncated
    refused("data:image/png;base64,@@@@", "not valid base64")
    refused("data:image/png,rawbytes", "only base64 data URLs")
    refused(data_url(b"hello", "text/plain"), "not an image type")
    refused(data_url(png(Image.new("I;16", (4, 4)))), "more than 8 bits")
    refused(data_url(png(Image.new("1", (9000, MAX_IMAGE_PIXELS // 9000 + 1)))), "pixels, more than")
    refused("https://example.com/cat.png", "does not fetch remote URLs")
    refused("ftp://host/cat.png", "unsupported image URL")
    path = tmp_path / "x.png"
    path.write_bytes(png(Image.new("RGB", (4, 4))))
    refused(path.as_uri(), "--allowed-local-media-path DIR")
    root = str(tmp_path.resolve())
    refused((tmp_path / "missing.png").as_uri(), "no such file", local_root=root)
    refused(tmp_path.as_uri(), "is not a file", local_root=root)
    refused("file://otherhost/x.png", "must name a local path", local_root=root)


def test_too_many_images():
    url = data_url(png(Image.new("RGB", (4, 4))))
    assert len(load_images([(url, "a")] * 3, max_images=3)) == 3
    with pytest.raises(APIError, match="4 images; this server takes at most 3"):
        load_images([(url, "a")] * 4, max_images=3)


def test_pixel_limits_are_checked_from_the_headers_before_decoding():
    """A 3000x3000 PNG cut after its header: refused for its size, not for its broken pixel data, so the
    size was read before any decoding (16 solid 8000x8000 PNGs of 200 KB each took 5.4 GB decoded)."""
    header_only = data_url(png(Image.new("L", (3000, 3000)))[:100])
    refused(header_only, r"3000x3000 pixels, more than the 1000000 this server decodes per image "
                         r"\(--max-image-pixels\)", max_pixels=1_000_000)
    refused(header_only, "cannot decode")  # within the default limit: decoding finds the truncation
    url = data_url(png(Image.new("RGB", (1000, 1000), (9, 8, 7))))
    assert len(load_images([(url, "a")] * 2, max_images=3, max_request_pixels=2_500_000)) == 2
    with pytest.raises(APIError, match=r"3000000 pixels together, more than the 2500000 .*--max-request-pixels"):
        load_images([(url, "a"), (url, "b"), (url, "c")], max_images=3, max_request_pixels=2_500_000)


def test_file_urls_stay_inside_the_allowed_directory(tmp_path):
    """--allowed-local-media-path: a file outside it is refused in the same words whether it exists or
    not (with --allow-local-files any file was read, and 'no such file' vs 'not a file' told what exists);
    symlinks and .. are resolved first; a relative file: URL is refused."""
    root, outside = tmp_path / "media", tmp_path / "private"
    root.mkdir()
    outside.mkdir()
    image = png(Image.new("RGB", (3, 2), (5, 6, 7)))
    (root / "ok.png").write_bytes(image)
    (outside / "secret.png").write_bytes(image)
    (root / "link.png").symlink_to(outside / "secret.png")
    allowed = str(root.resolve())
    assert load_image((root / "ok.png").as_uri(), "x", local_root=allowed).size == (3, 2)
    assert load_image(f"file://{root}/sub/../ok.png", "x", local_root=allowed).size == (3, 2)
    messages = []
    for url in [(outside / "secret.png").as_uri(), (outside / "missing.png").as_uri(), outside.as_uri(),
                (root / "link.png").as_uri(), f"file://{root}/../private/secret.png", "file:///etc/passwd"]:
        with pytest.raises(APIError, match=r"is not inside the directory this server reads images from") as e:
            load_image(url, "x", local_root=allowed)
        messages.append(e.value.message.replace(urllib.parse.urlparse(url).path, "PATH"))
    assert len(set(messages)) == 1, messages
    refused("file:media/ok.png", "must hold an absolute path", local_root=allowed)
    # "/" (--allow-local-files) reads any file, through the link too
    assert load_image((root / "link.png").as_uri(), "x", local_root="/").size == (3, 2)


def test_a_nul_byte_in_a_file_url_is_a_400(tmp_path):
    """os.path.realpath raised ValueError('embedded null byte'): the server answered 500."""
    (tmp_path / "x.png").write_bytes(png(Image.new("RGB", (3, 2))))
    root = str(tmp_path.resolve())
    for url in [(tmp_path / "x.png").as_uri() + "%00", (tmp_path / "x.png").as_uri() + "\0"]:
        refused(url, "must not hold a NUL byte", local_root=root)


def test_a_file_url_with_a_query_or_fragment_is_refused(tmp_path):
    """file:///x.png?x=1 read x.png, the query silently dropped; a name with ? or # is percent-encoded."""
    (tmp_path / "x.png").write_bytes(png(Image.new("RGB", (3, 2))))
    (tmp_path / "a?b#c.png").write_bytes(png(Image.new("RGB", (5, 4))))
    root = str(tmp_path.resolve())
    for tail in ["?x=1", "#frag", "?"]:
        refused((tmp_path / "x.png").as_uri() + tail, r"must not hold a query \(\?\) or fragment", local_root=root)
    assert load_image((tmp_path / "a?b#c.png").as_uri(), "x", local_root=root).size == (5, 4)


def png_header(width: int, height: int) -> bytes:
    """A PNG of width x height cut after its header (IHDR) and the start of its pixel data (IDAT): PIL opens
    it without a huge allocation here."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + \
        struct.pack(">I", 1000) + b"IDAT" + zlib.compress(b"\0" * 64)


def test_max_image_pixels_above_pils_own_limit_takes_effect(monkeypatch):
    """PIL refuses images of over twice Image.MAX_IMAGE_PIXELS in Image.open, before the server's check:
    --max-image-pixels above it had no effect, and the refusal ('decompression bomb') named no option."""
    from lmmrt.serve.images import set_pil_pixel_limit

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    side = int((2 * Image.MAX_IMAGE_PIXELS) ** 0.5) + 7  # over PIL's refusal limit
    url = data_url(png_header(side, side))

    def load(url, max_pixels):
        return load_images([(url, "x")], max_images=1, max_image_pixels=max_pixels, max_request_pixels=1 << 40)

    set_pil_pixel_limit(side * side)
    with pytest.raises(APIError, match="image file is truncated"):  # let through to decoding, which finds the cut
        load(url, side * side)
    with pytest.raises(APIError, match=rf"{side}x{side} pixels, more than the {side * side - 1} .*--max-image-pix"):
        load(url, side * side - 1)
    set_pil_pixel_limit(1000)  # never lowers PIL's limit
    assert Image.MAX_IMAGE_PIXELS == side * side
    with pytest.raises(APIError, match=r"more pixels than this server decodes per image \(--max-image-pixels\)"):
        load(data_url(png_header(side * 3, side)), side * side)
