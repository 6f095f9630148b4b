"""Tests for mmllm.images: every image is drawn with PIL into tmp_path; remote tests use a loopback server."""

from __future__ import annotations

import gc
import io
import pickle
import random
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import PIL
from PIL import Image, ImageFile

from mmllm.images import REASONS, ImageError, ImagePolicy, load_image, open_image_bytes, resolve_image_path

WHITE = (255, 255, 255)
PIL_MAJOR = int(PIL.__version__.split(".")[0])


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Incompressible RGB noise, so encoded files have a long pixel-data section to cut or damage."""
    return Image.frombytes("RGB", size, random.Random(seed).randbytes(size[0] * size[1] * 3))


def refused(reason: str, ref: str, policy: ImagePolicy, call=load_image) -> ImageError:
    """Assert that `call` refuses `ref` with `reason` and a message naming the reference."""
    with pytest.raises(ImageError) as info:
        call(ref, policy)
    err = info.value
    assert (err.reason, err.ref) == (reason, ref), str(err)
    assert repr(ref) in str(err)
    return err


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "catalog"
    folder.mkdir()
    return folder


@pytest.fixture
def policy(root: Path) -> ImagePolicy:
    return ImagePolicy(root=root)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A valid image next to, not inside, the catalog root."""
    path = tmp_path / "secret.png"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(path)
    return path


# --- decoding good images -------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_good_formats_load_as_rgb(root: Path, policy: ImagePolicy, fmt: str):
    (root / "sub").mkdir()
    (root / "sub" / "toy.img").write_bytes(encode(Image.new("RGB", (31, 17), (200, 30, 30)), fmt))
    img = load_image("sub/toy.img", policy)
    assert (img.mode, img.size) == ("RGB", (31, 17))
    assert all(abs(a - b) <= 8 for a, b in zip(img.getpixel((15, 8)), (200, 30, 30)))


def test_absolute_path_inside_root_and_without_root(root: Path, policy: ImagePolicy):
    path = root / "a.png"
    Image.new("RGB", (3, 2)).save(path)
    assert load_image(str(path), policy).size == (3, 2)
    assert load_image(str(path), ImagePolicy()).size == (3, 2)


def test_exif_orientation_is_applied(root: Path, policy: ImagePolicy):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.new("RGB", (40, 20), (0, 0, 255)).save(root / "rot.jpg", exif=exif)
    assert load_image("rot.jpg", policy).size == (20, 40)


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "MPO"])
def test_multi_frame_gives_first_frame(root: Path, policy: ImagePolicy, fmt: str):
    frames = [Image.new("RGB", (8, 8), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    (root / "multi.img").write_bytes(encode(frames[0], fmt, save_all=True, append_images=frames[1:]))
    with Image.open(root / "multi.img") as written:
        assert written.n_frames == 2
    red, green, blue = load_image("multi.img", policy).getpixel((4, 4))
    assert red > 250 and blue < 5


def _palette_with_transparency() -> Image.Image:
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 255, 0, 0])
    img.putpixel((0, 0), 0)
    img.info["transparency"] = 0
    return img


def _rgba() -> Image.Image:
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    img.putpixel((1, 1), (0, 0, 0, 128))
    return img


