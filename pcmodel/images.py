"""Images <-> tensors: decoding untrusted bytes, colour modes, the model's preprocessing, sizes and tiles.

Training and the service both call these functions with the config stored in the checkpoint, so
the two flows prepare images identically. The order is fixed: decode -> colour mode (8-bit gray
or RGB) -> optional resize -> scale to the config's value range -> filter (DoG or whitening) and
normalisation over the whole image -> fit or tile.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from .config import ModelConfig, PreprocessConfig, has_whole_map_level, valid_sizes

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF")
DEFAULT_MAX_PIXELS = 25_000_000
ImageLike = Image.Image | np.ndarray


class ImageError(ValueError):
    """An image that cannot be used. `reason` is a short stable code (for metrics and HTTP status)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason  # bad_image | too_large | too_small | unsupported_format


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 1) -> Image.Image:
    """Open untrusted bytes as a PIL image without decoding any pixel: format, pixel count and sides checked.

    The bytes decide the format. The pixel count is checked from the header, so a decompression bomb
    costs nothing. `load` (or `decode`, which calls both) decodes the pixels.
    """
    if not data:
        raise ImageError("the image is empty (0 bytes)", "bad_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _over_pillows_limit(data, max_pixels) from None
    except UnidentifiedImageError:
        raise ImageError("the data is not an image in a recognised format", "bad_image") from None
    except Exception as exc:  # PIL raises many kinds on hostile headers
        raise ImageError(f"the image header cannot be read ({exc.__class__.__name__})", "bad_image") from None
    if image.format not in ACCEPTED_FORMATS:
        raise ImageError(
            f"image format {image.format} is not supported; send one of: {', '.join(ACCEPTED_FORMATS)}",
            "unsupported_format",
        )
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            f"the image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}", "too_large"
        )
    if min(width, height) < max(min_side, 1):
        raise ImageError(
            f"the image is {width}x{height}; each side must be at least {max(min_side, 1)} pixels", "too_small"
        )
    return image


def _over_pillows_limit(data: bytes, max_pixels: int) -> ImageError:
    """The too_large error for an image Pillow refused to open over its own decompression-bomb limit
    (Image.MAX_IMAGE_PIXELS), naming the size its header declares, as our own limit's error does."""
    size = header_size(data)
    if size is None:
        return ImageError(f"the image has more pixels than the limit of {max_pixels}", "too_large")
    width, height = size
    limit = max_pixels if width * height > max_pixels else Image.MAX_IMAGE_PIXELS  # ours, else Pillow's (lower)
    pixels = width * height
    return ImageError(f"the image is {width}x{height} = {pixels} pixels, over the limit of {limit}", "too_large")


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) that an image's header declares, or None where no format Pillow knows reads it; no pixel is
    decoded. Past Pillow's decompression-bomb limit too: Image.open refuses such an image without its size, so
    its header is read again by the format's own reader, which Image.open calls before that check."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                return image.size
    except Image.DecompressionBombError:
        pass
    except Exception:  # not an image, or a damaged header
        return None
    Image.init()
    prefix = data[:16]
    for kind in list(Image.ID):  # as Image.open tries the formats
        factory, accept = Image.OPEN[kind]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                found = not accept or accept(prefix)
                if not found or isinstance(found, str):
                    continue
                with factory(io.BytesIO(data), "") as image:
                    width, height = image.size
                    return width, height
        except (SyntaxError, IndexError, TypeError, struct.error):  # not this format: Image.open tries the next
            continue
        except Exception:  # this format's reader refused it
            return None
    return None


