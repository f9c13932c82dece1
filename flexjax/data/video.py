"""Synthetic mobile-video streams whose difficulty drifts from frame to frame.

FlexDNN's early exits pay off because consecutive frames of real mobile video
are not equally hard: a centred, sharp object can leave at the first exit,
the same object small, blurred and half hidden needs the whole network. No
such video ships with our dependencies, so `make_stream` builds it,
reproducibly, from the real images of any `Dataset` (MNIST by default).

What a stream is
----------------
``num_clips`` clips of ``frames_per_clip`` frames, clip after clip. Each clip
shows ONE object: one base image (chosen class-balanced by ``seed``), whose
label is the label of every frame of the clip. Frames have the base images'
shape [H, W, C], so the network trained on the base dataset consumes them
unchanged. Over the clip seven nuisances act on the object, each with an
*intensity* in [0, 1] per frame, scaled by a per-nuisance maximum:

=========  =====================================================================
scale      zoom = 1 - max_scale * i (the object recedes) or 1 + max_scale * i
           (approaches and gets cropped); the direction is fixed per clip.
shift      translation by max_shift * i of the image size, in a direction that
           turns slowly (random walk, 0.15 rad per frame) as the camera pans.
rotation   rotation by max_rotation_deg * i degrees, sense fixed per clip.
blur       Gaussian blur with sigma = max_blur_sigma * i pixels (defocus,
           motion), applied to the whole frame.
noise      additive Gaussian noise with std = max_noise_std * i (sensor noise
           in low light), fresh every frame.
occlusion  a rectangle covering max_occlusion * i of the frame area, in front
           of the object: fixed per clip are its aspect ratio (0.5-2), its
           centre (within 15% of the frame centre, so it hides the object
           rather than empty background) and its colour (uniform random).
           Edges are anti-aliased so the area changes smoothly, not in pixels.
clutter    up to max_clutter distractor fragments: half-size crops of OTHER
           base images (of other classes when possible) placed at fixed
           random spots in the clip. Fragment k fades in as i * max_clutter
           passes k, to at most 60% contrast, and is blended with "lighten"
           (per-pixel max): on white-on-black digits it draws faint foreign
           strokes into the background without erasing the object; on natural
           images it shows in darker regions and in canvas left uncovered by
           scale / shift.
=========  =====================================================================

The geometric nuisances move the object about the frame centre with bilinear
resampling; canvas the object no longer covers is filled with the mean of the
base image's border (black for MNIST). Order per frame: geometry, clutter,
occlusion, blur, noise, then clip to [0, 1]. A nuisance whose maximum is 0 is
switched off: it never touches the pixels and reports intensity 0.

The intensity process
---------------------
Per clip, a shared *difficulty level* s_t and one intensity z_t per nuisance
follow bounded random walks (values leaving [0, 1] are reflected back in):

    s_0 ~ U(0, 1)
    s_t = reflect(s_{t-1} + drift * e_t)   or, with prob. jump_prob, s_t ~ U(0, 1)
    z_0 = reflect(s_0 + drift * e'_0)
    z_t = reflect(z_{t-1} + coupling * (s_t - z_{t-1}) + drift * e'_t)

    intensity_t = z_t ** skew

with independent standard normal e, e'. ``drift`` sets how fast intensities
change per frame; jumps model scene cuts and camera jerks (the level moves at
once, the nuisances follow within a few frames); ``coupling`` makes the
nuisances mean-revert towards the shared level, so hard stretches are hard on
several counts at once (as in real footage, where dim light brings both noise
and blur) and easy stretches are clean. With ``coupling = 0`` the nuisances
are independent walks. The walks spread almost uniformly over [0, 1];
``skew`` > 1 bends that towards mild nuisances, because handheld footage is
mostly easy with hard moments, and because nuisances compound: seven of them
at half strength already defeat a clean-trained classifier.

Difficulty
----------
``difficulty`` of a frame is the mean intensity of the enabled nuisances (0
when none is enabled). It is a property of how the frame was generated, not of
any model: it is what an adaptive network's exit choice should track.

Calibration of the defaults
---------------------------
The default maxima and ``skew`` were tuned on mnist5k's test split with a
small CNN (two 3x3 conv + pool stages, 97% on clean test images) trained on
clean images only: over five seeds it classifies 77-84% of the 2,000 frames
correctly, about 96% of the easiest fifth (by ``difficulty``) and about 34%
of the hardest fifth. Each maximum alone, at intensity 1, costs that model
roughly 5-30 points; larger values make most frames unrecognisable once
nuisances coincide.

Reproducibility
---------------
Everything random derives from ``numpy.random.SeedSequence(config.seed)``,
split into independent streams for clip contents, intensities and per-frame
noise, so the same config and base dataset give bitwise identical arrays,
and switching one nuisance off (max = 0) leaves the others' draws unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import numpy as np

from flexjax.data.datasets import Dataset, load, stratified_order

NUISANCES: tuple[str, ...] = (
    "scale",
    "shift",
    "rotation",
    "blur",
    "noise",
    "occlusion",
    "clutter",
)
_MAX_FIELDS = {
    "scale": "max_scale",
    "shift": "max_shift",
    "rotation": "max_rotation_deg",
    "blur": "max_blur_sigma",
    "noise": "max_noise_std",
    "occlusion": "max_occlusion",
    "clutter": "max_clutter",
}
# Constants of the generator that are documented in the module docstring.
_PAN_STEP_RAD = 0.15  # per-frame random-walk std of the shift direction
_OCCLUDER_CENTRE_JITTER = 0.15  # occluder centre offset, fraction of H / W
_FRAGMENT_SIZE = 0.5  # clutter fragment side, fraction of H / W
_FRAGMENT_CONTRAST = 0.6  # opacity of a fully faded-in fragment


@dataclasses.dataclass(frozen=True)
class VideoConfig:
    """How `make_stream` builds a stream (see the module docstring).

    Attributes:
      num_clips: clips in the stream; each shows one base image.
      frames_per_clip: frames per clip.
      seed: seeds everything random; same config, same arrays.
      max_scale: the object is shrunk or grown by up to this fraction (0.3 =
        zoom between 0.7x and 1.3x); must be < 1.
      max_shift: maximum translation as a fraction of the image size.
      max_rotation_deg: maximum rotation in degrees.
      max_blur_sigma: maximum Gaussian blur sigma in pixels.
      max_noise_std: maximum std of additive Gaussian noise (pixel range 1).
      max_occlusion: maximum fraction of the frame area hidden by the
        occluder, in [0, 1].
      max_clutter: number of distractor fragments at full intensity (may be
        fractional: the last fragment then reaches only part of its
        contrast).
      drift: per-frame std of the intensity random walks.
      jump_prob: per-frame probability that the clip's difficulty level jumps
        to a fresh uniform value.
      coupling: per-frame pull of each nuisance towards the shared level, in
        [0, 1]; 0 makes nuisances independent.
      skew: intensity = walk ** skew; above 1, mild nuisances are more common
        than strong ones (1 keeps the walk's near-uniform spread).
    """

    num_clips: int = 50
    frames_per_clip: int = 40
    seed: int = 0
    max_scale: float = 0.3
    max_shift: float = 0.08
    max_rotation_deg: float = 25.0
    max_blur_sigma: float = 1.5
    max_noise_std: float = 0.25
    max_occlusion: float = 0.15
    max_clutter: float = 2.0
    drift: float = 0.08
    jump_prob: float = 0.03
    coupling: float = 0.3
    skew: float = 3.0

    def __post_init__(self) -> None:
        for field in ("num_clips", "frames_per_clip"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"VideoConfig.{field} must be a positive int; got {value!r}")
        for field in _MAX_FIELDS.values():
            if not getattr(self, field) >= 0:  # also rejects NaN
                raise ValueError(f"VideoConfig.{field} must be >= 0; got {getattr(self, field)!r}")
        if self.max_scale >= 1:
            raise ValueError(
                f"VideoConfig.max_scale must be < 1 (zoom stays positive); got {self.max_scale}"
            )
        if self.max_occlusion > 1:
            raise ValueError(
                "VideoConfig.max_occlusion is a fraction of the area, <= 1; "
                f"got {self.max_occlusion}"
            )
        if not self.drift >= 0:
            raise ValueError(f"VideoConfig.drift must be >= 0; got {self.drift!r}")
        if not self.skew > 0:
            raise ValueError(f"VideoConfig.skew must be > 0; got {self.skew!r}")
        for field in ("jump_prob", "coupling"):
            if not 0 <= getattr(self, field) <= 1:
                raise ValueError(
                    f"VideoConfig.{field} must be in [0, 1]; got {getattr(self, field)!r}"
                )

    def maxima(self) -> dict[str, float]:
        """Returns the maximum of each nuisance, keyed by `NUISANCES` name."""
        return {name: float(getattr(self, field)) for name, field in _MAX_FIELDS.items()}


class VideoStream(NamedTuple):
    """Frames of all clips, clip after clip.

    Attributes:
      x: float32 frames [T, H, W, C] in [0, 1], T = num_clips * frames_per_clip.
      y: int32 label of each frame [T] (constant within a clip).
      clip: int32 clip index of each frame [T].
      frame: int32 index of each frame within its clip [T].
      difficulty: float32 mean intensity of the enabled nuisances [T], in [0, 1].
      nuisance: name (see `NUISANCES`) -> float32 intensity [T] in [0, 1]; 0
        for nuisances switched off.
    """

    x: np.ndarray
    y: np.ndarray
    clip: np.ndarray
    frame: np.ndarray
    difficulty: np.ndarray
    nuisance: dict[str, np.ndarray]

    def as_dataset(self) -> Dataset:
        """Returns the frames and labels as a `Dataset` (e.g. for evaluation)."""
        return Dataset(self.x, self.y)


def _reflect(v: np.ndarray) -> np.ndarray:
    """Folds values back into [0, 1] like a triangle wave (bounded walk)."""
    v = np.mod(v, 2.0)
    return np.where(v > 1.0, 2.0 - v, v)


def _intensities(config: VideoConfig, rng: np.random.Generator) -> np.ndarray:
    """Intensity of every nuisance: float64 [num_clips, frames_per_clip, K]."""
    n, f, k = config.num_clips, config.frames_per_clip, len(NUISANCES)
    # Draw all randomness up front so the walk below is a pure function of it.
    level_eps = rng.standard_normal((n, f))
    own_eps = rng.standard_normal((n, f, k))
    jump = rng.uniform(size=(n, f)) < config.jump_prob
    fresh = rng.uniform(size=(n, f))
    level = rng.uniform(size=n)
    z = np.empty((n, f, k))
    z[:, 0] = _reflect(level[:, None] + config.drift * own_eps[:, 0])
    for t in range(1, f):
        level = np.where(jump[:, t], fresh[:, t], _reflect(level + config.drift * level_eps[:, t]))
        prev = z[:, t - 1]
        z[:, t] = _reflect(
            prev + config.coupling * (level[:, None] - prev) + config.drift * own_eps[:, t]
        )
    return z**config.skew


class _Clip(NamedTuple):
    """Everything fixed for one clip, drawn before rendering."""

    image: int  # index into the base dataset
    scale_dir: float  # +1 grow, -1 shrink
    rot_dir: float
    pan: np.ndarray  # shift direction per frame, radians [F]
    occ_aspect: float  # occluder height / width
    occ_centre: tuple[float, float]  # (row, col) in pixels
    occ_value: np.ndarray  # [C]
    fragments: np.ndarray  # [K, H, W, C] clutter layers, zero outside the fragment


def _draw_clip(base: Dataset, image: int, rng: np.random.Generator, config: VideoConfig) -> _Clip:
    h, w, c = base.x.shape[1:]
    pan = rng.uniform(0, 2 * np.pi) + np.cumsum(
        rng.normal(0, _PAN_STEP_RAD, config.frames_per_clip)
    )
    occ_aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    jitter = rng.uniform(-_OCCLUDER_CENTRE_JITTER, _OCCLUDER_CENTRE_JITTER, 2)
    occ_centre = (h / 2 + jitter[0] * h, w / 2 + jitter[1] * w)
    occ_value = rng.uniform(size=c).astype(np.float32)
    scale_dir = float(rng.choice([-1.0, 1.0]))
    rot_dir = float(rng.choice([-1.0, 1.0]))

    # Drawn last: how many fragments depends on max_clutter, and the other
    # draws must not. Distractors come from other classes so they can
    # mislead the classifier.
    others = np.flatnonzero(base.y != base.y[image])
    if others.size == 0:
        others = np.arange(len(base))
    k = math.ceil(config.max_clutter)
    fh, fw = max(1, round(_FRAGMENT_SIZE * h)), max(1, round(_FRAGMENT_SIZE * w))
    fragments = np.zeros((k, h, w, c), dtype=np.float32)
    for j in range(k):
        src = base.x[others[rng.integers(others.size)]]
        # Crop near the source centre, where its object (a digit's strokes) is.
        r0 = int(np.clip(round((h - fh) / 2 + rng.uniform(-h, h) / 8), 0, h - fh))
        c0 = int(np.clip(round((w - fw) / 2 + rng.uniform(-w, w) / 8), 0, w - fw))
        tr, tc = rng.integers(0, h - fh + 1), rng.integers(0, w - fw + 1)
        fragments[j, tr : tr + fh, tc : tc + fw] = src[r0 : r0 + fh, c0 : c0 + fw]
    return _Clip(
        image=image,
        scale_dir=scale_dir,
        rot_dir=rot_dir,
        pan=pan,
        occ_aspect=occ_aspect,
        occ_centre=occ_centre,
        occ_value=occ_value,
        fragments=fragments,
    )


def _render_clip(
    image: np.ndarray,
    clip: _Clip,
    inten: dict[str, np.ndarray],
    config: VideoConfig,
    noise_rng: np.random.Generator,
) -> np.ndarray:
    """Renders the frames of one clip: float32 [F, H, W, C] in [0, 1]."""
    # lazy: SciPy is slow to import and only the blur nuisance needs it
    from scipy import ndimage  # heavy import; only when rendering

    f = config.frames_per_clip
    h, w, c = image.shape
    frames = np.broadcast_to(image, (f, h, w, c)).copy()

    if config.max_scale or config.max_shift or config.max_rotation_deg:
        zoom = 1.0 + clip.scale_dir * config.max_scale * inten["scale"]
        theta = np.deg2rad(clip.rot_dir * config.max_rotation_deg * inten["rotation"])
        dist = config.max_shift * inten["shift"]
        shift_r, shift_c = dist * h * np.sin(clip.pan), dist * w * np.cos(clip.pan)
        # Pull back each output pixel through the inverse of
        # "scale and rotate about the centre, then translate".
        cy, cx = (h - 1) / 2, (w - 1) / 2
        rows, cols = np.meshgrid(
            np.arange(h, dtype=np.float64),
            np.arange(w, dtype=np.float64),
            indexing="ij",
        )
        dr = rows[None] - cy - shift_r[:, None, None]
        dc = cols[None] - cx - shift_c[:, None, None]
        cos, sin, zoom = (
            np.cos(theta)[:, None, None],
            np.sin(theta)[:, None, None],
            zoom[:, None, None],
        )
        coords = np.stack([(cos * dr + sin * dc) / zoom + cy, (cos * dc - sin * dr) / zoom + cx])
        # Uncovered canvas takes the border mean: sample (image - fill) with a
        # zero outside value and add the fill back.
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        fill = border.mean(axis=0)
        for ch in range(c):
            moved = ndimage.map_coordinates(
                image[:, :, ch] - fill[ch],
                coords,
                order=1,
                mode="constant",
                cval=0.0,
                prefilter=False,
            )
            frames[..., ch] = moved + fill[ch]

    if config.max_clutter:
        k = clip.fragments.shape[0]
        opacity = _FRAGMENT_CONTRAST * np.clip(
            inten["clutter"][:, None] * config.max_clutter - np.arange(k)[None],
            0.0,
            1.0,
        )
        for j in range(k):
            layer = opacity[:, j, None, None, None].astype(np.float32) * clip.fragments[j][None]
            np.maximum(frames, layer, out=frames)

    if config.max_occlusion:
        area = config.max_occlusion * inten["occlusion"] * h * w
        occ_h = np.minimum(np.sqrt(area * clip.occ_aspect), h)
        occ_w = np.minimum(np.sqrt(area / clip.occ_aspect), w)
        cov_r = _coverage(clip.occ_centre[0], occ_h, h)
        cov_c = _coverage(clip.occ_centre[1], occ_w, w)
        mask = (cov_r[:, :, None] * cov_c[:, None, :])[..., None].astype(np.float32)
        frames = frames * (1 - mask) + mask * clip.occ_value

    if config.max_blur_sigma:
        sigma = config.max_blur_sigma * inten["blur"]
        for t in range(f):
            if sigma[t] > 0:
                frames[t] = ndimage.gaussian_filter(
                    frames[t], sigma=(sigma[t], sigma[t], 0), mode="nearest"
                )

    # Drawn even when switched off so other settings do not shift the stream.
    noise = noise_rng.standard_normal(frames.shape, dtype=np.float32)
    if config.max_noise_std:
        std = (config.max_noise_std * inten["noise"]).astype(np.float32)
        frames += std[:, None, None, None] * noise
    return np.clip(frames, 0.0, 1.0, out=frames)


def _coverage(centre: float, extent: np.ndarray, size: int) -> np.ndarray:
    """Fraction of each pixel [F, size] inside the interval centre +- extent/2."""
    lo = np.clip(centre - extent / 2, 0, size)[:, None]
    hi = np.clip(centre + extent / 2, 0, size)[:, None]
    px = np.arange(size, dtype=np.float64)[None]
    return np.clip(np.minimum(px + 1, hi) - np.maximum(px, lo), 0.0, 1.0)


def make_stream(base: Dataset, config: VideoConfig = VideoConfig()) -> VideoStream:
    """Builds a video stream of drifting difficulty from real images.

    Args:
      base: the images to film (e.g. a test split); frames have their shape.
      config: generator settings; see `VideoConfig` and the module docstring.

    Returns:
      A `VideoStream` of ``config.num_clips * config.frames_per_clip`` frames,
      bitwise reproducible for the same ``base`` and ``config``.

    Raises:
      ValueError: ``base`` is empty or not [N, H, W, C] images with N labels.
    """
    x = np.asarray(base.x)
    y = np.asarray(base.y)
    if x.ndim != 4 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"base must hold images [N, H, W, C] and labels [N]; got x {x.shape}, y {y.shape}"
        )
    if x.shape[0] == 0:
        raise ValueError("base dataset is empty; make_stream needs at least one image")
    base = Dataset(x.astype(np.float32, copy=False), y.astype(np.int32, copy=False))

    pick_ss, clip_ss, inten_ss, noise_ss = np.random.SeedSequence(config.seed).spawn(4)
    noise_rng = np.random.default_rng(noise_ss)

    n, f = config.num_clips, config.frames_per_clip
    pick_rng = np.random.default_rng(pick_ss)
    # Class-balanced choice of objects; repeat the order for very short bases.
    picks = np.concatenate([stratified_order(base.y, pick_rng) for _ in range(-(-n // len(base)))])[
        :n
    ]
    z = _intensities(config, np.random.default_rng(inten_ss))
    enabled = np.array([config.maxima()[name] > 0 for name in NUISANCES])
    z = np.where(enabled, z, 0.0)

    frames = np.empty((n, f, *base.x.shape[1:]), dtype=np.float32)
    # One generator per clip, so a clip's contents do not depend on others'.
    for i, ss in enumerate(clip_ss.spawn(n)):
        clip = _draw_clip(base, int(picks[i]), np.random.default_rng(ss), config)
        inten = {name: z[i, :, j] for j, name in enumerate(NUISANCES)}
        frames[i] = _render_clip(base.x[clip.image], clip, inten, config, noise_rng)

    difficulty = z[..., enabled].mean(axis=-1) if enabled.any() else np.zeros((n, f))
    return VideoStream(
        x=frames.reshape(n * f, *base.x.shape[1:]),
        y=np.repeat(base.y[picks], f).astype(np.int32),
        clip=np.repeat(np.arange(n, dtype=np.int32), f),
        frame=np.tile(np.arange(f, dtype=np.int32), n),
        difficulty=difficulty.reshape(-1).astype(np.float32),
        nuisance={
            name: z[:, :, j].reshape(-1).astype(np.float32) for j, name in enumerate(NUISANCES)
        },
    )


def load_video(
    name: str,
    *,
    split: str = "test",
    config: VideoConfig | None = None,
    **load_kwargs: Any,
) -> VideoStream:
    """Loads a dataset with `load` and films one of its splits.

    Args:
      name: a dataset name from `DATASETS` (e.g. ``"mnist5k"``).
      split: which split supplies the objects: ``"train"``, ``"val"`` or
        ``"test"`` (default, so the network never saw the objects).
      config: generator settings; `VideoConfig()` if None.
      **load_kwargs: passed to `load` (path, seed, image_size, ...).

    Returns:
      The `VideoStream` built by `make_stream`.

    Raises:
      ValueError: unknown split, or anything `load` / `make_stream` raise.
      FileNotFoundError: as `load`.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r}; valid: train, val, test")
    splits = load(name, **load_kwargs)
    return make_stream(getattr(splits, split), VideoConfig() if config is None else config)
