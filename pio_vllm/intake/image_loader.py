"""ImageLoader: turn any accepted image input into an RGB PIL image (frontend process).

Accepted inputs: a PIL image, a file path (str or Path, or a file:// URL), encoded bytes, a
`data:image/...;base64,` URL, or an http(s) URL. Hashing, header checks, decoding, EXIF
rotation, RGB conversion and optional downscaling run in a bounded thread pool, never on the
event loop (Pillow releases the GIL while decoding). Identical encoded bytes are decoded once:
finished images are kept in an LRU cache keyed by a content hash (bounded by entries and by
decoded bytes) and concurrent loads of the same bytes share one decode.

Limits are checked before pixels are allocated: encoded size against `max_image_bytes`,
width*height from the header against `max_image_pixels` (this refuses decompression bombs).

Size: every image source (object, path, bytes, data URL, http(s)) with its checks before
decoding, and the bounded decode pool and cache that serve them (~410 lines).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import hashlib
import io
import logging
import math
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from PIL import Image, ImageOps, UnidentifiedImageError

from pio_vllm.errors import (
    ImageDecodeError,
    ImageError,
    ImageNotFoundError,
    ImageSourceError,
    ImageTooLargeError,
    RequestRejectedError,
)
from pio_vllm.intake.address_policy import AddressPolicy, parse_exception
from pio_vllm.intake.cost_estimate import header_prefix
from pio_vllm.intake.url_fetcher import UrlFetcher
from pio_vllm.request import ImageInput
from pio_vllm.settings import ImageSettings

logger = logging.getLogger(__name__)

# The alpha background vLLM and transformers composite RGBA images on (white).
_ALPHA_BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class LoadedImage:
    """A decoded RGB image ready for vLLM, with its content hash."""

    image: Image.Image
    content_hash: str

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height

    @property
    def nbytes(self) -> int:
        return self.image.width * self.image.height * 3


@dataclass(frozen=True)
class ImageCacheStats:
    """Snapshot of the decode cache."""

    entries: int
    bytes: int
    hits: int
    misses: int
    shared_decodes: int


def _hash_bytes(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any mode to RGB the way vLLM does: transparency composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class ImageLoader:
    """Loads images for requests. One per engine; close with `aclose()`."""

    def __init__(self, settings: ImageSettings) -> None:
        self._settings = settings
        self._pool = ThreadPoolExecutor(
            max_workers=settings.decode_workers, thread_name_prefix="pio-image"
        )
        self._fetcher = UrlFetcher(
            timeout_s=settings.fetch_timeout_s,
            max_bytes=settings.max_image_bytes,
            allowed_domains=settings.allowed_url_domains,
            address_policy=AddressPolicy(
                parse_exception(spec) for spec in settings.allowed_private_networks),
        )
        self._cache: OrderedDict[str, LoadedImage] = OrderedDict()
        self._cache_bytes = 0
        self._inflight: dict[str, asyncio.Future[LoadedImage]] = {}  # key -> decode task
        self._pending = 0
        self._hits = 0
        self._misses = 0
        self._shared = 0

    # -- public API ---------------------------------------------------------------------

    async def load_all(self, images: list[ImageInput]) -> list[LoadedImage]:
        """Load the images of one request concurrently, in order."""
        return list(await asyncio.gather(*(self.load(img, i) for i, img in enumerate(images))))

    async def load(self, source: ImageInput, index: int | None = None) -> LoadedImage:
        """Load one image; raise a typed ImageError naming the source on failure."""
        if isinstance(source, Image.Image):
            return await self._run(self._from_pil, source, index)
        if isinstance(source, bytes | bytearray | memoryview):
            return await self._from_bytes(bytes(source), index)
        if isinstance(source, Path):
            return await self._from_path(source, index)
        if isinstance(source, str):
            return await self._from_string(source, index)
        raise ImageSourceError(
            f"unsupported image type {type(source).__name__}; accepted: PIL.Image.Image, "
            "bytes, pathlib.Path, or a str path / data: / http(s):// / file:// URL",
            index,
        )

    def stats(self) -> ImageCacheStats:
        return ImageCacheStats(
            entries=len(self._cache),
            bytes=self._cache_bytes,
            hits=self._hits,
            misses=self._misses,
            shared_decodes=self._shared,
        )

    async def aclose(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
        await self._fetcher.aclose()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._cache.clear()
        self._cache_bytes = 0

    # -- sources ------------------------------------------------------------------------

    async def source_bytes(self, source: str, index: int | None = None) -> bytes:
        """The encoded bytes behind a path or data: / http(s) / file URL, under the same
        limits and allow-lists as `load` (no decode)."""
        scheme = urlsplit(source).scheme.lower() if "://" in source[:16] else ""
        if source.startswith("data:"):
            data = self._decode_data_url(source, index)
        elif scheme in ("http", "https"):
            data = await self._fetcher.fetch(source, index)
        elif scheme == "file":
            data = await self._path_bytes(Path(unquote(urlsplit(source).path)), index)
        elif scheme:
            raise ImageSourceError(
                f"unsupported URL scheme {scheme!r} in {source[:80]!r}; accepted: http, https, "
                "data, file",
                index,
            )
        else:
            data = await self._path_bytes(Path(source), index)
        self._check_bytes(data, index)
        return data

    async def probe(self, data: bytes, index: int | None = None) -> tuple[int, int, str]:
        """(width, height, format) from the image header only; refuses what exceeds the
        pixel limit (decompression bombs) without decoding pixels."""
        return tuple(await self._run(self._probe, data, index))  # type: ignore[return-value]

    async def probe_data_url(self, url: str, index: int | None = None) -> tuple[int, int, str]:
        """`probe` of a base64 data URL from the start of its payload only: its size comes
        from the payload's length, its header from the prefix the cost estimate sizes
        images from (`cost_estimate.header_prefix`), so the server's gate does not decode
        every inline image that vLLM decodes again (measured on the overhead workload, the
        full decode was a third of the gate's CPU time). The whole payload is decoded only
        when the header lies further in (a JPEG after large APP segments)."""
        payload = self._data_url_payload(url, index)
        prefix = header_prefix(payload)
        if len(prefix) == len(payload):
            return await self.probe(self._b64decode(payload, index), index)
        try:
            return await self.probe(self._b64decode(prefix, index), index)
        except ImageDecodeError:
            return await self.probe(self._b64decode(payload, index), index)

    async def _from_string(self, source: str, index: int | None) -> LoadedImage:
        return await self._from_bytes(await self.source_bytes(source, index), index)

    def _decode_data_url(self, url: str, index: int | None) -> bytes:
        return self._b64decode(self._data_url_payload(url, index), index)

    def _data_url_payload(self, url: str, index: int | None) -> str:
        """The base64 payload of a data URL, refused when it is not base64 or when its
        decoded size would exceed `max_image_bytes` (known before decoding)."""
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ImageSourceError(
                f"data URL {url[:60]!r} is not base64; accepted: data:image/<type>;base64,<data>",
                index,
            )
        # base64 grows data by 4/3 (less its padding): refuse before decoding what cannot
        # fit the limit.
        size = len(payload) * 3 // 4 - payload.endswith("=") - payload.endswith("==")
        if size > self._settings.max_image_bytes:
            raise ImageTooLargeError(
                f"data URL carries {size} bytes; max_image_bytes is "
                f"{self._settings.max_image_bytes}",
                index,
            )
        return payload

    @staticmethod
    def _b64decode(payload: str, index: int | None) -> bytes:
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ImageDecodeError(f"data URL has invalid base64: {e}", index) from e

    async def _from_path(self, path: Path, index: int | None) -> LoadedImage:
        return await self._from_bytes(await self._path_bytes(path, index), index)

    async def _path_bytes(self, path: Path, index: int | None) -> bytes:
        if not self._settings.allow_local_files:
            raise ImageSourceError(
                f"local file {str(path)!r} refused: local image files are disabled "
                "(images.allow_local_files); send bytes, a data: URL or an http(s) URL",
                index,
            )
        resolved = path.expanduser().resolve()
        allowed = self._settings.allowed_local_dirs
        if allowed is not None and not any(
            resolved.is_relative_to(Path(d).expanduser().resolve()) for d in allowed
        ):
            raise ImageSourceError(
                f"local file {str(path)!r} is outside images.allowed_local_dirs "
                f"{[str(d) for d in allowed]}",
                index,
            )
        return bytes(await self._run(self._read_file, resolved, index))

    def _check_bytes(self, data: bytes, index: int | None) -> None:
        if len(data) > self._settings.max_image_bytes:
            raise ImageTooLargeError(
                f"image is {len(data)} bytes; max_image_bytes is {self._settings.max_image_bytes}",
                index,
            )
        if not data:
            raise ImageDecodeError("image is empty (0 bytes)", index)

    async def _from_bytes(self, data: bytes, index: int | None) -> LoadedImage:
        self._check_bytes(data, index)
        key = await self._run(_hash_bytes, data) if len(data) > 65536 else _hash_bytes(data)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            self._hits += 1
            return cached
        task = self._inflight.get(key)
        if task is not None:
            self._shared += 1
        else:
            self._misses += 1
            # The decode is its own task, owned by the loader, so that cancelling the request
            # that started it does not fail other requests waiting on the same bytes.
            task = asyncio.ensure_future(self._run(self._decode, data, key, index))
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._decode_done, key))
        return await asyncio.shield(task)

    def _decode_done(self, key: str, task: asyncio.Future[LoadedImage]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled() and task.exception() is None:
            self._remember(key, task.result())

    # -- worker-thread functions ---------------------------------------------------------

    def _read_file(self, path: Path, index: int | None) -> bytes:
        if not path.is_file():
            raise ImageNotFoundError(f"image file {str(path)!r} does not exist", index)
        size = path.stat().st_size
        if size > self._settings.max_image_bytes:
            raise ImageTooLargeError(
                f"image file {str(path)!r} is {size} bytes; max_image_bytes is "
                f"{self._settings.max_image_bytes}",
                index,
            )
        return path.read_bytes()

    def _probe(self, data: bytes, index: int | None) -> tuple[int, int, str]:
        with self._pil_errors(data, index):
            image = Image.open(io.BytesIO(data))
            self._check_pixels(image.width, image.height, index)
            return image.width, image.height, str(image.format or "").lower()
        raise AssertionError("unreachable")  # _pil_errors re-raises

    def _decode(self, data: bytes, key: str, index: int | None) -> LoadedImage:
        with self._pil_errors(data, index):
            image = Image.open(io.BytesIO(data))
            self._check_pixels(image.width, image.height, index)
            image.load()
        return LoadedImage(self._prepare(image, index), key)

    @contextlib.contextmanager
    def _pil_errors(self, data: bytes, index: int | None) -> Iterator[None]:
        """Pillow's failures as typed ImageErrors; its bomb warning counts as an error."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                yield
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageTooLargeError(
                f"decompression bomb refused: {e}; max_image_pixels is "
                f"{self._settings.max_image_pixels}",
                index,
            ) from e
        except UnidentifiedImageError as e:
            raise ImageDecodeError(
                f"cannot identify the image format of {len(data)} bytes; accepted: formats "
                "Pillow decodes (PNG, JPEG, WebP, GIF, BMP, TIFF, ...)",
                index,
            ) from e
        except (OSError, SyntaxError, ValueError) as e:
            # Pillow's message can quote the bytes it read: name the failure only.
            raise ImageDecodeError(
                f"image bytes are corrupt or truncated ({type(e).__name__}); accepted: a "
                "complete image file", index) from e

    def _from_pil(self, image: Image.Image, index: int | None) -> LoadedImage:
        self._check_pixels(image.width, image.height, index)
        prepared = self._prepare(image, index)
        # A caller's PIL image has no encoded bytes: hash its pixels (and size, mode).
        digest = hashlib.blake2b(digest_size=16)
        digest.update(f"{prepared.mode}:{prepared.size}".encode())
        digest.update(prepared.tobytes())
        return LoadedImage(prepared, digest.hexdigest())

    def _prepare(self, image: Image.Image, index: int | None) -> Image.Image:
        if image.width <= 0 or image.height <= 0:
            raise ImageDecodeError(f"image has size {image.width}x{image.height}", index)
        image = ImageOps.exif_transpose(image) or image
        image = _to_rgb(image)
        limit = self._settings.resize_max_pixels
        if limit is not None and image.width * image.height > limit:
            scale = math.sqrt(limit / (image.width * image.height))
            size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
            image = image.resize(size, Image.Resampling.BICUBIC)
        return image

    def _check_pixels(self, width: int, height: int, index: int | None) -> None:
        if width * height > self._settings.max_image_pixels:
            raise ImageTooLargeError(
                f"image is {width}x{height} = {width * height} pixels; max_image_pixels is "
                f"{self._settings.max_image_pixels}",
                index,
            )

    # -- helpers ------------------------------------------------------------------------

    async def _run(self, fn, *args):  # type: ignore[no-untyped-def]
        """Run `fn(*args)` in the decode pool (in-line without `decode_off_loop`); shed when
        too many jobs wait."""
        if not self._settings.decode_off_loop:
            return fn(*args)
        if self._pending >= self._settings.decode_max_pending:
            raise RequestRejectedError(
                f"{self._pending} image jobs are waiting (images.decode_max_pending="
                f"{self._settings.decode_max_pending}); retry shortly",
                retry_after_s=1.0,
                reason="image_intake_full",
            )
        self._pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            self._pending -= 1

    def _remember(self, key: str, loaded: LoadedImage) -> None:
        max_entries = self._settings.cache_max_entries
        max_bytes = int(self._settings.cache_max_mb * 1024 * 1024)
        if max_entries == 0 or loaded.nbytes > max_bytes:
            return
        self._cache[key] = loaded
        self._cache_bytes += loaded.nbytes
        while len(self._cache) > max_entries or self._cache_bytes > max_bytes:
            _, evicted = self._cache.popitem(last=False)
            self._cache_bytes -= evicted.nbytes
