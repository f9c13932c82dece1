"""Unlabelled still photographs, cut into many random crops, for distilling exit heads.

Exit heads distilled on a frozen ImageNet backbone learn to reproduce the
backbone's output on whatever frames they see. The train clips show three
scenes (a hall of pedestrians, a cartoon, cyclists), so heads distilled on
them only learn the few classes those scenes produce (issues 13 and 14).
`load_stills` adds many different scenes: random crops of the still images
that the Debian package ``opencv-doc`` ships in

  /usr/share/doc/opencv-doc/examples/data/*.jpg, *.png

(the package that also ships most clips; installed by ``tools/setup_data.sh``;
nothing is downloaded). No labels are needed: the backbone's own output on each
crop is the distillation target.

What is used
------------
Every ``.jpg`` / ``.png`` in that directory except those matching `EXCLUDED`
(fnmatch patterns, case-sensitive), which leaves the natural and rendered
scenes (fruits, apple, orange, baboon, butterfly, squirrel_cls, chicky_512,
messi5, building, home, leuvenA/B, aero1/3, aloeL/R, graf1/3, starry_night,
basketball1/2, rubberwhale1/2, smarties, stuff, board, cards, blox,
Blender_Suzanne1/2, HappyFish, ela_original / ela_modified,
licenseplate_motion, left.jpg / right.jpg (a room, not calibration shots)).
Excluded, and why:

* content of the evaluation clips: ``box.png`` and ``box_in_scene.png`` show
  the box of the ``box`` test clip; ``Megamind*`` (the ``megamind`` test clip
  and its damaged copy; videos, never read, excluded by name all the same);
  ``*cup*`` and ``*tree*`` (the val clips' names: none today, excluded so that
  none can appear). Nothing else in the directory comes from the clips'
  sources.
* calibration patterns: ``chessboard.png`` and the stereo calibration shots
  ``left01..14`` / ``right01..14`` (a chessboard held up, 26 near-duplicates);
* text, logos, charts, masks and synthetic shapes, where the backbone's output
  carries little about natural scenes: ``digits``, ``imageText*``,
  ``text_*``, ``notes``, ``sudoku``, ``*Logo*`` / ``opencv-logo*``, ``ml``,
  ``pic1..6``, ``detect_blob``, ``ellipses``, ``gradient``, ``mask``,
  ``templ`` / ``tmpl``, ``pca_test1`` and ``aloeGT`` (a disparity map).

Crops
-----
Crop ``i`` of ``load_stills(n, size, seed)`` is cut from image ``i mod M``
(the M used images, sorted by name; every image gets the same number of crops
to within one): a square of side ``s * min(H, W)`` with ``s`` uniform in
``scale`` (default 0.3-1.0), its top-left corner uniform over the positions
where it fits, mirrored left-right with probability 1/2, resized bilinearly
(antialiased) to ``size`` x ``size``; greyscale and palette images are
converted to RGB. The random numbers of crop ``i`` come from
``numpy.random.default_rng((seed, i))`` alone, so a result is the same on
every call and ``load_stills(n)`` is the first ``n`` crops of
``load_stills(m)`` for any ``m >= n``.

Errors: a bad argument is a `ValueError` (one line); the package missing is a
`flexjax.data.sources.MissingSourceError` naming the setup command.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence

import numpy as np

from flexjax.data import sources

STILLS_DIR = "/usr/share/doc/opencv-doc/examples/data"
EXTENSIONS = (".jpg", ".png")
PACKAGE = "opencv-doc"
# A file every opencv-doc install has, to locate the directory (and to name in the error).
_PROBE = "fruits.jpg"

EXCLUDED: dict[str, str] = {
    "box*": "the box of the 'box' test clip",
    "Megamind*": "the 'megamind' test clip",
    "*cup*": "named like the 'cup' val clip",
    "*tree*": "named like the 'tree' val clip",
    "chessboard*": "calibration pattern",
    "left[0-9]*": "stereo calibration shot (chessboard)",
    "right[0-9]*": "stereo calibration shot (chessboard)",
    "digits*": "handwritten digits sheet",
    "imageText*": "text",
    "text_*": "text",
    "notes*": "sheet music",
    "sudoku*": "printed puzzle",
    "*Logo*": "logo",
    "opencv-logo*": "logo",
    "ml.png": "cartoon mascot",
    "pic[0-9]*": "synthetic shapes",
    "detect_blob*": "synthetic shapes",
    "ellipses*": "synthetic shapes",
    "gradient*": "synthetic gradient",
    "mask*": "binary mask",
    "templ*": "template patch",
    "tmpl*": "template patch",
    "pca_test*": "synthetic shapes",
    "aloeGT*": "disparity map",
}

DEFAULT_SCALE = (0.3, 1.0)


def excluded(name: str) -> str | None:
    """The reason `name` (a file name) is excluded, or None when it is used."""
    for pattern, why in EXCLUDED.items():
        if fnmatch.fnmatchcase(name, pattern):
            return why
    return None


def still_paths() -> list[str]:
    """The used images' paths, sorted by file name.

    Raises:
      MissingSourceError: opencv-doc is not installed (one line, naming the setup command).
    """
    probe = sources.system_file(f"{STILLS_DIR}/{_PROBE}", PACKAGE, "stills")
    directory = os.path.dirname(probe)
    names = sorted(
        n for n in os.listdir(directory)
        if n.lower().endswith(EXTENSIONS) and excluded(n) is None
    )  # fmt: skip
    return [os.path.join(directory, n) for n in names]


def _check(n: int, size: int, scale: Sequence[float]) -> tuple[float, float]:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"stills: the number of crops must be an integer >= 0; got {n!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"stills: size must be an integer >= 1 (pixels); got {size!r}")
    try:
        lo, hi = (float(v) for v in scale)
    except (TypeError, ValueError):
        raise ValueError(f"stills: scale must be two numbers (lo, hi); got {scale!r}") from None
    if not (0.0 < lo <= hi <= 1.0):
        raise ValueError(f"stills: scale must satisfy 0 < lo <= hi <= 1; got ({lo}, {hi})")
    return lo, hi


def load_stills(
    n: int, size: int, *, seed: int = 0, scale: Sequence[float] = DEFAULT_SCALE
) -> np.ndarray:
    """`n` random crops of the still images: uint8 RGB ``[n, size, size, 3]``.

    Args:
      n: number of crops (0 gives an empty array).
      size: side of each crop after resizing (the model's input size).
      seed: the crops are a function of (seed, crop index) only.
      scale: ``(lo, hi)``: the crop's side over the image's shorter side, drawn uniformly.

    Raises:
      ValueError: n < 0, size < 1 or a scale outside 0 < lo <= hi <= 1 (one line).
      MissingSourceError: opencv-doc is not installed.
    """
    lo, hi = _check(n, size, scale)
    out = np.zeros((n, size, size, 3), np.uint8)
    if n == 0:
        return out
    from PIL import Image  # lazy: only decoding needs Pillow

    paths = still_paths()
    images = []
    for path in paths:
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    for i in range(n):
        image = images[i % len(images)]
        rng = np.random.default_rng((int(seed), i))
        s, u, v, flip = rng.uniform(lo, hi), rng.uniform(), rng.uniform(), rng.uniform() < 0.5
        w, h = image.size
        side = s * min(w, h)
        left, top = u * (w - side), v * (h - side)
        # PIL's bilinear filter widens its support when shrinking (antialiasing).
        crop = image.resize(
            (size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side)
        )
        a = np.asarray(crop, dtype=np.uint8)
        out[i] = a[:, ::-1] if flip else a
    return out
