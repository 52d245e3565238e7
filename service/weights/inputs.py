"""A caller's file sent as a URL (Cog's `image` and the trainer's `input_images`, plain `str` inputs, so that coglet
fetches nothing itself): an https URL downloaded under the strict download policy (service/weights/policy.py:
public hosts only, checked on every redirect, deadlines, cancellable), or a data: URL decoded here by the one base64
decoder (service/images.py); either way under the input's own size cap, the policy's `max_bytes`.

Every failure is a RequestError naming the input, with the policy's message (the host and the rule), never the URL:
a signed URL carries its secret in the query string.
"""

import asyncio
import io
import threading
import urllib.parse
from typing import BinaryIO

from service.errors import RequestError
from service.images import decode_base64
from service.weights.policy import DownloadError, DownloadPolicy, stream


def read_input(
    value: str, field: str, policy: DownloadPolicy, out: BinaryIO, cancel: threading.Event | None = None
) -> None:
    """Write the file at `value` (an https URL or a data: URL) to `out`; blocking, so call it off the event loop.
    A set `cancel` stops a download between chunks."""
    if value.startswith("data:"):
        out.write(decode_base64(value, field, policy.max_bytes))
        return
    if urllib.parse.urlsplit(value).scheme.lower() not in ("https", "http"):  # http only if the policy allows it
        raise RequestError(field, "must be an https:// URL or a data: URL of the file")
    try:
        with stream(value, policy, cancel=cancel) as download:
            for chunk in download.chunks():
                out.write(chunk)
    except DownloadError as error:
        raise RequestError(field, str(error)) from None


async def fetch_input(value: str, field: str, policy: DownloadPolicy) -> bytes:
    """read_input into memory on a worker thread; cancelling the awaiting task (a cancelled prediction) stops the
    download within the policy's stall timeout."""
    cancel = threading.Event()
    buffer = io.BytesIO()
    try:
        await asyncio.to_thread(read_input, value, field, policy, buffer, cancel)
    except asyncio.CancelledError:
        cancel.set()
        raise
    return buffer.getvalue()
