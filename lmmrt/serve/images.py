"""Images of a request, from their URLs: base64 `data:` URLs, and `file://` paths when the server was started
with --allow-local-files. Remote (http) URLs are refused: the server fetches nothing from the network.

Every failure is an APIError(400) naming the image (its place in the request) and what is wrong with it.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import urllib.parse

from lmmrt.serve.openai_schema import APIError

# A request's image bytes (after base64 decoding) are bounded, so one client cannot make the server hold
# gigabytes; pixels are bounded too, against decompression bombs (a small PNG of a huge canvas).
MAX_IMAGE_BYTES = 32 << 20
MAX_IMAGE_PIXELS = 64 << 20


def _open_image(data: bytes, where: str):
    from PIL import Image, UnidentifiedImageError

    from lmmrt.runtime.processor import check_pil_mode

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise APIError(400, f"{where}: the image is {im.width}x{im.height} pixels, more than the "
                                    f"{MAX_IMAGE_PIXELS} this server decodes")
            im.load()
            image = im.copy()  # unconverted: lmmrt makes it RGB as the model's family does (alpha)
    except APIError:
        raise
    except UnidentifiedImageError:
        raise APIError(400, f"{where}: cannot decode the image: its bytes are in no image format PIL reads "
                            "(PNG, JPEG, GIF, WebP, BMP, ...)") from None
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError for truncation, ...)
        raise APIError(400, f"{where}: cannot decode the image: {e}") from None
    try:
        check_pil_mode(image, where)
    except (ValueError, TypeError) as e:
        raise APIError(400, str(e)) from None
    return image


def _data_url_bytes(url: str, where: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:"):
        raise APIError(400, f"{where}: a data URL must look like data:image/png;base64,<base64 bytes>")
    if not header.endswith(";base64"):
        raise APIError(400, f"{where}: only base64 data URLs are supported (data:<type>;base64,...), got "
                            f"{header[:60]!r}")
    mime = header[len("data:"):-len(";base64")]
    if mime and not mime.startswith("image/"):
        raise APIError(400, f"{where}: the data URL's type is {mime!r}, not an image type")
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise APIError(400, f"{where}: the image is larger than {MAX_IMAGE_BYTES >> 20} MiB")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"{where}: the data URL's payload is not valid base64 ({e})") from None


def _file_url_bytes(url: str, where: str, allow_local_files: bool) -> bytes:
    if not allow_local_files:
        raise APIError(400, f"{where}: file:// URLs are refused unless the server is started with "
                            "--allow-local-files; send the image as a base64 data URL")
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise APIError(400, f"{where}: a file:// URL must name a local path (file:///path), got host "
                            f"{parsed.netloc!r}")
    path = urllib.parse.unquote(parsed.path)
    try:
        if not os.path.isfile(path):
            raise APIError(400, f"{where}: {path} is not a file" if os.path.exists(path) else
                           f"{where}: no such file {path}")
        if os.path.getsize(path) > MAX_IMAGE_BYTES:
            raise APIError(400, f"{where}: {path} is larger than {MAX_IMAGE_BYTES >> 20} MiB")
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise APIError(400, f"{where}: cannot read {path}: {e.strerror or e}") from None


def load_image(url: str, where: str, *, allow_local_files: bool = False):
    """The PIL image behind `url`; `where` names it in errors (e.g. "messages[0].content[1]")."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = _data_url_bytes(url, where)
    elif scheme == "file":
        data = _file_url_bytes(url, where, allow_local_files)
    elif scheme in ("http", "https"):
        raise APIError(400, f"{where}: lmmrt serve does not fetch remote URLs; send the image as a base64 data URL"
                            + (" or a file:// URL" if allow_local_files else ""))
    else:
        raise APIError(400, f"{where}: unsupported image URL {url[:40]!r}: use a base64 data URL "
                            "(data:image/png;base64,...)")
    return _open_image(data, where)


def load_images(urls: list[tuple[str, str]], *, allow_local_files: bool = False, max_images: int) -> list:
    """PIL images from (url, where) pairs, in order; more than max_images is an error naming the limit."""
    if len(urls) > max_images:
        raise APIError(400, f"the request has {len(urls)} images; this server takes at most {max_images} per "
                            "request (--max-images)")
    return [load_image(url, where, allow_local_files=allow_local_files) for url, where in urls]
