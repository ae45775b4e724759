"""Common corruptions on whole batches: the CIFAR-10-C / MNIST-C families, 5 severities each.

Hendrycks & Dietterich 2019 (CIFAR-10-C) and Mu & Gilmer 2019 (MNIST-C) measure how a
classifier degrades under everyday distortions rather than worst-case ones. Every type here
takes a batch (N, C, H, W) in [0, 1] and a severity 1–5 and returns a batch in [0, 1], with
torch ops on the batch's device (Pillow only for JPEG, whose codec is the point). Sizes in
pixels are given for 28×28 images and scaled to the batch's size. Randomness comes from the
``generator`` passed in, so a corrupted test set is reproducible.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F

from xdl.errors import XdlError

SEVERITIES = (1, 2, 3, 4, 5)
FAMILIES = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "motion_blur", "zoom_blur", "glass_blur"),
    "weather": ("brightness", "contrast", "fog"),
    "digital": ("pixelate", "jpeg", "elastic"),
    "geometric": ("rotate", "shear", "scale", "translate"),
}
TYPES = tuple(t for family in FAMILIES.values() for t in family)

# Per type, the parameter of severities 1–5 (CIFAR-10-C's constants where they exist,
# MNIST-C's ranges for the geometric ones; pixel sizes are for 28×28).
LEVELS: dict[str, tuple] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # std
    "shot_noise": (500, 250, 100, 75, 50),  # photons per unit intensity
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # share of pixels set to 0 or 1
    "defocus_blur": (1.0, 1.5, 2.0, 2.5, 3.0),  # disk radius, pixels
    "motion_blur": (2, 3, 4, 5, 6),  # streak length, pixels
    "zoom_blur": (0.06, 0.11, 0.16, 0.21, 0.26),  # largest zoom − 1
    "glass_blur": ((0.5, 1, 1), (0.7, 1, 1), (0.9, 1, 1), (0.7, 1, 2), (0.9, 2, 2)),  # (blur sigma, max shift px, rounds)
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),  # added intensity
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor on the deviation from the image mean
    "fog": ((0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75)),  # (strength, roughness decay)
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # resolution factor
    "jpeg": (80, 65, 58, 50, 40),  # quality
    "elastic": (1.0, 1.5, 2.0, 2.5, 3.0),  # largest displacement, pixels
    "rotate": (10, 20, 30, 40, 50),  # degrees, random sign
    "shear": (0.1, 0.2, 0.3, 0.4, 0.5),  # shear factor, random sign
    "scale": (0.9, 0.8, 0.7, 0.6, 0.5),  # zoom-out factor
    "translate": (1, 2, 3, 4, 5),  # pixels, random direction
}


def corrupt(x: torch.Tensor, kind: str, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` (N, C, H, W) in [0, 1] with corruption ``kind`` at ``severity`` (1–5)."""
    if kind not in LEVELS:
        raise XdlError(f"unknown corruption {kind!r}: choose from {', '.join(TYPES)}")
    if severity not in SEVERITIES:
        raise XdlError(f"severity must be 1–5, got {severity}")
    if x.dim() != 4:
        raise XdlError("corruptions need images (N, C, H, W)")
    g = generator or torch.Generator(device="cpu").manual_seed(0)
    level = LEVELS[kind][severity - 1]
    scale = min(x.shape[-2:]) / 28  # pixel sizes are given for 28×28
    return _FUNCS[kind](x, level, scale, g).clamp(0, 1)


def _rand(shape, g, like: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) drawn on the CPU generator (same numbers on every device), moved to like's device."""
    return torch.rand(shape, generator=g).to(device=like.device, dtype=like.dtype)


