"""Safe loading of catalog images.

Image references come from seller catalogs and are untrusted: a path may try
to climb out of the catalog folder, a file may be a decompression bomb, a
truncated upload or something that only pretends to be a picture. Everything
here either returns a fully decoded RGB image or raises :class:`ImageError`
with a short ``reason`` code, so callers can record the failure for one row
and carry on. Messages name the reference as the catalog gave it and never a
resolved path: they reach demo users, and where a symlink points is not theirs to see.

Both local files and (opt-in) http(s) downloads go through
:func:`open_image_bytes`, so size, pixel and format limits are enforced in one
place.
"""

from __future__ import annotations

import http.client
import io
import os
import re
import stat
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

__all__ = ["REASONS", "ImageError", "ImagePolicy", "load_image", "open_image_bytes", "resolve_image_path"]

MAX_ASPECT = 200  # width : height (either way) from which an image is refused: the Qwen-VL processors raise there

REASONS = frozenset({
    "remote_refused", "bad_reference", "path_traversal", "outside_root", "symlink_escape",
    "missing", "not_a_file", "too_large", "bomb", "unknown_format", "format_not_allowed",
    "truncated", "corrupt", "remote_failed", "aspect",
})  # fmt: skip

# "scheme:" at the start of a reference. One-letter schemes are left alone:
# they are Windows drive letters, not URLs.
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")
_REMOTE_SCHEMES = ("http", "https")
# Modes with more than 8 bits per sample; PIL's own convert("L") clips them at 255.
_HIGH_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class ImagePolicy:
    """Limits applied to every image reference."""

    root: Path | None = None
    """Folder relative references resolve in (the catalog file's folder or ``--image-root``).
    Required for relative paths; absolute paths must also lie inside it when it is set."""
    max_bytes: int = 20 * 2**20
    """Largest accepted file or download, in bytes; checked before the data is read."""
    max_pixels: int = 40_000_000
    """Largest accepted width*height, checked from the header before decoding. PIL's own
    global ``Image.MAX_IMAGE_PIXELS`` guard still applies on top and is also reported as "bomb"."""
    allow_remote: bool = False
    """Whether http(s) URLs are fetched at all. Off by default: fetching URLs from an
    untrusted catalog lets the catalog make requests from this machine."""
    remote_timeout_s: float = 10.0
    """Socket timeout for a download, and the limit on its total duration."""
    allowed_formats: frozenset[str] = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"})
    """PIL format names that may be decoded. Checked after the header is parsed and before
    any pixel data is decoded, so exotic decoders (EPS runs Ghostscript) stay unused."""
    source_roots: tuple[tuple[str, Path], ...] = ()
    """When ``root`` is unset and rows come from several catalog files: (file name, its folder) pairs,
    so each row's images resolve in its own catalog's folder (:meth:`for_source`)."""

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.max_pixels <= 0 or self.remote_timeout_s <= 0:
            raise ValueError("ImagePolicy limits must be positive")
        if self.root is not None:
            object.__setattr__(self, "root", Path(self.root))
        object.__setattr__(self, "allowed_formats", frozenset(f.upper() for f in self.allowed_formats))

    def for_source(self, source: str) -> "ImagePolicy":
        """The policy for a row read from catalog ``source`` (its file name): its folder as the root."""
        if self.root is not None or not self.source_roots:
            return self
        root = dict(self.source_roots).get(source)
        return replace(self, root=root, source_roots=()) if root is not None else self