@pytest.mark.parametrize(
    ("name", "make", "fmt", "xy", "expected"),
    [
        ("palette transparent", _palette_with_transparency, "PNG", (0, 0), WHITE),
        ("palette opaque", _palette_with_transparency, "PNG", (1, 1), (255, 0, 0)),
        ("gif transparent", _palette_with_transparency, "GIF", (0, 0), WHITE),
        ("rgba transparent", _rgba, "PNG", (0, 0), WHITE),
        ("rgba half", _rgba, "PNG", (1, 1), (127, 127, 127)),
        ("la transparent", lambda: Image.new("LA", (4, 4), (0, 0)), "PNG", (0, 0), WHITE),
        ("rgb trns colour", lambda: Image.new("RGB", (4, 4), (1, 2, 3)), "PNG+trns", (0, 0), WHITE),
        ("cmyk", lambda: Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "TIFF", (0, 0), (255, 0, 0)),
        ("grey", lambda: Image.new("L", (4, 4), 77), "PNG", (0, 0), (77, 77, 77)),
        ("1-bit", lambda: Image.new("1", (4, 4), 1), "PNG", (0, 0), WHITE),
        ("16-bit grey full", lambda: Image.new("I;16", (4, 4), 65535), "PNG", (0, 0), WHITE),
        ("16-bit grey mid", lambda: Image.new("I;16", (4, 4), 32896), "PNG", (0, 0), (128, 128, 128)),
        ("float grey", lambda: Image.linear_gradient("L").convert("F"), "TIFF", (0, 255), WHITE),
        ("cmyk jpeg", lambda: Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG", (0, 0), (255, 0, 0)),
        pytest.param("ycbcr", lambda: Image.new("YCbCr", (4, 4), (76, 84, 255)), "TIFF", (0, 0), (255, 0, 0),
                     # Pillow 12 reads an uncompressed YCbCr TIFF as RGBX and calls it truncated; gradio
                     # (the demo extra) still caps Pillow below 13
                     marks=pytest.mark.xfail(PIL_MAJOR < 13, reason="Pillow < 13 YCbCr TIFF bug", strict=True)),
        ("lab white", lambda: Image.new("LAB", (4, 4), (255, 128, 128)), "TIFF", (0, 0), WHITE),
    ],
)
def test_modes_convert_to_rgb(root: Path, policy: ImagePolicy, name, make, fmt, xy, expected):
    img = make()
    params = {"transparency": img.getpixel((0, 0))} if fmt == "PNG+trns" else {}
    (root / "m.img").write_bytes(encode(img, fmt.removesuffix("+trns"), **params))
    out = load_image("m.img", policy)
    assert out.mode == "RGB"
    assert all(abs(a - b) <= 3 for a, b in zip(out.getpixel(xy), expected)), (name, out.getpixel(xy))


# a file left open warns while it is collected, where pytest reports it as an unraisable exception
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_open_image_bytes_defaults_and_no_resource_warning(root: Path, policy: ImagePolicy):
    (root / "a.png").write_bytes(encode(Image.new("RGB", (5, 5)), "PNG"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert open_image_bytes(encode(Image.new("L", (5, 6)), "PNG")).size == (5, 6)
        load_image("a.png", policy)
        gc.collect()


# --- path refusals --------------------------------------------------------------------------


@pytest.mark.parametrize("ref", ["../secret.png", "sub/../../secret.png", "./../secret.png"])
def test_path_traversal(policy: ImagePolicy, outside: Path, ref: str):
    refused("path_traversal", ref, policy, resolve_image_path)
    refused("path_traversal", ref, policy)


def test_absolute_path_outside_root(policy: ImagePolicy, outside: Path):
    refused("outside_root", str(outside), policy)


def test_symlink_to_file_outside_root(root: Path, policy: ImagePolicy, outside: Path):
    (root / "link.png").symlink_to(outside)
    err = refused("symlink_escape", "link.png", policy)
    # where the link points is not the catalog's business, nor a demo user's: it is never shown
    assert str(err) == ("image 'link.png': path leaves the image root through a symlink; "
                        "copy the file into the root instead of linking it")


def test_symlinked_directory_outside_root(root: Path, policy: ImagePolicy, outside: Path):
    (root / "shared").symlink_to(outside.parent, target_is_directory=True)
    refused("symlink_escape", "shared/secret.png", policy)


def test_symlink_inside_root_is_fine(root: Path, policy: ImagePolicy):
    (root / "real").mkdir()
    Image.new("RGB", (6, 2)).save(root / "real" / "a.png")
    (root / "alias.png").symlink_to(root / "real" / "a.png")
    (root / "dir").symlink_to("real", target_is_directory=True)
    assert resolve_image_path("alias.png", policy) == (root / "real" / "a.png").resolve()
    assert load_image("dir/a.png", policy).size == (6, 2)


def test_root_given_through_a_symlink(tmp_path: Path, root: Path):
    Image.new("RGB", (2, 2)).save(root / "a.png")
    (tmp_path / "via").symlink_to(root, target_is_directory=True)
    policy = ImagePolicy(root=tmp_path / "via")
    assert load_image("a.png", policy).size == (2, 2)
    assert load_image(str(root / "a.png"), policy).size == (2, 2)  # real path of the root is inside too


def test_missing_and_not_a_file(root: Path, policy: ImagePolicy):
    (root / "folder").mkdir()
    refused("missing", "nope.png", policy)
    refused("not_a_file", "folder", policy)
    refused("not_a_file", ".", policy)


@pytest.mark.parametrize(
    "ref",
    ["", "   ", "a\x00.png", "file:///etc/passwd", "data:image/png;base64,iVBORw0KGgo=", "ftp://h/a.png", "s3://b/k"],
)
def test_bad_references(policy: ImagePolicy, ref: str):
    refused("bad_reference", ref, policy)


def test_relative_path_needs_root():
    err = refused("bad_reference", "a.png", ImagePolicy())
    assert "image root" in str(err)


def test_remote_refused_by_default(policy: ImagePolicy):
    err = refused("remote_refused", "https://example.com/a.jpg", policy)
    assert "allow_remote" in str(err)
    refused("remote_refused", "HTTP://example.com/a.jpg", policy, resolve_image_path)


# --- content refusals -----------------------------------------------------------------------


def test_too_large_is_refused_before_reading(root: Path, monkeypatch):
    (root / "big.png").write_bytes(encode(noise((64, 64)), "PNG"))
    monkeypatch.setattr(Path, "open", lambda *a, **k: pytest.fail("file was opened"))
    refused("too_large", "big.png", ImagePolicy(root=root, max_bytes=1000))


def test_bomb_refused_from_header_without_decoding(root: Path, monkeypatch):
    # 36 Mpx of 1-bit zeros compress to a few KB; below PIL's own warning limit, so this is our check.
    Image.new("1", (6000, 6000)).save(root / "bomb.png")
    assert (root / "bomb.png").stat().st_size < 50_000
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self))
    err = refused("bomb", "bomb.png", ImagePolicy(root=root, max_pixels=1_000_000))
    assert not decoded  # refused from the header: no pixel was decoded (a duration would depend on the machine)
    assert "6000x6000" in str(err)


@pytest.mark.parametrize("limit", [1000, 500])  # 1600 px: PIL warns above its limit, errors above twice it
def test_pil_bomb_guard_becomes_bomb_without_touching_globals(root: Path, monkeypatch, limit: int):
    Image.new("RGB", (40, 40)).save(root / "a.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    filters = list(warnings.filters)
    refused("bomb", "a.png", ImagePolicy(root=root))
    assert warnings.filters == filters
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "TIFF"])
def test_truncated(root: Path, policy: ImagePolicy, fmt: str):
    data = encode(noise((120, 90)), fmt)
    (root / "cut.img").write_bytes(data[: len(data) * 2 // 3])
    refused("truncated", "cut.img", policy)


def test_corrupt_png(root: Path, policy: ImagePolicy):
    data = bytearray(encode(noise((120, 90)), "PNG"))
    middle = len(data) // 2
    data[middle : middle + 64] = b"\xff" * 64
    (root / "bad.png").write_bytes(bytes(data))
    refused("corrupt", "bad.png", policy)


def test_unknown_format(root: Path, policy: ImagePolicy):
    (root / "noise.jpg").write_bytes(random.Random(1).randbytes(2000))
    (root / "notes.png").write_text("this is not a picture\n")
    (root / "empty.png").write_bytes(b"")
    for ref in ["noise.jpg", "notes.png", "empty.png"]:
        refused("unknown_format", ref, policy)


def test_format_not_allowed(root: Path, policy: ImagePolicy):
    Image.new("RGB", (8, 8)).save(root / "a.ppm")
    Image.new("RGB", (8, 8)).save(root / "a.png")
    err = refused("format_not_allowed", "a.ppm", policy)
    assert "PPM" in str(err)
    refused("format_not_allowed", "a.png", ImagePolicy(root=root, allowed_formats=frozenset({"jpeg"})))
    assert load_image("a.ppm", ImagePolicy(root=root, allowed_formats=frozenset({"PPM"}))).size == (8, 8)


def test_image_error_pickles_and_reasons_are_known():
    err = pickle.loads(pickle.dumps(ImageError("a.png", "missing", "gone")))
    assert (err.ref, err.reason, str(err)) == ("a.png", "missing", "image 'a.png': gone")
    assert isinstance(err, ValueError)
    assert len(REASONS) == 15


def test_a_strip_no_vision_processor_reads_is_refused(root: Path, policy: ImagePolicy):
    """A 4000 x 10 banner made a Qwen-VL processor raise inside the training batch, stopping the run (and its
    resume, at the same batch); refused here, the row keeps its text as with any bad image."""
    Image.new("RGB", (4000, 10), "red").save(root / "strip.png")
    Image.new("RGB", (10, 2000), "red").save(root / "tall.png")
    for name in ("strip.png", "tall.png"):
        with pytest.raises(ImageError) as info:
            load_image(name, policy)
        assert info.value.reason == "aspect" and "200 times the other" in str(info.value)
    Image.new("RGB", (1990, 10), "red").save(root / "wide.png")
    assert load_image("wide.png", policy).size == (1990, 10)


# --- remote (loopback server only) ----------------------------------------------------------


@pytest.fixture
def server(monkeypatch):
    """Serve `routes[path] = (status, headers, body_chunks, delay_s)` on 127.0.0.1."""
    for var in ["http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"]:
        monkeypatch.delenv(var, raising=False)  # loopback requests must not go to a proxy
    routes: dict[str, tuple] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            status, headers, chunks, delay = routes.get(self.path, (404, {}, [b"not found"], 0))
            try:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                for chunk in chunks:
                    time.sleep(delay)
                    self.wfile.write(chunk)
                    self.wfile.flush()
            except OSError:
                pass  # the client gave up, as the timeout tests intend

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}", routes
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


REMOTE = ImagePolicy(allow_remote=True, remote_timeout_s=30.0)  # success paths: a loaded machine must not time them out


def test_remote_allowed(server):
    base, routes = server
    body = encode(Image.new("RGBA", (9, 7), (0, 0, 0, 0)), "PNG")
    routes["/toy.png"] = (200, {"Content-Type": "image/png", "Content-Length": str(len(body))}, [body], 0)
    img = load_image(f"{base}/toy.png", REMOTE)
    assert (img.mode, img.size, img.getpixel((0, 0))) == ("RGB", (9, 7), WHITE)


def test_remote_too_large(server):
    base, routes = server
    body = encode(noise((64, 64)), "PNG")
    routes["/declared.png"] = (200, {"Content-Length": str(len(body))}, [body], 0)
    routes["/undeclared.png"] = (200, {}, [body], 0)  # HTTP/1.0 body until close: counted while reading
    small = ImagePolicy(allow_remote=True, remote_timeout_s=30.0, max_bytes=1000)
    for path in ["/declared.png", "/undeclared.png"]:
        refused("too_large", base + path, small)


def test_remote_failures(server):
    base, routes = server
    routes["/to-file"] = (302, {"Location": "file:///etc/passwd"}, [], 0)
    routes["/slow"] = (200, {}, [b"x"], 1.0)
    routes["/trickle"] = (200, {}, [b"x"] * 20, 0.1)  # each read is quick, the whole is too slow
    routes["/text"] = (200, {}, [b"<html>hello</html>"], 0)
    quick = ImagePolicy(allow_remote=True, remote_timeout_s=0.4)
    refused("remote_failed", f"{base}/missing.png", REMOTE)
    refused("remote_failed", f"{base}/to-file", REMOTE)
    refused("remote_failed", f"{base}/trickle", quick)
    refused("remote_failed", f"{base}/slow", ImagePolicy(allow_remote=True, remote_timeout_s=0.2))
    refused("unknown_format", f"{base}/text", REMOTE)
