"""The paper's slice transform (8-bit min–max, zero-pad, LANCZOS resize, centre pad) and its inverse.

Forward, per coronal slice of shape (h, w) with pixel spacing (row_mm, col_mm):

1. min–max scaling of the slice to uint8 (a constant slice becomes all zeros);
2. zero-padding, centred, to a canvas of shape (ph, pw) whose *physical* extent is square
   (ph·row_mm ≈ pw·col_mm). We keep the physical aspect rather than the matrix aspect so that
   anisotropic coronal pixels (e.g. 1.2 mm slice spacing × 0.5 mm in-plane) become square at the
   model input; with spacing (1, 1) this is the plain matrix aspect, as in the paper;
3. LANCZOS resize (PIL) of the canvas to fit inside size × size, keeping its physical aspect:
   (rh, rw), one of them equal to `size`;
4. centring by zero-padding to size × size at offsets (oy, ox) (non-zero only where rounding the
   canvas to whole pixels left the resized canvas a pixel or two short of square).

Masks go forward by nearest neighbour and come back by sampling the model pixel that contains each
source pixel centre, both in exact integer arithmetic.

Exactness rule: the round trip mask → model → mask is the identity whenever the canvas is
upsampled along both axes (rh ≥ ph and rw ≥ pw, `SliceTransform.invertible`), i.e. whenever the
physically square canvas is at most `size` pixels along each axis. Otherwise the transform still
works (the model sees a downsampled slice and masks come back at source resolution by nearest
sampling) but thin structures may be lost; pass `require_exact=True` to refuse such a plan.

2.5D inputs (context K, odd): a slice's input is the window of K adjacent coronal slices of its stack,
itself in the middle, the edge slice repeated past the stack's ends (`context_windows`); the slices are
the K channels (`model_input`). Training samples and the node's predictor build windows by this one rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

#: The paper's model input size.
DEFAULT_SIZE = 256


class SliceTransformError(ValueError):
    """A slice shape, spacing or size that cannot be transformed, or an array of the wrong shape."""


@dataclass(frozen=True)
class SliceTransform:
    """Everything needed to take one slice to model space and back."""

    source_shape: tuple[int, int]  # (h, w)
    spacing: tuple[float, float]  # (row_mm, col_mm)
    padded_shape: tuple[int, int]  # (ph, pw): the physically square canvas
    pad_offsets: tuple[int, int]  # (top, left) of the slice inside the canvas
    resized_shape: tuple[int, int]  # (rh, rw): the canvas after LANCZOS
    offsets: tuple[int, int]  # (top, left) of the resized canvas in the output
    size: int  # output is size × size

    @property
    def invertible(self) -> bool:
        """True when a mask survives the round trip unchanged (both axes upsampled)."""
        return self.resized_shape[0] >= self.padded_shape[0] and self.resized_shape[1] >= self.padded_shape[1]

    def model_rows(self) -> np.ndarray:
        """For each output row: the source row it shows, or -1 (padding). Nearest neighbour."""
        return _forward_map(self.size, self.offsets[0], self.resized_shape[0], self.padded_shape[0],
                            self.pad_offsets[0], self.source_shape[0])

    def model_cols(self) -> np.ndarray:
        """For each output column: the source column it shows, or -1 (padding)."""
        return _forward_map(self.size, self.offsets[1], self.resized_shape[1], self.padded_shape[1],
                            self.pad_offsets[1], self.source_shape[1])

    def source_rows(self) -> np.ndarray:
        """For each source row: the output row that contains its centre."""
        return _backward_map(self.source_shape[0], self.pad_offsets[0], self.padded_shape[0],
                             self.resized_shape[0], self.offsets[0])

    def source_cols(self) -> np.ndarray:
        """For each source column: the output column that contains its centre."""
        return _backward_map(self.source_shape[1], self.pad_offsets[1], self.padded_shape[1],
                             self.resized_shape[1], self.offsets[1])


def _forward_map(size: int, offset: int, resized: int, padded: int, pad: int, n: int) -> np.ndarray:
    out = np.arange(size, dtype=np.int64) - offset
    # output pixel centre (i + 0.5) maps to canvas coordinate (i + 0.5) * padded / resized
    canvas = ((2 * out + 1) * padded) // (2 * resized)
    src = canvas - pad
    valid = (out >= 0) & (out < resized) & (src >= 0) & (src < n)
    return np.where(valid, src, -1)


def _backward_map(n: int, pad: int, padded: int, resized: int, offset: int) -> np.ndarray:
    canvas = np.arange(n, dtype=np.int64) + pad
    # source pixel centre (p + 0.5) maps to resized coordinate (p + 0.5) * resized / padded
    return offset + ((2 * canvas + 1) * resized) // (2 * padded)


def plan_slice_transform(
    shape: tuple[int, int],
    spacing: tuple[float, float] = (1.0, 1.0),
    size: int = DEFAULT_SIZE,
    *,
    require_exact: bool = False,
) -> SliceTransform:
    """Plan the four steps for one slice shape and pixel spacing (row_mm, col_mm)."""
    h, w = (int(v) for v in shape)
    row_mm, col_mm = (float(v) for v in spacing)
    if h < 1 or w < 1:
        raise SliceTransformError(f"slice shape must be positive, got {tuple(shape)}")
    if not (np.isfinite(row_mm) and np.isfinite(col_mm) and row_mm > 0 and col_mm > 0):
        raise SliceTransformError(f"pixel spacing must be positive and finite, got {tuple(spacing)}")
    if int(size) < 1:
        raise SliceTransformError(f"size must be positive, got {size}")
    size = int(size)
    extent = max(h * row_mm, w * col_mm)
    ph = max(h, int(round(extent / row_mm)))
    pw = max(w, int(round(extent / col_mm)))
    scale = size / max(ph * row_mm, pw * col_mm)  # output pixels per mm
    rh = min(size, max(1, int(round(ph * row_mm * scale))))
    rw = min(size, max(1, int(round(pw * col_mm * scale))))
    t = SliceTransform(
        source_shape=(h, w),
        spacing=(row_mm, col_mm),
        padded_shape=(ph, pw),
        pad_offsets=((ph - h) // 2, (pw - w) // 2),
        resized_shape=(rh, rw),
        offsets=((size - rh) // 2, (size - rw) // 2),
        size=size,
    )
    if require_exact and not t.invertible:
        raise SliceTransformError(
            f"slice {h}x{w} at {row_mm:g}x{col_mm:g} mm needs a {ph}x{pw} canvas, larger than the "
            f"model input {size}x{size}: masks would not map back exactly; crop smaller or raise size"
        )
    return t


def _check_shape(array: np.ndarray, expected: tuple[int, int], what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.shape != tuple(expected):
        raise SliceTransformError(f"{what} must have shape {tuple(expected)}, got {array.shape}")
    return array


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Min–max scale one slice to 0..255 (rounded); a constant or empty-range slice gives zeros."""
    img = np.asarray(image, dtype=np.float64)
    if not np.all(np.isfinite(img)):
        raise SliceTransformError("slice contains NaN or infinite values")
    lo, hi = (float(img.min()), float(img.max())) if img.size else (0.0, 0.0)
    if hi <= lo:
        return np.zeros(img.shape, dtype=np.uint8)
    return np.rint((img - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def pad_to_canvas(image_u8: np.ndarray, t: SliceTransform) -> np.ndarray:
    """Step 2: centre the 8-bit slice in the zero canvas of shape `t.padded_shape`."""
    image_u8 = _check_shape(image_u8, t.source_shape, "slice")
    canvas = np.zeros(t.padded_shape, dtype=image_u8.dtype)
    top, left = t.pad_offsets
    canvas[top : top + t.source_shape[0], left : left + t.source_shape[1]] = image_u8
    return canvas


def image_to_model(image: np.ndarray, t: SliceTransform) -> np.ndarray:
    """The full forward image transform: uint8 (size, size)."""
    canvas = pad_to_canvas(to_uint8(_check_shape(image, t.source_shape, "slice")), t)
    rh, rw = t.resized_shape
    resized = np.asarray(Image.fromarray(canvas, mode="L").resize((rw, rh), Image.Resampling.LANCZOS))
    out = np.zeros((t.size, t.size), dtype=np.uint8)
    oy, ox = t.offsets
    out[oy : oy + rh, ox : ox + rw] = resized
    return out


def mask_to_model(mask: np.ndarray, t: SliceTransform) -> np.ndarray:
    """A source-space mask in model space (nearest neighbour): bool (size, size)."""
    mask = _check_shape(mask, t.source_shape, "mask").astype(bool)
    rows, cols = t.model_rows(), t.model_cols()
    out = mask[np.clip(rows, 0, None)[:, None], np.clip(cols, 0, None)[None, :]]
    out &= (rows >= 0)[:, None] & (cols >= 0)[None, :]
    return out


def mask_from_model(mask: np.ndarray, t: SliceTransform) -> np.ndarray:
    """A model-space mask back at source resolution: bool (h, w), sampled at source pixel centres."""
    mask = _check_shape(mask, (t.size, t.size), "model mask").astype(bool)
    return mask[t.source_rows()[:, None], t.source_cols()[None, :]]


def probabilities_from_model(prob: np.ndarray, t: SliceTransform) -> np.ndarray:
    """Model-space probabilities back at source resolution: float32 (h, w), sampled like masks."""
    prob = _check_shape(prob, (t.size, t.size), "model probabilities")
    return np.asarray(prob[t.source_rows()[:, None], t.source_cols()[None, :]], dtype=np.float32)


def check_context(context: int) -> int:
    """`context` (adjacent coronal slices fed as channels) if it is a positive odd integer; else an error."""
    if isinstance(context, bool) or not isinstance(context, int) or context < 1 or context % 2 == 0:
        raise SliceTransformError(f"context must be a positive odd number of slices (1, 3, 5...), got {context!r}")
    return context


def context_windows(n: int, context: int, centres: np.ndarray | None = None) -> np.ndarray:
    """Indices int64 (len(centres), context): each centre slice's window in a stack of `n` coronal slices.

    The window is the `context` adjacent slices of the stack with the centre slice in the middle (the
    slice predicted); past either end of the stack the edge slice is repeated. `centres` default to every
    slice. This is the one rule by which training samples and the node's predictor build 2.5D inputs.
    """
    half = check_context(context) // 2
    if n < 1:
        raise SliceTransformError(f"a stack needs at least one slice, got {n}")
    centres = np.arange(n, dtype=np.int64) if centres is None else np.asarray(centres, dtype=np.int64)
    if centres.size and (centres.min() < 0 or centres.max() >= n):
        raise SliceTransformError(f"centre slices must lie in 0..{n - 1}, got {centres.min()}..{centres.max()}")
    return np.clip(centres[:, None] + np.arange(-half, half + 1, dtype=np.int64)[None, :], 0, n - 1)


def model_input(images_u8: np.ndarray, in_channels: int, context: int = 1) -> np.ndarray:
    """uint8 slices as float32 in [0, 1] with a channel axis: what the network is fed.

    Context 1: slices (..., H, W) become (..., C, H, W), grey replicated to `in_channels` (1, or 3 for
    an ImageNet-style first layer). Context K > 1: windows (..., K, H, W) of K adjacent slices
    (`context_windows`) are the K channels as they are, so `in_channels` must be K.
    """
    images = np.asarray(images_u8)
    if images.dtype != np.uint8:
        raise SliceTransformError(f"model_input expects uint8 slices, got {images.dtype}")
    if check_context(context) > 1:
        if images.ndim < 3 or images.shape[-3] != context or in_channels != context:
            raise SliceTransformError(f"context {context}: expected windows (..., {context}, H, W) and "
                                      f"{context} in_channels, got shape {images.shape} and {in_channels}")
        return images.astype(np.float32) / np.float32(255.0)
    if images.ndim < 2:
        raise SliceTransformError(f"model_input expects (..., H, W), got shape {images.shape}")
    if in_channels not in (1, 3):
        raise SliceTransformError(f"in_channels must be 1 or 3 for single slices, got {in_channels}")
    scaled = images.astype(np.float32) / np.float32(255.0)
    return np.repeat(scaled[..., None, :, :], in_channels, axis=-3)