def _randn(shape, g, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(shape, generator=g).to(device=like.device, dtype=like.dtype)


# ---- noise ------------------------------------------------------------------------------


def _gaussian_noise(x, std, scale, g):
    return x + std * _randn(x.shape, g, x)


def _shot_noise(x, photons, scale, g):
    # Poisson counts need their own generator draw; torch.poisson takes one on CPU only.
    counts = torch.poisson((x * photons).cpu().float(), generator=g)
    return counts.to(x) / photons


def _impulse_noise(x, amount, scale, g):
    u = _rand(x.shape, g, x)
    salt = _rand(x.shape, g, x) < 0.5
    return torch.where(u < amount, salt.to(x.dtype), x)


# ---- blur -------------------------------------------------------------------------------


def _conv(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Depthwise 'same' convolution with a 2-D kernel, edges replicated."""
    c = x.shape[1]
    kh, kw = kernel.shape
    padded = F.pad(x, (kw // 2, kw - 1 - kw // 2, kh // 2, kh - 1 - kh // 2), mode="replicate")
    return F.conv2d(padded, kernel.to(x).expand(c, 1, kh, kw), groups=c)


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    return k[:, None] * k[None, :]


def _defocus_blur(x, radius, scale, g):
    r = max(radius * scale, 0.6)  # below that, a small image's disk would be one pixel: no blur
    size = math.ceil(r)
    t = torch.arange(-size, size + 1, dtype=torch.float32)
    # Anti-aliased edge: a pixel half inside the circle counts half.
    disk = (r + 0.5 - (t[:, None] ** 2 + t[None, :] ** 2).sqrt()).clamp(0, 1)
    return _conv(x, disk / disk.sum())


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _shift_theta(dx: torch.Tensor, dy: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Affine matrices that translate by (dx, dy) pixels (grid units are 2/size per pixel)."""
    n = len(dx)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2], theta[:, 1, 2] = -2 * dx / w, -2 * dy / h
    return theta


def _motion_blur(x, length, scale, g):
    n, _, h, w = x.shape
    angle = torch.rand(n, generator=g) * math.pi
    taps = max(2, round(length * scale) + 1)
    out = torch.zeros_like(x)
    # A streak behind each pixel, along each sample's own direction.
    for t in torch.linspace(0, length * scale, taps):
        out += _affine(x, _shift_theta(t * angle.cos(), t * angle.sin(), h, w))
    return out / taps


def _zoom_blur(x, top, scale, g):
    zooms = torch.arange(1.0, 1.0 + top + 1e-9, 0.01)
    out = x.clone()
    n = len(x)
    for z in zooms[1:]:
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = 1 / z
        out += _affine(x, theta)
    return out / len(zooms)


def _glass_blur(x, level, scale, g):
    sigma, shift, rounds = level
    n, c, h, w = x.shape
    out = _conv(x, _gaussian_kernel(sigma * scale))
    d = max(1, round(shift * scale))
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    for _ in range(rounds):
        # Each pixel takes the value of a random neighbour within d: frosted glass.
        r = (rows + torch.randint(-d, d + 1, (n, h, w), generator=g)).clamp(0, h - 1)
        q = (cols + torch.randint(-d, d + 1, (n, h, w), generator=g)).clamp(0, w - 1)
        index = (r * w + q).to(x.device).view(n, 1, h * w).expand(n, c, h * w)
        out = out.flatten(2).gather(2, index).view(n, c, h, w)
    return _conv(out, _gaussian_kernel(sigma * scale))


# ---- weather-like -----------------------------------------------------------------------


def _brightness(x, amount, scale, g):
    return x + amount


def _contrast(x, factor, scale, g):
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * factor + mean


def _fog(x, level, scale, g):
    strength, decay = level
    n, _, h, w = x.shape
    # Fractal noise: octaves of smooth random fields, each finer one weaker by 1/decay.
    fog = torch.zeros(n, 1, h, w, device=x.device, dtype=x.dtype)
    size, amp = 2, 1.0
    while size <= 2 * max(h, w):
        coarse = _randn((n, 1, size, size), g, x)
        fog += amp * F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
        size, amp = size * 2, amp / decay
    fog = (fog - fog.amin((2, 3), keepdim=True)) / (fog.amax((2, 3), keepdim=True) - fog.amin((2, 3), keepdim=True)).clamp_min(1e-12)
    top = x.amax((1, 2, 3), keepdim=True)
    return (x + strength * fog) * top / (top + strength)


# ---- digital ----------------------------------------------------------------------------


def _pixelate(x, factor, scale, g):
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, int(h * factor)), max(1, int(w * factor))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest")


def _jpeg(x, quality, scale, g):
    from PIL import Image

    pixels = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = np.empty_like(pixels)
    mode = "L" if pixels.shape[-1] == 1 else "RGB"
    for i, image in enumerate(pixels):
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0] if mode == "L" else image, mode).save(buffer, "JPEG", quality=quality)
        decoded = np.asarray(Image.open(buffer))
        out[i] = decoded[..., None] if mode == "L" else decoded
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(x) / 255


def _elastic(x, amount, scale, g):
    n, _, h, w = x.shape
    # A smooth random displacement field, its largest shift set to ``amount`` pixels.
    field = _randn((n, 2, h, w), g, x)
    field = _conv(field, _gaussian_kernel(3 * scale))
    field = field / field.flatten(1).abs().amax(1).clamp_min(1e-12).view(n, 1, 1, 1) * amount * scale
    base = F.affine_grid(torch.eye(2, 3, device=x.device, dtype=x.dtype).expand(n, 2, 3), list(x.shape), align_corners=False)
    offset = torch.stack([field[:, 0] * 2 / w, field[:, 1] * 2 / h], -1)
    return F.grid_sample(x, base + offset, mode="bilinear", padding_mode="zeros", align_corners=False)


# ---- geometric (MNIST-C) ----------------------------------------------------------------


def _sign(n: int, g) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=g).float() * 2 - 1


def _rotate(x, degrees, scale, g):
    n, _, h, w = x.shape
    a = math.radians(degrees) * _sign(n, g)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = a.cos(), -a.sin() * h / w
    theta[:, 1, 0], theta[:, 1, 1] = a.sin() * w / h, a.cos()
    return _affine(x, theta)


def _shear(x, factor, scale, g):
    n = len(x)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 1] = factor * _sign(n, g)
    return _affine(x, theta)


def _scale(x, factor, scale, g):
    theta = torch.zeros(len(x), 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / factor
    return _affine(x, theta)


def _translate(x, pixels, scale, g):
    n, _, h, w = x.shape
    d = round(pixels * scale)
    # Whole pixels in a random one of 8 directions: the digit moves, nothing is resampled.
    angle = torch.randint(0, 8, (n,), generator=g).float() * math.pi / 4
    dx, dy = (d * angle.cos()).round(), (d * angle.sin()).round()
    return _affine(x, _shift_theta(dx, dy, h, w))


_FUNCS = {name: globals()[f"_{name}"] for name in TYPES}
