"""What the check service accepts, and how it refuses (docs/serving.md, "Safe by default").

Every refusal is a :class:`Refusal`: an HTTP status and a JSON body ``{"error", "detail"}``, where
``error`` is a short code a client can branch on and ``detail`` says what to change.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any

IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp", "image/tiff",
                         "application/octet-stream"})
MULTIPART = "multipart/form-data"
MAX_BODY_BYTES = 20 * 2**20  # one request's body; --max-body-mb
MAX_BATCH = 64  # images in one request
MAX_K = 100  # candidates returned per image
MAX_PROMPTS = 16  # prompts in one screen request
MAX_PROMPT_CHARS = 4096  # the text encoders take far fewer tokens; longer is a mistake, not a prompt
JSON = "application/json"


@dataclass(frozen=True)
class Refusal(Exception):
    status: int
    error: str
    detail: str

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "detail": self.detail}


def token_digest(token: str | None) -> str | None:
    """What the service keeps of its bearer token: its sha256 (the token itself never reaches a
    deployment's arguments, which Serve shows in its config)."""
    return hashlib.sha256(token.encode()).hexdigest() if token else None


def check_token(authorization: str | None, digest: str | None) -> None:
    """Refuse (401) a request without the service's bearer token, when it has one."""
    if digest is None:
        return
    scheme, _, sent = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token_digest(sent.strip()) or "", digest):
        raise Refusal(401, "unauthorized", "send the service's token as 'Authorization: Bearer <token>'")


def check_length(content_length: str | None, limit: int) -> None:
    """Refuse (413) a body its Content-Length already says is too large, before reading it."""
    if content_length is None:
        return
    try:
        length = int(content_length)
    except ValueError:
        raise Refusal(400, "bad_content_length", f"Content-Length {content_length!r} is not a number") from None
    if length > limit:
        raise too_large(length, limit)


def too_large(length: int, limit: int) -> Refusal:
    return Refusal(413, "body_too_large", f"the body has {length} bytes or more; the limit is {limit} "
                                          "(send fewer or smaller images, or start the service with --max-body-mb)")


def media_type(content_type: str | None) -> str:
    """The media type of a Content-Type header, lower case, without parameters."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def check_image_type(content_type: str | None, multipart_ok: bool) -> str:
    """The request's media type when it is an image type (or multipart where allowed); else 415."""
    kind = media_type(content_type)
    if kind in IMAGE_TYPES or (multipart_ok and kind == MULTIPART):
        return kind
    accepted = ", ".join(sorted(IMAGE_TYPES | ({MULTIPART} if multipart_ok else set())))
    raise Refusal(415, "unsupported_media_type", f"Content-Type {kind or '(none)'} is not accepted; send one of {accepted}")


def check_batch(images: list[bytes], captions: list[str], limit: int = MAX_BATCH) -> list[str | None]:
    """The captions aligned with the images (none sent: no caption for any); refuses an empty
    batch, one too large, or captions that do not pair with the images."""
    if not images:
        raise Refusal(400, "no_image", "send at least one image: multipart fields named 'image'")
    if len(images) > limit:
        raise Refusal(413, "batch_too_large", f"{len(images)} images; at most {limit} per request")
    if captions and len(captions) != len(images):
        raise Refusal(400, "captions_mismatch", f"{len(captions)} 'caption' fields for {len(images)} images; send "
                                                "one per image, in order, or none")
    return list(captions) if captions else [None] * len(images)


def screen_prompts(content_type: str | None, body: bytes) -> list[str]:
    """The prompts of a screen request: a JSON object ``{"prompt": "..."}`` or ``{"prompts": [...]}``
    (at most :data:`MAX_PROMPTS`, each a non-blank string of at most :data:`MAX_PROMPT_CHARS`)."""
    if media_type(content_type) != JSON:
        raise Refusal(415, "unsupported_media_type", f"Content-Type {media_type(content_type) or '(none)'} is not "
                                                     f"accepted; send {JSON}: {{\"prompt\": \"...\"}}")
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Refusal(400, "bad_json", f"the body is not JSON ({exc}); send {{\"prompt\": \"...\"}}") from None
    if not isinstance(request, dict) or ("prompt" in request) == ("prompts" in request):
        raise Refusal(400, "no_prompt", 'send a JSON object with "prompt" (a string) or "prompts" (a list of strings)')
    prompts = [request["prompt"]] if "prompt" in request else request["prompts"]
    if not isinstance(prompts, list) or not prompts:
        raise Refusal(400, "no_prompt", '"prompts" must be a non-empty list of strings')
    if len(prompts) > MAX_PROMPTS:
        raise Refusal(413, "batch_too_large", f"{len(prompts)} prompts; at most {MAX_PROMPTS} per request")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise Refusal(400, "bad_prompt", f"prompt {i} is {type(prompt).__name__} {str(prompt)[:40]!r}; every "
                                             "prompt must be a non-blank string")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise Refusal(413, "prompt_too_long", f"prompt {i} has {len(prompt)} characters; at most "
                                                  f"{MAX_PROMPT_CHARS}")
    return prompts


def check_k(value: str | None, default: int) -> int:
    if value is None:
        return default
    try:
        k = int(value)
    except ValueError:
        raise Refusal(400, "bad_k", f"k={value!r} is not an integer") from None
    if not 1 <= k <= MAX_K:
        raise Refusal(400, "bad_k", f"k={k}; it must be between 1 and {MAX_K}")
    return k


def image_refusal(error: str) -> Refusal:
    """The refusal of a single image that did not decode (the audit's decode codes)."""
    code = error.split(":", 1)[0]
    if code == "too_large":
        return Refusal(413, "image_too_large", f"{error} (the service's pixel limit is embedding.max_image_pixels)")
    if code == "zero_byte":
        return Refusal(400, "empty_body", "the body is empty; send the image's bytes")
    return Refusal(422, "not_an_image", error)