_TURNED = {5, 6, 7, 8}  # EXIF orientations that turn the image by 90 degrees: its sides swap


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image once `load` applies its EXIF orientation, from its header alone. A PNG's
    EXIF may follow its pixels (an eXIf, XMP or text chunk that Pillow reads only in `load`): `_png_info` reads
    those chunks without decoding a pixel."""
    width, height = image.size
    try:
        if image.format == "PNG":
            # Not image.getexif(): before `load` it decodes the pixels, or keeps an EXIF without the late chunks
            # (which `load` then turns by). Pillow's own reading of the `info` that `load` will leave.
            probe = Image.Image()
            probe.info = _png_info(image)
            exif = probe.getexif()
        else:
            exif = image.getexif()
        turned = exif.get(ExifTags.Base.Orientation, 1) in _TURNED
    except Exception:  # a malformed EXIF block: `load` says what is wrong, when it decodes
        turned = False
    return (height, width) if turned else (width, height)


# Chunks after a PNG's pixels that `load` reads into its `info` and that `getexif` uses (EXIF, text, XMP).
_PNG_METADATA = (b"eXIf", b"tEXt", b"zTXt", b"iTXt")
# The most chunks `_png_info` reads (about 0.3 s): a PNG of 100 MiB (the file limit) written in libpng's 8 KiB
# IDAT chunks has 12,800. Past them an orientation is not seen before decoding; `decoding.prepare` then still
# takes the size it scales from from the decoded image.
MAX_PNG_CHUNKS = 1 << 18
_CHUNK_HEAD = struct.Struct(">I4s")


def _png_info(image: Image.Image) -> dict:
    """An opened PNG's `info` as it will be once `load` has decoded it: also the metadata of the chunks after its
    first IDAT, which `load` reads once the pixels are decoded, read here from the file without decoding them.

    Chunks are found from their headers (their lengths skip the pixel data) and the metadata chunks parsed by
    Pillow's own PNG chunk reader, as `load` reads them: to IEND (an APNG: to the next frame), a damaged chunk
    header ending the list, at most MAX_PNG_CHUNKS chunks. A damaged metadata chunk ends it too; where it makes
    `load` fail, `load` says so. The file's read position is kept.
    """
    info = dict(image.info)
    fp = image.fp
    if fp is None:  # loaded: `info` is complete
        return info
    here = fp.tell()
    stream = PngImagePlugin.PngStream(fp)
    late = False
    position = 8  # after the signature
    try:
        for _ in range(MAX_PNG_CHUNKS):
            fp.seek(position)
            head = fp.read(8)
            if len(head) < 8 or not PngImagePlugin.is_cid(head[4:]):
                break  # as `load` stops at a damaged chunk header
            length, kind = _CHUNK_HEAD.unpack(head)
            if kind == b"IEND" or (late and kind == b"fcTL" and getattr(image, "is_animated", False)):
                break
            if kind in (b"IDAT", b"fdAT"):
                late = True
            elif late and kind in _PNG_METADATA:
                stream.call(kind, position + 8, length)
            position += 12 + length  # the length, the type, the data and the CRC
    except Exception:  # a damaged metadata chunk: what came before it counts
        pass
    finally:
        fp.seek(here)
    info.update(stream.im_info)
    return info


def load(image: Image.Image) -> Image.Image:
    """Decode an opened image's pixels (first frame) and apply its EXIF orientation."""
    try:
        image.seek(0)
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # not a copy: the pixels can be large
        return image
    except Exception as exc:  # truncated or corrupt pixel data
        raise ImageError(f"the image data is truncated or corrupt ({exc})", "bad_image") from None


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 1) -> Image.Image:
    """Decode untrusted bytes into a loaded PIL image (first frame, EXIF orientation applied)."""
    return load(open_image(data, max_pixels, min_side))


