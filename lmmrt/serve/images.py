"""Images of a request, from their URLs: base64 `data:` URLs, and `file://` paths inside the directory the
server was given (--allowed-local-media-path DIR; --allow-local-files: any file). Remote (http) URLs are
refused: the server fetches nothing from the network.

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
# gigabytes. Pixels are bounded too, per image and per request, from each image's header before any is
# decoded: a small PNG of a huge solid canvas decodes to gigabytes (16 of 8000x8000 took 5.4 GB).
MAX_IMAGE_BYTES = 32 << 20
MAX_IMAGE_PIXELS = 16 << 20  # per image (4096 x 4096), --max-image-pixels
MAX_REQUEST_PIXELS = 64 << 20  # all of a request's images together, --max-request-pixels


def set_pil_pixel_limit(max_image_pixels: int) -> None:
    """Let PIL open images of up to max_image_pixels (--max-image-pixels), once at startup: its own
    decompression-bomb limit (Image.MAX_IMAGE_PIXELS, a process-wide setting) is checked first, in
    Image.open, and refused larger images in words that do not name the option. It is only ever raised
    (to max(option, its value)); load_images checks the option itself from each header."""
    import warnings

    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is not None:
        Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS, max_image_pixels)
    # PIL warns from MAX_IMAGE_PIXELS on and refuses from twice it: those images are over the option anyway
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _open_header(data: bytes, where: str):
    """The image, opened lazily: its size and mode are read from the header, no pixel is decoded yet."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:  # PIL's limit is at least --max-image-pixels (set_pil_pixel_limit)
        raise APIError(400, f"{where}: the image has more pixels than this server decodes per image "
                            "(--max-image-pixels)") from None
    except UnidentifiedImageError:
        raise APIError(400, f"{where}: cannot decode the image: its bytes are in no image format PIL reads "
                            "(PNG, JPEG, GIF, WebP, BMP, ...)") from None
    except Exception as e:  # PIL raises many types for a broken header
        raise APIError(400, f"{where}: cannot decode the image: {e}") from None


def _decode(im, where: str):
    """The pixels of an image _open_header opened, decoded (and its file closed)."""
    from lmmrt.runtime.processor import check_pil_mode

    try:
        with im:
            im.load()
            image = im.copy()  # unconverted: lmmrt makes it RGB as the model's family does (alpha)
    except Exception as e:  # PIL raises many types (OSError for truncation, ...)
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


def _file_url_bytes(url: str, where: str, local_root: str | None) -> bytes:
    if local_root is None:
        raise APIError(400, f"{where}: file:// URLs are refused unless the server is started with "
                            "--allowed-local-media-path DIR; send the image as a base64 data URL")
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise APIError(400, f"{where}: a file:// URL must name a local path (file:///path), got host "
                            f"{parsed.netloc!r}")
    if "?" in url or "#" in url:  # a file has no query or fragment: ignoring one would read another file than named
        raise APIError(400, f"{where}: a file URL must not hold a query (?) or fragment (#); percent-encode "
                            f"those characters in a file name (%3F, %23), got {url[:80]!r}")
    path = urllib.parse.unquote(parsed.path)
    if "\0" in path:  # the OS takes no NUL in a path (os.path.realpath raised ValueError: a 500)
        raise APIError(400, f"{where}: a file URL's path must not hold a NUL byte (%00), got {url[:80]!r}")
    if not os.path.isabs(path):
        raise APIError(400, f"{where}: a file URL must hold an absolute path (file:///dir/image.png), got "
                            f"{url[:80]!r}")
    real = os.path.realpath(path)  # symlinks and .. resolved: where the bytes really come from
    if real != local_root and not real.startswith(local_root.rstrip(os.sep) + os.sep):
        # the same words whether the file exists or not: the server's disk outside the root stays unknown
        raise APIError(400, f"{where}: {path} is not inside the directory this server reads images from "
                            "(--allowed-local-media-path)")
    try:
        if not os.path.isfile(real):
            raise APIError(400, f"{where}: {path} is not a file" if os.path.exists(real) else
                           f"{where}: no such file {path}")
        if os.path.getsize(real) > MAX_IMAGE_BYTES:
            raise APIError(400, f"{where}: {path} is larger than {MAX_IMAGE_BYTES >> 20} MiB")
        with open(real, "rb") as f:
            data = f.read(MAX_IMAGE_BYTES + 1)  # bounded: a file may grow, or say size 0 (/proc)
    except OSError as e:
        raise APIError(400, f"{where}: cannot read {path}: {e.strerror or e}") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise APIError(400, f"{where}: {path} is larger than {MAX_IMAGE_BYTES >> 20} MiB")
    return data


def _url_bytes(url: str, where: str, local_root: str | None) -> bytes:
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _data_url_bytes(url, where)
    if scheme == "file":
        return _file_url_bytes(url, where, local_root)
    if scheme in ("http", "https"):
        raise APIError(400, f"{where}: lmmrt serve does not fetch remote URLs; send the image as a base64 data URL"
                            + (" or a file:// URL" if local_root is not None else ""))
    raise APIError(400, f"{where}: unsupported image URL {url[:40]!r}: use a base64 data URL "
                        "(data:image/png;base64,...)")


def load_image(url: str, where: str, *, local_root: str | None = None, max_pixels: int = MAX_IMAGE_PIXELS):
    """The PIL image behind `url`; `where` names it in errors (e.g. "messages[0].content[1]")."""
    return load_images([(url, where)], local_root=local_root, max_images=1,
                       max_image_pixels=max_pixels)[0]


def load_images(urls: list[tuple[str, str]], *, local_root: str | None = None, max_images: int,
                max_image_pixels: int = MAX_IMAGE_PIXELS, max_request_pixels: int = MAX_REQUEST_PIXELS) -> list:
    """PIL images from (url, where) pairs, in order: open_images then decode_images (the server runs the
    two apart, decoding inside a slot that bounds how many requests' pixels are in memory at once)."""
    return decode_images(open_images(urls, local_root=local_root, max_images=max_images,
                                     max_image_pixels=max_image_pixels, max_request_pixels=max_request_pixels))


def open_images(urls: list[tuple[str, str]], *, local_root: str | None = None, max_images: int,
                max_image_pixels: int = MAX_IMAGE_PIXELS, max_request_pixels: int = MAX_REQUEST_PIXELS) -> list:
    """The images of (url, where) pairs, opened (their bytes read, no pixel decoded), for decode_images.
    file:// URLs are read when they resolve inside local_root (an absolute, resolved directory; "/" for any
    file; None refuses them). Every limit is checked here: more than max_images, an image over
    max_image_pixels, or all over max_request_pixels is an error naming the limit."""
    if len(urls) > max_images:
        raise APIError(400, f"the request has {len(urls)} images; this server takes at most {max_images} per "
                            "request (--max-images)")
    opened, total = [], 0
    for url, where in urls:
        im = _open_header(_url_bytes(url, where, local_root), where)
        opened.append((im, where))
        pixels = im.width * im.height
        if pixels > max_image_pixels:
            raise APIError(400, f"{where}: the image is {im.width}x{im.height} pixels, more than the "
                                f"{max_image_pixels} this server decodes per image (--max-image-pixels)")
        total += pixels
    if total > max_request_pixels:
        raise APIError(400, f"the request's images have {total} pixels together, more than the {max_request_pixels} "
                            "this server decodes per request (--max-request-pixels)")
    return opened


def decode_images(opened: list) -> list:
    """The PIL images of what open_images returned, decoded, in order."""
    return [_decode(im, where) for im, where in opened]
