"""MR acquisition effects for the phantom: point-spread blur, bias field, metal, motion ghosts, Rician noise.

Each is a pure function of arrays and explicit parameters (no randomness inside except through the
`numpy.random.Generator` passed in), so a patient's image is a deterministic function of its seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


def point_spread(image: np.ndarray, spacing: tuple[float, float, float], fwhm_mm: float) -> np.ndarray:
    """Gaussian blur with a given FWHM in mm: the acquisition's finite resolution (partial volume)."""
    sigma = [fwhm_mm / 2.3548 / s for s in spacing]
    return ndimage.gaussian_filter(image, sigma=sigma, mode="nearest", truncate=3.0)


def bias_field(coords: tuple[np.ndarray, np.ndarray, np.ndarray], half_extent_mm: float,
               coefficients: np.ndarray, strength: float) -> np.ndarray:
    """Smooth multiplicative receive-coil field exp(strength * quadratic polynomial), normalised to mean 1.

    `coefficients` (9,) weight x, y, z, x², y², z², xy, xz, yz in coordinates scaled to about [-1, 1].
    """
    x, y, z = (c / np.float32(half_extent_mm) for c in coords)
    terms = (x, y, z, x * x, y * y, z * z, x * y, x * z, y * z)
    poly = np.zeros_like(x)
    for coef, term in zip(coefficients, terms, strict=True):
        poly += np.float32(coef) * term
    field = np.exp(np.float32(strength) * poly)
    return field / np.float32(field.mean())


@dataclass(frozen=True)
class MetalObject:
    """A restoration as a capsule (crown, or crown plus implant fixture) in anatomy millimetres."""

    top: tuple[float, float, float]
    bottom: tuple[float, float, float]
    void_radius_mm: float
    rim_width_mm: float
    rim_gain: float


def _capsule_distance(coords: tuple[np.ndarray, np.ndarray, np.ndarray], a: np.ndarray, b: np.ndarray,
                      sl: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Distance to segment ab and the cosine between (point - nearest) and the z axis, inside `sl`."""
    x, y, z = (c[sl] for c in coords)
    ab = b - a
    denom = float(ab @ ab)
    if denom < 1e-9:
        t = np.zeros_like(x)
    else:
        t = ((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / np.float32(denom)
        np.clip(t, 0.0, 1.0, out=t)
    dx, dy, dz = x - (a[0] + t * ab[0]), y - (a[1] + t * ab[1]), z - (a[2] + t * ab[2])
    d = np.sqrt(dx * dx + dy * dy + dz * dz)
    cos_z = dz / np.maximum(d, np.float32(1e-3))
    return d, cos_z


def apply_metal(image: np.ndarray, coords: tuple[np.ndarray, np.ndarray, np.ndarray], metal: MetalObject,
                to_index: np.ndarray, rim_level: float) -> np.ndarray:
    """Signal void with a bright, dipole-shaped pile-up rim around a restoration (susceptibility artefact).

    B0 runs along the patient's z axis, so the rim is brightest above and below (3cos²θ - 1 pattern).
    Returns the boolean void mask (full shape) so statistics can leave it out.
    """
    a = np.asarray(metal.top, dtype=np.float32)
    b = np.asarray(metal.bottom, dtype=np.float32)
    reach = metal.void_radius_mm + 4 * metal.rim_width_mm + 2.0
    corners = np.array([[*p, 1.0] for p in (a, b)])
    idx = (to_index @ corners.T).T  # (2, 3) voxel indices of the ends
    spacing_mm = 1.0 / np.linalg.norm(to_index[:, :3], axis=1)
    lo = np.floor(idx.min(axis=0) - reach / spacing_mm).astype(int)
    hi = np.ceil(idx.max(axis=0) + reach / spacing_mm).astype(int) + 1
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, image.shape)
    void = np.zeros(image.shape, dtype=bool)
    if np.any(hi <= lo):
        return void
    sl = tuple(slice(int(l), int(h)) for l, h in zip(lo, hi, strict=True))
    d, cos_z = _capsule_distance(coords, a, b, sl)
    dipole = np.float32(0.5) * (np.float32(3.0) * cos_z * cos_z - np.float32(1.0)) + np.float32(0.5)
    radius = np.float32(metal.void_radius_mm) * (np.float32(0.8) + np.float32(0.4) * dipole)
    outside = d - radius
    rim = np.exp(-((outside / np.float32(metal.rim_width_mm)) ** 2)) * (outside > 0)
    region = image[sl]
    in_void = outside <= 0
    region *= np.where(in_void, np.float32(0.03), np.float32(1.0))
    region += np.float32(metal.rim_gain * rim_level) * rim * (np.float32(0.6) + np.float32(0.8) * dipole)
    void[sl] = in_void
    return void


def motion_ghosting(image: np.ndarray, axis: int, amplitude_px: float, period_lines: float,
                    phase: float) -> np.ndarray:
    """Complex image after periodic motion along the phase-encode `axis`: ghosts at N/period spacing.

    Each k-space line is acquired with the object displaced by amplitude·sin(2π·order/period + phase)
    (centre-out order), i.e. multiplied by the matching linear phase. The image is mirror-padded along
    `axis` first, because the phantom's field of view cuts through the head and a hard wrap-around
    edge would ghost into lines across the whole image.
    """
    n = image.shape[axis]
    pad = [(0, 0)] * image.ndim
    pad[axis] = (n // 2, n - n // 2)
    padded = np.pad(image, pad, mode="reflect")
    m = padded.shape[axis]
    k = np.fft.fft(padded.astype(np.complex64), axis=axis)
    ky = np.fft.fftfreq(m)  # cycles per pixel
    acquisition_order = np.argsort(np.argsort(np.abs(ky), kind="stable"), kind="stable")  # centre-out
    displacement = amplitude_px * np.sin(2 * np.pi * acquisition_order / (period_lines * m / n) + phase)
    ramp = np.exp(-2j * np.pi * ky * displacement).astype(np.complex64)
    shape = [1] * image.ndim
    shape[axis] = m
    k *= ramp.reshape(shape)
    ghosted = np.fft.ifft(k, axis=axis).astype(np.complex64)
    return np.take(ghosted, np.arange(n // 2, n // 2 + n), axis=axis)


def rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of a (real or complex) signal plus complex Gaussian noise of SD `sigma` per channel."""
    noise_re = rng.standard_normal(signal.shape, dtype=np.float32) * np.float32(sigma)
    noise_im = rng.standard_normal(signal.shape, dtype=np.float32) * np.float32(sigma)
    if np.iscomplexobj(signal):
        re = signal.real.astype(np.float32) + noise_re
        im = signal.imag.astype(np.float32) + noise_im
    else:
        re = signal.astype(np.float32) + noise_re
        im = noise_im
    return np.sqrt(re * re + im * im)