_INT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_8bit(image: Image.Image) -> Image.Image:
    """A 16/32-bit integer or float gray image as 8-bit "L", scaled as `to_uint8` does, a band of rows at a time.

    Images in other modes come back as they are.
    """
    if image.mode not in _INT_MODES and image.mode != "F":
        return image
    width, height = image.size
    top = None
    if image.mode != "F":
        top = 65535.0 if image.mode.startswith("I;16") or (image.getextrema()[1] or 0) > 255 else 255.0
    out = np.empty((height, width), dtype=np.uint8)
    step = max(1, (1 << 20) // width)  # ~1 M pixels per band: a few MB of float64 at a time
    for top_row in range(0, height, step):
        band = np.asarray(image.crop((0, top_row, width, min(height, top_row + step))))
        if top is None:
            out[top_row : top_row + step] = _array_to_uint8(band)
        else:
            out[top_row : top_row + step] = np.clip(np.round(band.astype(np.float64) / top * 255), 0, 255)
    return Image.fromarray(out)


def sample_photo() -> np.ndarray:
    """The bundled photo, for examples and `pc-encode` without an image: (256, 256, 3) uint8 RGB.

    NASA astronaut Eileen Collins: a NASA photo in the public domain, as scikit-image ships it
    (`skimage.data.astronaut()`), resized to 256x256 (pcmodel/data/README.md).
    """
    data = resources.files("pcmodel").joinpath("data", "astronaut.jpg").read_bytes()
    return to_uint8(decode(data), "rgb")


def to_uint8(image: ImageLike, color: str) -> np.ndarray:
    """Any PIL image or array as an 8-bit (H, W) gray or (H, W, 3) RGB array.

    16-bit and 32-bit integer images are scaled (not clipped) to 8 bits; float arrays are taken
    as [0, 1]; alpha is composited onto white; palette, CMYK and other modes are converted. A uint8 array
    already in the asked layout ((H, W) gray, (H, W, 3) RGB) is returned as it is (not copied).
    """
    if isinstance(image, np.ndarray):
        array = _array_to_uint8(image)
        if array.ndim == (2 if color == "gray" else 3) and (array.ndim == 2 or array.shape[2] == 3):
            return array  # already the result: no round trip through PIL (two copies of the pixels)
        image = Image.fromarray(array)
    image = to_8bit(image)
    if image.mode in _PREMULTIPLIED:  # Pillow converts these to their plain form only
        image = image.convert(_PREMULTIPLIED[image.mode])
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    target = "L" if color == "gray" else "RGB"
    if image.mode == "LAB" and target == "L":  # Pillow converts LAB to RGB only
        image = image.convert("RGB")
    return np.asarray(image.convert(target), dtype=np.uint8)


_PREMULTIPLIED = {"La": "LA", "RGBa": "RGBA"}


def _array_to_uint8(array: np.ndarray) -> np.ndarray:
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ImageError(
            f"an image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {array.shape}", "bad_image"
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype == np.uint16:
        return np.round(array / 257.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageError("the image array contains NaN or Inf", "bad_image")
        return np.round(np.clip(array, 0.0, 1.0) * 255).astype(np.uint8)
    raise ImageError(f"image arrays must be uint8, uint16 or float in [0, 1], got {array.dtype}", "bad_image")


def to_tensor(array: np.ndarray, config: PreprocessConfig) -> torch.Tensor:
    """An 8-bit array (H, W) or (H, W, 3) as a float tensor (C, H, W) in the config's value range."""
    planes = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)  # (C, H, W) view
    t = torch.empty(planes.shape, dtype=torch.float32)
    t.numpy()[...] = planes  # one pass from uint8 to float32 in channel order (PIL arrays are read-only)
    lo, hi = config.value_range
    return t.mul_((hi - lo) / 255.0).add_(lo)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    mode = "reflect" if min(x.shape[-2:]) > radius else "replicate"
    x = F.pad(x, (radius, radius, radius, radius), mode=mode)
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _whiten(x: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Olshausen & Field's whitening: amplitude filter f * exp(-(f / cutoff)^4) in cycles/pixel."""
    h, w = x.shape[-2:]
    fy = torch.fft.fftfreq(h, dtype=x.dtype, device=x.device).view(-1, 1)
    fx = torch.fft.rfftfreq(w, dtype=x.dtype, device=x.device).view(1, -1)
    f = torch.sqrt(fy**2 + fx**2)
    response = f * torch.exp(-((f / cutoff) ** 4))
    return torch.fft.irfft2(torch.fft.rfft2(x) * response, s=(h, w))


def filter_images(x: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """The retina/LGN stage on whole images (B, C, H, W): DoG or whitening, then normalisation and gain."""
    if config.filter == "dog":
        centre, surround = config.dog_sigmas
        x = _gaussian_blur(x, centre) - _gaussian_blur(x, surround)
    elif config.filter == "whiten":
        x = _whiten(x, config.whiten_cutoff)
    if config.normalize == "image_std":
        # A floor on the std keeps a blank image blank instead of blowing rounding noise up to unit size.
        floor = 1e-3 * (config.value_range[1] - config.value_range[0])
        std = x.flatten(1).std(dim=1, unbiased=False).clamp_min(floor)
        x = x / std.view(-1, 1, 1, 1)
    return x * config.gain if config.gain != 1.0 else x


def preprocess(
    images: ImageLike | Sequence[ImageLike], config: ModelConfig, size: tuple[int, int] | None = None
) -> torch.Tensor:
    """PIL images or uint8 arrays -> the model's input x (B, C, H, W), float32.

    `size` (H, W) resizes each image first (bicubic, antialiased); without it all images must
    have the same size. The filter and normalisation run on each whole image.
    """
    if isinstance(images, (Image.Image, np.ndarray)):
        images = [images]
    if len(images) == 0:
        raise ValueError("no images to preprocess")
    pre = config.preprocess
    tensors = []
    for image in images:
        array = to_uint8(image, pre.color)
        if size is not None and array.shape[:2] != tuple(size):
            resized = Image.fromarray(array).resize((size[1], size[0]), Image.Resampling.BICUBIC)
            array = np.asarray(resized, dtype=np.uint8)
        tensors.append(to_tensor(array, pre))
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise ValueError(f"images have different sizes {sorted(shapes)}; pass size=(H, W) to resize them")
    return filter_images(tensors[0][None] if len(tensors) == 1 else torch.stack(tensors), pre)


# ---- sizes: fitting a convolutional hierarchy, and tiling -------------------------------------


@dataclass(frozen=True)
class Fit:
    """How an image of `original` size was padded (> 0) or cropped (< 0) to a size the model tiles.

    Amounts are (top, bottom, left, right) in pixels; `undo` maps an output back to the original grid.
    """

    original: tuple[int, int]
    fitted: tuple[int, int]
    top: int
    bottom: int
    left: int
    right: int

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return _pad_or_crop(x, self.top, self.bottom, self.left, self.right)

    def undo(self, x: torch.Tensor) -> torch.Tensor:
        """Back to the original size: padding is cut off; cropped borders come back as zeros."""
        return _pad_or_crop(x, -self.top, -self.bottom, -self.left, -self.right, mode="constant")


def _pad_or_crop(x: torch.Tensor, top: int, bottom: int, left: int, right: int, mode: str = "reflect") -> torch.Tensor:
    h, w = x.shape[-2:]
    x = x[..., max(-top, 0) : h - max(-bottom, 0), max(-left, 0) : w - max(-right, 0)]
    pads = (max(left, 0), max(right, 0), max(top, 0), max(bottom, 0))
    if any(pads):
        if mode == "reflect" and (max(pads[2:]) >= x.shape[-2] or max(pads[:2]) >= x.shape[-1]):
            mode = "replicate"  # reflect needs the pad to be smaller than the image
        x = F.pad(x, pads, mode=mode)
    return x


def _nearest(n: int, first: int, period: int, policy: str) -> int:
    if period == 0 or n <= first:
        return first
    below = first + (n - first) // period * period
    above = below if below == n else below + period
    if policy == "pad":
        return above
    if policy == "crop":
        return below
    return below if n - below <= above - n else above


def fit_size(config: ModelConfig, height: int, width: int, policy: str = "pad") -> tuple[int, int]:
    """The size the hierarchy tiles exactly nearest to (height, width).

    policy: pad (next size up, nothing is lost), crop (next size down) or nearest (either; ties pad).
    Models with a dense level take their native size only.
    """
    if policy not in ("pad", "crop", "nearest"):
        raise ValueError(f"unknown fit policy {policy!r}; choose pad, crop or nearest")
    (fh, ph), (fw, pw) = valid_sizes(config)
    return _nearest(height, fh, ph, policy), _nearest(width, fw, pw, policy)


def fit(x: torch.Tensor, config: ModelConfig, policy: str = "pad") -> tuple[torch.Tensor, Fit]:
    """Pad (reflect) or crop x (B, C, H, W) symmetrically to the nearest size the model tiles."""
    h, w = x.shape[-2:]
    th, tw = fit_size(config, h, w, policy)
    dh, dw = th - h, tw - w
    record = Fit((h, w), (th, tw), dh // 2, dh - dh // 2, dw // 2, dw - dw // 2)
    return record.apply(x), record


@dataclass(frozen=True)
class TileGrid:
    """Tiles of `tile` size every `stride` pixels covering an image; the first tile starts at -`margin`.

    With stride = tile the tiles do not overlap and the margin is 0 (padding at the bottom and right
    only). With stride < tile the image is padded (reflect) by margin = tile - stride on every side, so
    each pixel of the image lies inside several tiles, away from the edges of at least one of them;
    `stitch` blends the tiles' outputs with a smooth window (`tile_window`): sum(w * out) / sum(w).
    """

    original: tuple[int, int]
    tile: tuple[int, int]
    rows: int
    cols: int
    stride: tuple[int, int]

    @property
    def margin(self) -> tuple[int, int]:
        return self.tile[0] - self.stride[0], self.tile[1] - self.stride[1]

    @property
    def padded(self) -> tuple[int, int]:
        """(H, W) of the padded image the tiles cover exactly."""
        return (
            (self.rows - 1) * self.stride[0] + self.tile[0],
            (self.cols - 1) * self.stride[1] + self.tile[1],
        )

    def stitch(self, tiles: torch.Tensor) -> torch.Tensor:
        """Tiles (rows*cols, C, th, tw), row-major -> (1, C, H, W) at the original size, overlaps blended."""
        n, c, th, tw = tiles.shape
        assert n == self.rows * self.cols and (th, tw) == self.tile, "tiles do not match the grid"
        (mh, mw), (h, w) = self.margin, self.original
        if (mh, mw) == (0, 0):  # no overlap: each pixel comes from one tile, exactly
            grid = tiles.reshape(self.rows, self.cols, c, th, tw).permute(2, 0, 3, 1, 4)
            full = grid.reshape(1, c, self.rows * th, self.cols * tw)
            return full[..., :h, :w]
        window = tile_window(self.tile, self.stride).to(tiles)  # (th, tw)
        columns = (tiles * window).reshape(1, n, c * th * tw).transpose(1, 2)  # (1, C*th*tw, n)
        kwargs = {"output_size": self.padded, "kernel_size": self.tile, "stride": self.stride}
        total = F.fold(columns, **kwargs)  # (1, C, Hp, Wp): sum of w * out
        weight = F.fold(window.reshape(1, th * tw, 1).expand(1, th * tw, n), **kwargs)  # (1, 1, Hp, Wp)
        return (total / weight)[..., mh : mh + h, mw : mw + w]


def tile_window(tile_hw: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """The blending weight of one tile (th, tw): a separable periodic Hann window where tiles overlap.

    w(y) = 1/2 - 1/2 cos(2 pi y / th). At stride = th/2 the shifted windows sum to exactly 1 (a
    partition of unity), so a pixel's output moves smoothly from one tile to the next and the tile
    edges, where a tile sees least of its neighbourhood, weigh least. An axis without overlap gets 1.
    """
    axes = []
    for n, s in zip(tile_hw, stride):
        if s >= n:
            axes.append(torch.ones(n, dtype=torch.float64))
        else:
            axes.append(0.5 - 0.5 * torch.cos(2 * math.pi * torch.arange(n, dtype=torch.float64) / n))
    return (axes[0][:, None] * axes[1][None, :]).to(torch.float32)


def tile_layout(height: int, width: int, tile_hw: tuple[int, int], stride: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of tiles with this stride that cover an image, with a margin of tile - stride on each side."""
    counts = []
    for n, t, s in zip((height, width), tile_hw, stride):
        extent = n + 2 * (t - s)  # the image and its margins
        counts.append(1 if extent <= t else math.ceil((extent - t) / s) + 1)
    return counts[0], counts[1]


def tile(
    x: torch.Tensor, tile_hw: tuple[int, int], stride: tuple[int, int] | None = None
) -> tuple[torch.Tensor, TileGrid]:
    """Cover one image x (1, C, H, W) with tiles of tile_hw every `stride` pixels (default: no overlap).

    Returns (rows*cols, C, th, tw), row-major, and the grid. Padding is reflected (replicated where the
    image is smaller than the pad).
    """
    if x.shape[0] != 1:
        raise ValueError(f"tile takes one image (1, C, H, W), got batch {x.shape[0]}")
    stride = tuple(tile_hw) if stride is None else tuple(stride)
    if not all(0 < s <= t for s, t in zip(stride, tile_hw)):
        raise ValueError(f"a tile stride must be from 1 to the tile size {tile_hw}, got {stride}")
    h, w = x.shape[-2:]
    rows, cols = tile_layout(h, w, tile_hw, stride)  # type: ignore[arg-type]
    grid = TileGrid((h, w), tuple(tile_hw), rows, cols, stride)  # type: ignore[arg-type]
    (mh, mw), (ph, pw) = grid.margin, grid.padded
    padded = _pad_or_crop(x, mh, ph - h - mh, mw, pw - w - mw)  # (1, C, Hp, Wp)
    c, (th, tw) = x.shape[1], tile_hw
    columns = F.unfold(padded, kernel_size=tile_hw, stride=stride)  # (1, C*th*tw, rows*cols), row-major
    tiles = columns[0].transpose(0, 1).reshape(rows * cols, c, th, tw)
    return tiles, grid


def tile_stride(config: ModelConfig) -> tuple[int, int]:
    """The stride of tile mode: half the native size (each pixel in two tiles per axis, blended)."""
    th, tw = config.input_shape[1:]
    return max(1, th // 2), max(1, tw // 2)


def tile_count(config: ModelConfig, height: int, width: int) -> int:
    """Native-size tiles, overlapping as tile mode runs them, that cover an image of this size."""
    rows, cols = tile_layout(height, width, config.input_shape[1:], tile_stride(config))
    return rows * cols


DEFAULT_FULL_MAX_SIDE = 256


# Three buckets: with the native size they are the four shapes a model prepares (MAX_PREPARED_SHAPES).
FULL_BUCKETS = 3


def full_buckets(
    config: ModelConfig, max_side: int = DEFAULT_FULL_MAX_SIDE, count: int = FULL_BUCKETS
) -> list[tuple[int, int]]:
    """The padded sizes of full mode: `count` squares at k/count of max_side (k = 1..count), each rounded
    up to a size the hierarchy tiles, smallest first (duplicates dropped).

    Few sizes keep batching (requests of one size share a model call) and the fast backends' prepared
    shapes bounded; the service warms them at start-up.
    """
    if has_whole_map_level(config):
        raise ValueError(f"model {config.name} has a dense level, which takes its native size only: no full mode")
    sides = [math.ceil(max_side * k / count) for k in range(1, count + 1)]
    return sorted({fit_size(config, side, side) for side in sides})


def full_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """The size full mode scales an image to: the aspect ratio kept, the longer side at most max_side,
    never enlarged."""
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def bucket_for(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The smallest bucket that holds (height, width); the largest bucket if none does."""
    for bh, bw in buckets:
        if bh >= height and bw >= width:
            return bh, bw
    return buckets[-1]


@dataclass(frozen=True)
class Placement:
    """How one preprocessed image became the model's rows, and how outputs go back onto its grid.

    mode: resize (one row at the native size), tile (native-size tiles, `grid`), fit (one row padded
    or cropped to a size the hierarchy tiles, `fit`) or full (scaled to at most max_side, then padded to
    a bucket size, `fit`). `restore` maps the rows' maps (n, C, h, w) back to (1, C, H, W) on the grid
    of the preprocessed image.
    """

    mode: str
    grid: TileGrid | None = None
    fit: Fit | None = None

    def restore(self, maps: torch.Tensor) -> torch.Tensor:
        if self.grid is not None:
            return self.grid.stitch(maps)
        if self.fit is not None:
            return self.fit.undo(maps)
        return maps


PLACEMENTS = ("resize", "tile", "fit", "full")


def place(x: torch.Tensor, config: ModelConfig, mode: str) -> tuple[torch.Tensor, Placement]:
    """Rows the model runs for one preprocessed image x (1, C, H, W): its tiles (tile) or x fitted (fit).

    Tiles overlap by half (tile_stride) and are blended back. Models with a dense level take only their
    native size, so `fit` tiles them.
    """
    if mode == "tile" or (mode == "fit" and has_whole_map_level(config)):
        rows, grid = tile(x, config.input_shape[1:], tile_stride(config))
        return rows, Placement("tile", grid=grid)
    if mode == "fit":
        rows, record = fit(x, config)
        return rows, Placement("fit", fit=record)
    raise ValueError(f"place takes mode tile or fit, got {mode!r} (resize and full scale before preprocessing)")


def _pad_to(x: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, Fit]:
    """Pad x (B, C, h, w) symmetrically (reflect) to `size`."""
    h, w = x.shape[-2:]
    dh, dw = size[0] - h, size[1] - w
    assert dh >= 0 and dw >= 0, "a bucket holds the image"
    record = Fit((h, w), tuple(size), dh // 2, dh - dh // 2, dw // 2, dw - dw // 2)  # type: ignore[arg-type]
    return record.apply(x), record


def prepare_image(
    image: ImageLike, config: ModelConfig, mode: str, max_side: int = DEFAULT_FULL_MAX_SIDE
) -> tuple[torch.Tensor, torch.Tensor, Placement]:
    """One image as the model takes it: (rows (n, C, h, w), the preprocessed image (C, H, W), placement).

    resize: the image resized to the native size before preprocessing (n = 1). tile and fit: the whole
    image preprocessed (filters see all of it, as in training), then `place`d. full (convolutional
    models): the image scaled so that its longer side is at most `max_side` (aspect ratio kept, never
    enlarged), preprocessed whole, then padded (reflect) to the smallest of `full_buckets` that holds it:
    one row, cropped back by `placement.fit.undo`.
    """
    if mode not in PLACEMENTS:
        raise ValueError(f"unknown size mode {mode!r}; choose one of: {', '.join(PLACEMENTS)}")
    if mode == "resize":
        x = preprocess([image], config, size=config.input_shape[1:])
        return x, x[0], Placement("resize")
    if mode == "full":
        buckets = full_buckets(config, max_side)  # raises for a model with a dense level
        array = to_uint8(image, config.preprocess.color)
        x = preprocess([array], config, size=full_size(*array.shape[:2], max_side))
        rows, record = _pad_to(x, bucket_for(*x.shape[-2:], buckets))
        return rows, x[0], Placement("full", fit=record)
    x = preprocess([image], config)
    rows, placement = place(x, config, mode)
    return rows, x[0], placement


# ---- display -----------------------------------------------------------------------------------


def display_scale(x: torch.Tensor, config: PreprocessConfig) -> float:
    """Half-width of the value interval shown as black..white around mid-grey for this input.

    Unfiltered inputs live in the config's value range; filtered ones are shown up to their largest
    magnitude. Error maps use the input's scale so their contrast compares with the input's.
    """
    if config.filter == "none" and config.normalize == "none":
        return (config.value_range[1] - config.value_range[0]) / 2
    return max(float(x.abs().max()), 1e-12)


def display_pixels(x: torch.Tensor, config: PreprocessConfig, scale: float, centred: bool) -> np.ndarray:
    """A (C, H, W) map as 8-bit pixels for viewing: (H, W, 3) RGB or (H, W) gray uint8.

    centred=False maps the config's value range (unfiltered inputs and reconstructions) to 0..255;
    centred=True maps [-scale, scale] to 0..255 with zero at mid-grey (filtered inputs, errors).
    """
    a = x.detach().to("cpu", torch.float32).numpy()
    if centred:
        gain, offset = 127.5 / scale, 127.5
    else:
        lo, hi = config.value_range
        gain = 255.0 / (hi - lo)
        offset = -lo * gain
    # One float buffer in pixel order (H, W, C), written in place: 0.26 against 0.41 ms for a 256 px RGB
    # map as four temporaries and a PIL image. numpy, not torch: torch.round on a small map can wake the
    # intra-op thread pool, which costs milliseconds on a busy machine (seen in the service); np.rint
    # rounds half to even the same way.
    y = np.empty((a.shape[1], a.shape[2], a.shape[0]), dtype=np.float32)
    np.multiply(a.transpose(1, 2, 0), np.float32(gain), out=y)
    y += np.float32(offset)
    np.clip(y, 0, 255, out=y)
    np.rint(y, out=y)
    pixels = y.astype(np.uint8)
    return pixels[:, :, 0] if pixels.shape[2] == 1 else pixels


def to_display(x: torch.Tensor, config: PreprocessConfig, scale: float, centred: bool) -> Image.Image:
    """A (C, H, W) map as an 8-bit PIL image for viewing (`display_pixels`)."""
    return Image.fromarray(display_pixels(x, config, scale, centred))


def display_maps(
    x: torch.Tensor, reconstruction: torch.Tensor, error: torch.Tensor, config: PreprocessConfig
) -> tuple[Image.Image, Image.Image, Image.Image]:
    """Input, reconstruction and error (each (C, H, W)) as PIL images on one shared scale."""
    scale = display_scale(x, config)
    centred = not (config.filter == "none" and config.normalize == "none")
    return (
        to_display(x, config, scale, centred),
        to_display(reconstruction, config, scale, centred),
        to_display(error, config, scale, True),
    )


def montage(pictures: Sequence[Image.Image], min_side: int = 256, gap: int = 4) -> Image.Image:
    """Pictures of one size side by side, each enlarged (nearest neighbour, an integer factor) until its
    shorter side is at least `min_side` pixels, with `gap` white pixels between them: a view at a size
    one can read, every model pixel a sharp square."""
    width, height = pictures[0].size
    assert all(p.size == (width, height) for p in pictures), "montage takes pictures of one size"
    factor = max(1, math.ceil(min_side / min(width, height)))
    mode = "RGB" if any(p.mode != "L" for p in pictures) else "L"
    w, h = width * factor, height * factor
    sheet = Image.new(mode, (len(pictures) * w + (len(pictures) - 1) * gap, h), "white")
    for i, picture in enumerate(pictures):
        sheet.paste(picture.convert(mode).resize((w, h), Image.Resampling.NEAREST), (i * (w + gap), 0))
    return sheet
