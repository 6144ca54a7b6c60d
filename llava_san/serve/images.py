"""The image of a request: a ``data:`` URL, a ``file://`` URL or a local path -> an RGB PIL image.

Every image goes through :func:`llava_san.data.images.load_image` (a data URL via a temporary file), so
the pixels are those training and evaluation load, and a corrupt, truncated, unsupported or huge image
is a clear 400 instead of an exception deep in preprocessing. Remote (``http(s)://``) URLs are not
fetched: the server answers for one machine and must not become a way to make requests elsewhere.

Local paths and ``file://`` URLs read any image file the server's user can read; the server listens on
127.0.0.1 unless ``--host`` says otherwise.
"""
from __future__ import annotations

import base64
import binascii
import os
import re
import tempfile
from typing import Any
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from .errors import APIError
from .requests import ImageRef

__all__ = ["load_request_image"]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")  # http://, https://, s3://... (file: handled first)


def _bad(ref: ImageRef, message: str, code: str = "invalid_image") -> APIError:
    return APIError(400, f"{ref.param}: {message}", param=f"{ref.param}.image_url", code=code)


def _data_url_bytes(ref: ImageRef) -> bytes:
    """The bytes of ``data:[<mediatype>][;base64],<data>``; only base64 data is an image."""
    header, sep, data = ref.url.partition(",")
    if not sep:
        raise _bad(ref, "malformed data URL: no ',' after the media type")
    params = header[len("data:"):].split(";")
    if "base64" not in params[1:]:
        raise _bad(ref, "the data URL must be base64-encoded (data:image/png;base64,...)")
    if params[0] and not params[0].startswith("image/"):
        raise _bad(ref, f"the data URL's media type is {params[0]!r}, not an image")
    try:
        return base64.b64decode("".join(unquote(data).split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise _bad(ref, f"the data URL is not valid base64 ({err})") from None


def _load_bytes(ref: ImageRef, data: bytes) -> Any:
    from ..data.images import ImageLoadError, load_image

    fd, path = tempfile.mkstemp(prefix="llava-san-serve-", suffix=".img")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return load_image(path)
    except ImageLoadError as err:
        # the message names the temporary file; the client knows the image as its data URL
        raise _bad(ref, str(err).replace(path, "(data URL image)"), err.reason) from None
    finally:
        os.unlink(path)


def _local_path(ref: ImageRef) -> str:
    url = ref.url
    if url.startswith("file:"):
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise _bad(ref, f"file URL {url!r} names another host ({parsed.netloc!r}); only local files are "
                       "read")
        return url2pathname(unquote(parsed.path))
    remote = _SCHEME.match(url)
    if remote:
        raise _bad(ref, f"unsupported image URL scheme {remote.group(1)!r}: send the image as a data URL "
                   "(data:image/png;base64,...), a file:// URL or a path on the server; remote URLs are not "
                   "fetched", "unsupported_image_url")
    return os.path.expanduser(url)


def load_request_image(ref: ImageRef) -> Any:
    """The RGB PIL image of ``ref``; :class:`APIError` 400 naming the request field when it cannot be
    loaded (bad data URL, missing file, corrupt or unsupported image, over the pixel limit)."""
    from ..data.images import ImageLoadError, load_image

    if ref.url.startswith("data:"):
        return _load_bytes(ref, _data_url_bytes(ref))
    path = _local_path(ref)
    try:
        return load_image(path)
    except ImageLoadError as err:
        code = "image_not_found" if err.reason == "missing_image" else err.reason
        raise _bad(ref, str(err), code) from None