class ImageError(ValueError):
    """An image reference that could not be turned into a picture.

    ``ref`` is the reference exactly as given, ``reason`` one of :data:`REASONS`, and the
    message names the reference and says what to do about it.
    """

    def __init__(self, ref: str, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        self.ref, self.reason, self.detail = ref, reason, detail
        super().__init__(f"image {ref!r}: {detail}")

    def __reduce__(self):  # keep it picklable for worker processes
        return type(self), (self.ref, self.reason, self.detail)


def _scheme(ref: str) -> str | None:
    match = _SCHEME.match(ref)
    return match.group(1).lower() if match else None


def _check_reference(ref: str, policy: ImagePolicy) -> bool:
    """Reject malformed references; return True for an http(s) URL that may be fetched."""
    if not isinstance(ref, str) or not ref.strip():
        raise ImageError(str(ref), "bad_reference", "empty reference; give a file path or leave the image out")
    if "\x00" in ref:
        raise ImageError(ref, "bad_reference", "contains a NUL byte; fix the catalog entry")
    scheme = _scheme(ref)
    if scheme in _REMOTE_SCHEMES:
        if not policy.allow_remote:
            raise ImageError(ref, "remote_refused", "remote images are disabled; download the file next to "
                             "the catalog, or opt in with ImagePolicy(allow_remote=True)")
        return True
    if scheme is not None:
        raise ImageError(ref, "bad_reference", f"unsupported scheme {scheme!r}: give a path relative to the "
                         "image root or an http(s) URL (write './name' if the file name contains ':')")
    return False


def _inside(path: Path, *roots: Path) -> bool:
    return any(path.is_relative_to(root) for root in roots)


def resolve_image_path(ref: str, policy: ImagePolicy) -> Path:
    """Map a local reference to the real path of an existing regular file, without reading it.

    Raises :class:`ImageError` for URLs and bad schemes, for paths that leave ``policy.root``
    lexically (``..``: "path_traversal"; absolute: "outside_root") or through a symlink at any
    level ("symlink_escape"), and for missing files or non-files.
    """
    if _check_reference(ref, policy):
        raise ImageError(ref, "bad_reference", "is a URL, not a local path; load it with load_image")
    given = Path(ref)
    if policy.root is None:
        if not given.is_absolute():
            raise ImageError(ref, "bad_reference", "relative path but no image root is set; "
                             "pass the folder the paths are relative to (--image-root)")
        return _regular_file(ref, Path(os.path.realpath(given)))
    root = Path(os.path.abspath(policy.root))
    real_root = Path(os.path.realpath(root))
    candidate = root / given  # an absolute `given` replaces the root here
    # Lexical check first: normpath folds '..' without touching the disk.
    if not _inside(Path(os.path.normpath(candidate)), root, real_root):
        if given.is_absolute():
            raise ImageError(ref, "outside_root", "absolute path outside the image root; "
                             "move the file under it or use a path relative to it")
        raise ImageError(ref, "path_traversal", "path leaves the image root through '..'; "
                         "keep image paths inside it")
    # realpath follows every symlink (and applies '..' after them, as the kernel would).
    real = Path(os.path.realpath(candidate))
    if not _inside(real, real_root):
        raise ImageError(ref, "symlink_escape", "path leaves the image root through a symlink; "
                         "copy the file into the root instead of linking it")
    return _regular_file(ref, real)


def _regular_file(ref: str, path: Path) -> Path:
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ImageError(ref, "missing", f"cannot open it ({exc.strerror}); "
                         "check the path and the image root") from None
    if not stat.S_ISREG(mode):
        raise ImageError(ref, "not_a_file", "not a regular file; point to an image file")
    return path


def _too_large(ref: str, size: str, policy: ImagePolicy) -> ImageError:
    return ImageError(ref, "too_large", f"{size} bytes, over the limit of {policy.max_bytes:,}; "
                      "shrink the image or raise max_bytes")


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows redirects to ftp:// too; a remote image may only redirect to http(s)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if _scheme(newurl) not in _REMOTE_SCHEMES:
            raise urllib.error.HTTPError(newurl, code, f"redirect to {newurl!r} refused", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch(url: str, policy: ImagePolicy) -> bytes:
    """Download at most ``max_bytes`` within ``remote_timeout_s`` seconds in total."""
    # A fresh opener per call so proxy settings are read from the environment each time.
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    request = urllib.request.Request(url, headers={"User-Agent": "mmllm-image-loader"})
    # The socket timeout bounds each read; the deadline stops a server that trickles bytes
    # (read1 returns what has arrived instead of waiting for a full chunk).
    deadline = time.monotonic() + policy.remote_timeout_s
    chunks: list[bytes] = []
    received = 0
    try:
        with opener.open(request, timeout=policy.remote_timeout_s) as response:
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > policy.max_bytes:
                raise _too_large(url, f"{int(length):,} (Content-Length)", policy)
            while received <= policy.max_bytes:
                chunk = response.read1(min(_CHUNK, policy.max_bytes + 1 - received))
                if not chunk:
                    break
                chunks.append(chunk)
                received += len(chunk)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"download took longer than {policy.remote_timeout_s} s")
    except ImageError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as exc:  # URLError/HTTPError are OSErrors
        if isinstance(exc, urllib.error.HTTPError):
            exc.close()  # it holds the open response (and its socket)
        raise ImageError(url, "remote_failed", f"download failed ({exc}); check the URL "
                         "or download the file manually") from None
    if received > policy.max_bytes:
        raise _too_large(url, f"more than {policy.max_bytes:,}", policy)
    return b"".join(chunks)


def load_image(ref: str, policy: ImagePolicy) -> Image.Image:
    """Load a catalog image reference (local path or, if allowed, http(s) URL) as RGB.

    Raises :class:`ImageError` for anything that is not a safe, complete, allowed image.
    """
    if _check_reference(ref, policy):
        return open_image_bytes(_fetch(ref, policy), ref, policy)
    path = resolve_image_path(ref, policy)
    try:
        size = path.stat().st_size
        if size > policy.max_bytes:
            raise _too_large(ref, f"{size:,}", policy)
        with path.open("rb") as file:
            # Read one byte past the limit in case the file grew since stat().
            data = file.read(policy.max_bytes + 1)
    except OSError as exc:
        raise ImageError(ref, "missing", f"cannot read it ({exc.strerror}); check its permissions") from None
    return open_image_bytes(data, ref, policy)


def open_image_bytes(data: bytes, name: str = "<bytes>", policy: ImagePolicy | None = None) -> Image.Image:
    """Decode encoded image bytes to a detached RGB image; ``name`` is used in error messages.

    Order matters: size, then the header (format and pixel count), and only then the
    pixel data, so refused images are never decoded.
    """
    policy = policy or ImagePolicy()
    if len(data) > policy.max_bytes:
        raise _too_large(name, f"{len(data):,}", policy)
    # PIL only warns below 2x its global pixel limit. Escalate that warning for this call
    # instead of changing PIL's globals, so other users of PIL keep their settings
    # (catch_warnings restores the process-wide filter list on exit).
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as img:
                _check_header(img, name, policy)
                try:
                    img.load()
                except (OSError, EOFError) as exc:
                    if isinstance(exc, EOFError) or "truncated" in str(exc):
                        raise ImageError(name, "truncated", f"image data is cut short ({exc}); "
                                         "re-download or re-export the file") from None
                    raise
                _check_header(img, name, policy)  # ICO/ICNS may switch to a bigger sub-image on load
                return _to_rgb(ImageOps.exif_transpose(img))
        except ImageError:
            raise
        except UnidentifiedImageError:
            raise ImageError(name, "unknown_format", f"not a recognised image ({len(data):,} bytes starting "
                             f"{data[:8]!r}); re-export it as JPEG or PNG") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(name, "bomb", f"{str(exc).rstrip('.')}; refused as a possible decompression "
                             "bomb, downscale the image") from None
        except Exception as exc:  # PIL plugins raise many types on malformed input (SyntaxError, struct.error...)
            raise ImageError(name, "corrupt", f"could not decode ({type(exc).__name__}: {exc}); "
                             "re-export the file") from None


def _check_header(img: Image.Image, name: str, policy: ImagePolicy) -> None:
    if img.format not in policy.allowed_formats:
        raise ImageError(name, "format_not_allowed", f"format {img.format} is not allowed "
                         f"({', '.join(sorted(policy.allowed_formats))}); convert it to JPEG or PNG")
    width, height = img.size
    if width * height > policy.max_pixels:
        raise ImageError(name, "bomb", f"{width}x{height} = {width * height:,} pixels, over the limit of "
                         f"{policy.max_pixels:,}; downscale the image or raise max_pixels")
    if max(width, height) >= MAX_ASPECT * max(1, min(width, height)):
        raise ImageError(name, "aspect", f"{width}x{height}: one side is {MAX_ASPECT} times the other or more, a strip "
                         "no vision processor reads (Qwen's refuses it and stops the batch); crop or pad the image")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any decoded mode to RGB; transparent areas become white, as on a product page."""
    if img.mode in _HIGH_DEPTH:
        img = _high_depth_to_l(img)
    elif img.mode == "LAB":  # PIL's plain convert() copies LAB channels as if they were RGB
        lab_to_srgb = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"),
                                              "LAB", "RGB")
        img = ImageCms.applyTransform(img, lab_to_srgb)
    if not img.has_transparency_data:  # also covers P/L/RGB with a "transparency" colour
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    canvas = Image.new("RGB", img.size, (255, 255, 255))
    canvas.paste(rgba, mask=rgba.getchannel("A"))
    return canvas


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer or float grey to 8 bits instead of clipping at 255."""
    floats = img.convert("F")
    if img.mode.startswith("I;16"):
        low, high = 0.0, 65535.0
    else:
        low, high = floats.getextrema()
        if img.mode == "I" and low >= 0 and high <= 255:
            low, high = 0.0, 255.0  # already 8-bit values in a 32-bit container
    scale = 255.0 / (high - low) if high > low else 1.0
    grey = floats.point(lambda v: (v - low) * scale).convert("L")
    # A tRNS colour names a 16-bit value; after scaling it would match the wrong pixels.
    grey.info.pop("transparency", None)
    return grey
