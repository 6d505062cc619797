"""The bytes behind an `image_url`: a data: URL (base64), or an http(s) URL fetched only from the
hosts --allowed-media-domains names, within a size and a time limit. A server that fetched any URL
a client names could be made to probe its own network, so no host is allowed by default."""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from fp4serve.errors import InvalidRequestError

MEDIA_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp")


@dataclass(frozen=True)
class MediaPolicy:
    allowed_domains: tuple[str, ...] = ()  # exact host names (vLLM's --allowed-media-domains)
    max_bytes: int = 20 * 2**20  # per image, data: URLs included
    timeout_s: float = 10.0  # the whole fetch: connect, headers and body


def image_bytes(url: str, policy: MediaPolicy, param: str) -> bytes:
    """The image file `url` stands for; InvalidRequestError naming `param` for anything else."""
    if not isinstance(url, str) or not url:
        raise InvalidRequestError("image_url.url must be a non-empty string", param)
    if url[:5].lower() == "data:":
        return _data_url(url, policy, param)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise InvalidRequestError(f"image URLs are data: (base64) or http(s) URLs, not {parts.scheme or url[:20]!r}",
                                  param)  # fmt: skip
    host = (parts.hostname or "").lower()
    if host not in policy.allowed_domains:
        allowed = ", ".join(policy.allowed_domains) or "none"
        raise InvalidRequestError(
            f"this server fetches images only from the hosts --allowed-media-domains lists ({allowed}), not {host!r}; "
            "send the image inline as a data: URL",
            param,
        )
    return _fetch(url, policy, param)


def _data_url(url: str, policy: MediaPolicy, param: str) -> bytes:
    header, comma, payload = url.partition(",")
    fields = header[5:].lower().split(";")
    if not comma or "base64" not in fields[1:]:
        raise InvalidRequestError("a data: image URL must be base64: data:image/png;base64,...", param)
    if fields[0] not in MEDIA_TYPES:
        raise InvalidRequestError(f"data: URL media type {fields[0]!r}: send image/png, image/jpeg or image/webp",
                                  param)  # fmt: skip
    if len(payload) * 3 // 4 > policy.max_bytes:
        raise InvalidRequestError(f"the image is larger than {policy.max_bytes} bytes", param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidRequestError(f"the data: URL is not valid base64: {e}", param) from None


def _fetch(url: str, policy: MediaPolicy, param: str) -> bytes:
    import httpx

    deadline = time.monotonic() + policy.timeout_s
    body = bytearray()
    try:
        # No redirects: the target could be a host the allow list does not name.
        with httpx.stream("GET", url, timeout=policy.timeout_s, follow_redirects=False) as response:
            if response.status_code != 200:
                raise InvalidRequestError(f"fetching the image got HTTP {response.status_code}", param)
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > policy.max_bytes:
                    raise InvalidRequestError(f"the image is larger than {policy.max_bytes} bytes", param)
                if time.monotonic() > deadline:
                    raise InvalidRequestError(f"fetching the image took longer than {policy.timeout_s:g} s", param)
    except httpx.TimeoutException:
        raise InvalidRequestError(f"fetching the image took longer than {policy.timeout_s:g} s", param) from None
    except httpx.HTTPError as e:
        raise InvalidRequestError(f"the image could not be fetched: {e}", param) from None
    return bytes(body)
