"""Images in user messages and tool results: the checks each dialect makes by its own
JSON path, and what a backend that cannot read a tool result's image is sent instead.

An image reaches a backend as base64 `data` with its `media_type`, or as an http(s)
`url` the backend's upstream fetches; stella never fetches one (no request of its own
to an address a client chose). Checks are cheap and bounded by the body limit: the
base64 alphabet and padding, not the image itself (the upstream judges that).
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Sequence
from typing import NamedTuple, cast, get_args
from urllib.parse import urlsplit

import msgspec

from stella.errors import InvalidRequest
from stella.protocol import Image, ImageDetail, ImageMediaType, Message

MEDIA_TYPES: frozenset[str] = frozenset(get_args(ImageMediaType))
_MEDIA_TYPES_TEXT = "image/png, image/jpeg, image/gif or image/webp"

# What an image counts for in the prompt's token estimate (rate limits' reservation),
# whatever its size in base64: Anthropic's figure for a picture of about 1.15 megapixels
# (width x height / 750), the size its API and OpenAI's scale larger ones down to.
IMAGE_TOKENS = 1600


# The most images one request may carry: Anthropic's API takes up to 600 (100 for a
# model with a 200k-token window), the most an upstream documents, so stella refuses none
# an upstream would take; a cap at all bounds the checks a request costs the event loop
# (some 280,000 one-pixel images fit in 7 MiB of JSON).
MAX_IMAGES = 600

_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


class Counter:
    """A request's images as a dialect reads them, counted: a user's (the client's own) a
    400 naming the first past MAX_IMAGES, before its data is looked at; a tool result's
    past MAX_IMAGES of their own a note, unchecked. Tool results' images within that
    give way to a user's when together they pass it (see `within_cap`)."""

    __slots__ = ("count", "tools")

    def __init__(self) -> None:
        self.count = 0
        self.tools = 0

    def add(self, path: str) -> None:
        """Count the user's image at `path`; 400 naming it when it is one too many."""
        self.count += 1
        if self.count > MAX_IMAGES:
            raise InvalidRequest(
                f"$.{path}: too many images: at most {MAX_IMAGES} in a request", param=path
            )

    def room(self) -> bool:
        """Count a tool result's image; whether it is within the cap (past it: a note)."""
        self.tools += 1
        return self.tools <= MAX_IMAGES


def check_data(data: str, path: str) -> None:
    """400 naming `path` unless `data` is base64 (the standard alphabet, padded)."""
    if not data:
        raise InvalidRequest(f"$.{path}: an image's data must not be empty", param=path)
    # The alphabet and padding, not a decode: deleting the alphabet's bytes from the
    # ASCII leaves at most two '=', which must end it (a 7 MiB image: ~6 ms, where a
    # strict decode took ~35 ms of the event loop). One copy of the data, no more.
    try:
        encoded = data.encode("ascii")
    except UnicodeEncodeError:
        encoded = b"!"  # not base64
    rest = encoded.translate(None, _ALPHABET)
    if len(data) % 4 or rest not in (b"", b"=", b"==") or not encoded.endswith(rest):
        raise InvalidRequest(
            f"$.{path}: not valid base64 (the standard alphabet, padded, no line breaks)",
            param=path,
        )


# The most of a client's value a 400 repeats: a 3 MiB media type is not sent back whole.
SHOWN_CHARS = 64


def shown(value: str) -> str:
    """`value`'s repr for an error message, cut to SHOWN_CHARS characters and an ellipsis."""
    if len(value) <= SHOWN_CHARS:
        return repr(value)
    return repr(value[:SHOWN_CHARS]) + "…"


def check_media_type(media_type: str, path: str) -> ImageMediaType:
    """The media type, lower-cased (`image/jpg`, which clients send, as `image/jpeg`);
    400 naming `path` for one no backend takes."""
    kind = media_type.strip().lower()
    if kind == "image/jpg":
        kind = "image/jpeg"
    if kind not in MEDIA_TYPES:
        raise InvalidRequest(
            f"$.{path}: image type {shown(media_type)} is not supported: {_MEDIA_TYPES_TEXT}",
            param=path,
        )
    return cast(ImageMediaType, kind)


# Whitespace and control characters (C0, DEL, C1): urlsplit strips some and keeps others,
# and an upstream's parser may read such a URL otherwise than this check did.
_URL_BAD = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")


def check_url(url: str, path: str) -> None:
    """400 naming `path` unless `url` is an http or https URL with a host, without
    whitespace or control characters."""
    try:
        parts = None if _URL_BAD.search(url) else urlsplit(url)
    except ValueError:
        parts = None
    if parts is None or parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(
            f"$.{path}: an image URL must be an http or https URL "
            "(or, where the API takes one, a data: URL of base64)",
            param=path,
        )


def _detail(detail: str | None) -> ImageDetail | None:
    """OpenAI's detail when it is one the native image takes (None: the default)."""
    return cast(ImageDetail, detail) if detail in ("auto", "low", "high") else None


def _data_url(url: str) -> tuple[str, str] | None:
    """A `data:<type>;base64,<data>` URL's media type (as written) and data; None for a
    data URL that is not base64."""
    # The head alone sliced out; the payload copied once (a data URL may be megabytes).
    comma = url.find(",", 5)
    if comma < 0:
        return None
    media_type, _, encoding = url[5:comma].partition(";")
    if encoding.strip().lower() != "base64":
        return None
    return media_type, url[comma + 1 :]


def from_url(url: str, path: str, detail: str | None = None) -> Image:
    """An image given as a URL (OpenAI's image_url.url): a `data:<type>;base64,` URL
    becomes data and media type, an http(s) one stays a URL; else a 400 naming `path`."""
    if url[:5].lower() == "data:":
        split = _data_url(url)
        if split is None:
            raise InvalidRequest(
                f"$.{path}: a data URL must be base64 (data:<media type>;base64,<data>)",
                param=path,
            )
        media_type, data = split
        kind = check_media_type(media_type, path)
        check_data(data, path)
        check_kind(data, kind, path)
        return Image(data=data, media_type=kind, detail=_detail(detail))
    check_url(url, path)
    return Image(url=url, detail=_detail(detail))


# The first bytes of each format's file (WebP's: RIFF, a size, then WEBP).
_MAGIC: tuple[tuple[bytes, ImageMediaType], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


_NAMES: dict[str, str] = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/gif": "GIF",
    "image/webp": "WebP",
}


def _kind(data: str) -> ImageMediaType | None:
    """The media type of base64 `data` (checked) by its magic bytes; None for another."""
    head = binascii.a2b_base64(data[:16])  # 12 bytes: enough for every signature
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def check_kind(data: str, media_type: ImageMediaType, path: str) -> None:
    """400 naming `path` (where the type was given) unless base64 `data` (checked) starts
    as a `media_type` file does: Anthropic's API refuses a mismatch, which would else be
    the upstream's error, not the client's."""
    kind = _kind(data)
    if kind != media_type:
        shown = _NAMES[kind] if kind is not None else "none of PNG, JPEG, GIF or WebP"
        raise InvalidRequest(
            f"$.{path}: the image's bytes are {shown}, not {media_type}", param=path
        )


def sniff(data: str, path: str) -> ImageMediaType:
    """The media type of base64 `data` by its magic bytes (Ollama's images carry none);
    400 naming `path` for bad base64 or another format."""
    check_data(data, path)
    kind = _kind(data)
    if kind is not None:
        return kind
    raise InvalidRequest(
        f"$.{path}: not an image stella knows: {_MEDIA_TYPES_TEXT} (by its first bytes)",
        param=path,
    )


def check_native(messages: Sequence[Message]) -> None:
    """400 naming its path for an image of the native API that is not one stella can
    send: on a message other than a user's or a tool's, neither or both of data and url,
    data without a media type or not base64, a URL that is not http(s), a user's past
    MAX_IMAGES (a tool result's past it is a note: see `within_cap`)."""
    counter = Counter()
    for i, m in enumerate(messages):
        if not m.images:
            continue
        if m.role not in ("user", "tool"):
            raise InvalidRequest(
                f"$.messages[{i}].images: only a user or tool message may carry images",
                param=f"messages[{i}].images",
            )
        for j, image in enumerate(m.images):
            path = f"messages[{i}].images[{j}]"
            if m.role != "tool":
                counter.add(path)
            elif not counter.room():
                continue  # a note in its place (within_cap), as in every dialect
            if (image.data is None) == (image.url is None):
                raise InvalidRequest(
                    f"$.{path}: give exactly one of data (with media_type) and url",
                    param=path,
                )
            if image.url is not None:
                if image.media_type is not None:
                    raise InvalidRequest(
                        f"$.{path}.media_type: only with data (a URL's server says its type)",
                        param=f"{path}.media_type",
                    )
                check_url(image.url, f"{path}.url")
                continue
            if image.media_type is None:
                raise InvalidRequest(
                    f"$.{path}.media_type: required with data", param=f"{path}.media_type"
                )
            check_data(image.data or "", f"{path}.data")
            check_kind(image.data or "", image.media_type, f"{path}.media_type")


# What the model reads for a tool result's image it is not sent. A tool's image is no
# question of the client's: refused, it would stay in the session's history and fail
# every later turn, and it is the tool's, not the client's to mend; so a model that reads
# text only (or an image stella cannot send) reads plainly that it did not see it.
TEXT_ONLY_NOTE = "[image omitted: this model reads text only]"
URL_NOTE = "[image omitted: an image by URL, which this model is not sent]"
UNSENDABLE_NOTE = "[image omitted: not a PNG, JPEG, GIF or WebP image stella can send]"
PAST_CAP_NOTE = f"[image omitted: more than {MAX_IMAGES} images in the request]"


def tool_image(
    counter: Counter, data: str | None = None, url: str | None = None, detail: str | None = None
) -> Image | str:
    """A tool result's image (base64 `data`, or a URL: http(s), or a data URL of base64)
    as stella sends it, its type told by its first bytes (a tool may name it by a file's
    extension), counted by `counter`; or the note the model reads in its place: for one
    past the request's cap (unchecked: the cap bounds the work a request costs) or one
    stella cannot send."""
    if not counter.room():
        return PAST_CAP_NOTE
    image = _sendable(data, url, detail)
    return UNSENDABLE_NOTE if image is None else image


def _sendable(data: str | None, url: str | None, detail: str | None) -> Image | None:
    """A tool result's image as stella sends it; None for one it cannot send."""
    if data is None and url is not None and url[:5].lower() == "data:":
        split = _data_url(url)
        if split is None:
            return None
        data = split[1]
    try:
        if data is not None:
            check_data(data, "")
            kind = _kind(data)
            return (
                None if kind is None else Image(data=data, media_type=kind, detail=_detail(detail))
            )
        if url is not None:
            check_url(url, "")
            return Image(url=url, detail=_detail(detail))
    except InvalidRequest:
        pass
    return None


def with_notes(text: str, notes: Sequence[str]) -> str:
    """A tool message's text with notes for the images it was not sent, before the text
    (where the images would be read)."""
    return "\n".join([*notes, text] if text else notes)


def within_cap(messages: list[Message]) -> list[Message]:
    """`messages` with at most MAX_IMAGES images: a user's own first (a dialect refused
    more), then tool results' in their order, those past the cap a note in their text."""
    room = MAX_IMAGES
    for m in messages:
        if m.images and m.role != "tool":
            room -= len(m.images)
    out: list[Message] | None = None
    for i, m in enumerate(messages):
        if m.role != "tool" or not m.images:
            continue
        if len(m.images) <= room:
            room -= len(m.images)
            continue
        kept = m.images[: max(room, 0)]
        room = 0
        if out is None:
            out = list(messages)
        notes = [PAST_CAP_NOTE] * (len(m.images) - len(kept))
        out[i] = msgspec.structs.replace(
            m, content=with_notes(m.content, notes), images=kept or None
        )
    return messages if out is None else out


def readable(messages: list[Message], reads_images: bool, reads_urls: bool) -> list[Message]:
    """`messages` as a backend gets them: a tool message's images it cannot read (every
    one when it reads text only; by URL when it is sent none) a note in its text instead.
    A user message's images are routing's: a backend is never given ones it cannot read."""
    if reads_images and reads_urls:
        return messages
    out: list[Message] | None = None
    for i, m in enumerate(messages):
        if m.role != "tool" or not m.images:
            continue
        kept: list[Image] = []
        notes: list[str] = []
        for image in m.images:
            if not reads_images:
                notes.append(TEXT_ONLY_NOTE)
            elif image.url is not None:
                notes.append(URL_NOTE)
            else:
                kept.append(image)
        if out is None:
            out = list(messages)
        out[i] = msgspec.structs.replace(
            m, content=with_notes(m.content, notes), images=kept or None
        )
    return messages if out is None else out


class ImagesSeen(NamedTuple):
    """Where a request's images are, as routing needs to know."""

    # The path of its first image in a message not a tool's (None: only tool results
    # hold images, which every backend takes, as images or as notes: see `readable`).
    first: str | None
    by_url: str | None  # the path of that kind's first image by URL (None: all are data)
    total: int  # how many there are, tool results' included


def first_images(messages: Sequence[Message]) -> ImagesSeen | None:
    """Where the request's images are; None for a request without images."""
    first: str | None = None
    by_url: str | None = None
    count = 0
    for i, m in enumerate(messages):
        images = m.images
        if not images:
            continue
        count += len(images)
        if m.role == "tool":
            continue
        if first is None:
            first = f"messages[{i}].images[0]"
        if by_url is None:
            for j, image in enumerate(images):
                if image.url is not None:
                    by_url = f"messages[{i}].images[{j}]"
                    break
    return None if not count else ImagesSeen(first, by_url, count)
