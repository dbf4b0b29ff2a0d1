"""ImageLoader: every accepted source, every refusal, the hash cache and URL limits."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest
from PIL import Image

from pio_vllm.errors import (
    ImageDecodeError,
    ImageFetchError,
    ImageNotFoundError,
    ImageSourceError,
    ImageTooLargeError,
)
from pio_vllm.intake.image_loader import ImageLoader
from pio_vllm.settings import ImageSettings
from tests.helpers import (
    encode,
    http_server,
    noise_image,
    png_with_header_size,
    serve_bytes,
    serve_redirect,
    serve_slow,
)


def loader(**kwargs: object) -> ImageLoader:
    return ImageLoader(ImageSettings(**kwargs))  # type: ignore[arg-type]


async def test_sources_decode_to_the_same_rgb_pixels(tmp_path: Path) -> None:
    img = noise_image(64, 48, seed=1)
    png = encode(img)
    path = tmp_path / "a.png"
    path.write_bytes(png)
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    ld = loader()
    results = [
        await ld.load(img),
        await ld.load(png),
        await ld.load(path),
        await ld.load(str(path)),
        await ld.load(f"file://{path}"),
        await ld.load(data_url),
    ]
    for r in results:
        assert r.image.mode == "RGB" and r.image.size == (64, 48)
        assert r.image.tobytes() == img.tobytes()
    await ld.aclose()


async def test_modes_are_converted_like_vllm() -> None:
    ld = loader()
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 0))  # fully transparent red
    out = await ld.load(encode(rgba))
    assert out.image.mode == "RGB" and out.image.getpixel((0, 0)) == (255, 255, 255)
    gray = noise_image(40, 30, 2, "L")
    out = await ld.load(encode(gray))
    assert out.image.mode == "RGB" and out.image.getpixel((3, 4))[0] == gray.getpixel((3, 4))
    palette = noise_image(40, 30, 3).convert("P")
    assert (await ld.load(encode(palette))).image.mode == "RGB"
    await ld.aclose()


async def test_exif_orientation_is_applied() -> None:
    img = noise_image(60, 20, seed=4)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = encode(img, "JPEG", exif=exif.tobytes())
    out = await loader().load(data)
    assert out.image.size == (20, 60)


async def test_corrupt_truncated_and_empty_bytes() -> None:
    ld = loader()
    with pytest.raises(ImageDecodeError, match="cannot identify the image format"):
        await ld.load(b"not an image at all")
    png = encode(noise_image(64, 64, 5))
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
        await ld.load(png[: len(png) // 2])
    with pytest.raises(ImageDecodeError, match="empty"):
        await ld.load(b"")
    with pytest.raises(ImageDecodeError, match="base64"):
        await ld.load("data:image/png;base64,@@@notbase64@@@")
    await ld.aclose()


async def test_limits_refuse_before_decoding() -> None:
    ld = loader(max_image_bytes=1000, max_image_pixels=10_000)
    with pytest.raises(ImageTooLargeError, match="max_image_bytes is 1000"):
        await ld.load(b"x" * 1001)
    with pytest.raises(ImageTooLargeError, match="max_image_pixels is 10000"):
        await ld.load(png_with_header_size(200, 200))
    with pytest.raises(ImageTooLargeError, match="max_image_pixels"):
        await ld.load(noise_image(101, 100, 0))
    await ld.aclose()


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


async def test_a_data_url_is_probed_from_its_header_without_decoding_it_all() -> None:
    ld = loader(max_image_pixels=50_000_000)
    png = encode(noise_image(400, 300, 1))  # noise: far larger than the probed prefix
    assert len(png) > 200_000
    assert await ld.probe_data_url(data_url(png)) == (400, 300, "png")
    # the tail is not decoded: bad base64 after the prefix is left to vLLM's own decode
    broken = data_url(png)[:-400] + "@" * 400
    assert await ld.probe_data_url(broken) == (400, 300, "png")
    # a JPEG whose size marker lies past the prefix (large EXIF and comment segments first):
    # decoded whole
    jpeg = encode(noise_image(320, 240, 2), "JPEG", exif=b"Exif\x00\x00" + bytes(65_000),
                  comment=b"c" * 20_000)
    assert jpeg.index(b"\xff\xc0") > 64 * 1024
    assert await ld.probe_data_url(data_url(jpeg, "image/jpeg")) == (320, 240, "jpeg")
    with pytest.raises(ImageTooLargeError, match="decompression bomb"):
        await ld.probe_data_url(data_url(png_with_header_size(50_000, 50_000)))
    with pytest.raises(ImageDecodeError, match="invalid base64"):
        await ld.probe_data_url("data:image/png;base64,@@not-base64@@")
    # the exact decoded size is known from the payload's length, padding included
    small = encode(noise_image(8, 8, 0))
    assert (await loader(max_image_bytes=len(small)).probe_data_url(data_url(small)))[:2] == (
        8, 8)
    with pytest.raises(ImageTooLargeError, match=f"carries {len(small)} bytes"):
        await loader(max_image_bytes=len(small) - 1).probe_data_url(data_url(small))
    await ld.aclose()


async def test_decompression_bomb_header_is_refused() -> None:
    bomb = png_with_header_size(50_000, 50_000)  # 2.5 gigapixels claimed by a tiny file
    with pytest.raises(ImageTooLargeError, match=r"decompression bomb .*2500000000 pixels"):
        await loader().load(bomb)


async def test_unsupported_and_disallowed_sources(tmp_path: Path) -> None:
    ld = loader(allowed_local_dirs=[tmp_path / "ok"])
    with pytest.raises(ImageSourceError, match="unsupported URL scheme 'ftp'"):
        await ld.load("ftp://example.com/a.png")
    with pytest.raises(ImageSourceError, match="unsupported image type int"):
        await ld.load(42)  # type: ignore[arg-type]
    with pytest.raises(ImageSourceError, match="outside images.allowed_local_dirs"):
        await ld.load(tmp_path / "elsewhere.png")
    (tmp_path / "ok").mkdir()
    with pytest.raises(ImageNotFoundError, match="does not exist"):
        await ld.load(tmp_path / "ok" / "missing.png")
    no_files = loader(allow_local_files=False)
    with pytest.raises(ImageSourceError, match="local image files are disabled"):
        await no_files.load("/etc/hostname")
    await ld.aclose()
    await no_files.aclose()


async def test_identical_bytes_are_decoded_once() -> None:
    ld = loader()
    png = encode(noise_image(300, 200, 6))
    first, *rest = await asyncio.gather(*(ld.load(png) for _ in range(5)))
    assert all(r.image is first.image for r in rest)
    again = await ld.load(png)
    assert again.image is first.image
    stats = ld.stats()
    assert stats.misses == 1 and stats.shared_decodes + stats.hits == 5
    await ld.aclose()


async def test_cache_is_bounded_by_entries_and_bytes() -> None:
    ld = loader(cache_max_entries=2)
    for seed in range(4):
        await ld.load(encode(noise_image(32, 32, seed)))
    assert ld.stats().entries == 2
    small = loader(cache_max_mb=0.01)  # 10 KiB: one 32x32 RGB image is 3 KiB
    for seed in range(6):
        await small.load(encode(noise_image(32, 32, seed)))
    assert small.stats().bytes <= 0.01 * 1024 * 1024 and small.stats().entries == 3
    await ld.aclose()
    await small.aclose()


async def test_resize_max_pixels_downscales_keeping_aspect() -> None:
    out = await loader(resize_max_pixels=10_000).load(noise_image(400, 100, 7))
    assert out.image.width * out.image.height <= 10_000
    assert abs(out.image.width / out.image.height - 4.0) < 0.1


async def test_http_fetch_ok_and_each_failure() -> None:
    png = encode(noise_image(50, 40, 8))
    routes = {
        "/ok.png": serve_bytes(png),
        "/big.png": serve_bytes(b"x" * 20000),
        "/slow.png": serve_slow(3.0),
        "/redirect": serve_redirect("http://localhost.invalid/x.png"),
    }
    with http_server(routes) as base:
        ld = loader(fetch_timeout_s=0.5, max_image_bytes=10000,
                    allowed_url_domains=["127.0.0.1"],
                    allowed_private_networks=["127.0.0.1/32"])
        out = await ld.load(f"{base}/ok.png")
        assert out.image.size == (50, 40)
        with pytest.raises(ImageTooLargeError, match="max_image_bytes is 10000"):
            await ld.load(f"{base}/big.png")
        with pytest.raises(ImageFetchError, match="fetch_timeout_s=0.5"):
            await ld.load(f"{base}/slow.png")
        with pytest.raises(ImageFetchError, match="HTTP 404"):
            await ld.load(f"{base}/missing.png")
        with pytest.raises(ImageSourceError, match="not in allowed_url_domains"):
            await ld.load(f"{base}/redirect")
        with pytest.raises(ImageSourceError, match="not in allowed_url_domains"):
            await ld.load("http://example.com/a.png")
        await ld.aclose()
