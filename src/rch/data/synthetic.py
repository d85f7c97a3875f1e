"""A generated street-scene dataset, deterministic from a seed, for ``make demo`` and tests.

It is built so that a segmentation network makes the errors RCH targets:

- class pairs that share a colour and differ only in texture or context: building (window
  grid) vs wall (plain), road vs sidewalk (tile joints; the sidewalk lies between road and
  houses), vegetation (leafy, above the ground) vs terrain (smooth, on the ground);
- car vs person: the same paint colours, different shape;
- thin structures (poles), occlusion (objects in front of each other and of the background),
- illumination changes, cast shadows across classes, colour casts and sensor noise.

Images are written once as PNG files with a progress bar into a cache directory and then read
like any other dataset (layout ``images/{split}``, ``labels/{split}``, ``classes.txt``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

__all__ = [
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_PALETTE",
    "default_cache_dir",
    "ensure_synthetic",
    "render_scene",
]

SYNTHETIC_CLASSES = (
    "sky",
    "building",
    "wall",
    "road",
    "sidewalk",
    "pole",
    "car",
    "person",
    "vegetation",
    "terrain",
)
SYNTHETIC_PALETTE = np.array(
    [
        [70, 130, 180],
        [70, 70, 70],
        [102, 102, 156],
        [128, 64, 128],
        [244, 35, 232],
        [153, 153, 153],
        [0, 0, 142],
        [220, 20, 60],
        [107, 142, 35],
        [152, 251, 152],
    ],
    dtype=np.uint8,
)
"""Colours of the classes for figures (those of the Cityscapes classes of the same name)."""
SKY, BUILDING, WALL, ROAD, SIDEWALK, POLE, CAR, PERSON, VEGETATION, TERRAIN = range(10)
_PAINT = np.array([[180, 40, 40], [40, 60, 170], [200, 200, 200], [30, 30, 30], [200, 160, 40]])
VERSION = 1


def default_cache_dir() -> Path:
    """``$RCH_CACHE``, else ``$XDG_CACHE_HOME/rch``, else ``~/.cache/rch``."""
    if os.environ.get("RCH_CACHE"):
        return Path(os.environ["RCH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rch"


def _fill(
    image: np.ndarray, label: np.ndarray, mask: np.ndarray, colour: np.ndarray, cls: int
) -> None:
    image[mask] = colour
    label[mask] = cls


def _background(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray, int]:
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.zeros((h, w, 3), np.float32)
    label = np.full((h, w), SKY, np.uint8)
    image[:] = np.array([110, 160, 220]) + (yy[..., None] / h) * np.array([60, 40, 10])
    horizon = int(h * rng.uniform(0.42, 0.58))
    facade = rng.uniform(120, 190) * np.array([1.0, 0.93, 0.85])
    x = 0
    while x < w:  # a row of houses: buildings (windows) and walls (plain), same colour
        width = int(rng.integers(w // 8, w // 3))
        top = int(rng.integers(int(h * 0.08), horizon - 4))
        cols = (xx >= x) & (xx < x + width) & (yy >= top) & (yy < horizon)
        if rng.random() < 0.6:
            _fill(image, label, cols, facade, BUILDING)
            step_y, step_x = int(rng.integers(6, 10)), int(rng.integers(6, 10))
            win = cols & ((yy - top) % step_y >= 2) & ((yy - top) % step_y < 5)
            win &= ((xx - x) % step_x >= 2) & ((xx - x) % step_x < 5)
            image[win] = facade * 0.55
        else:
            low = max(top, horizon - int(h * rng.uniform(0.12, 0.25)))
            _fill(image, label, cols & (yy >= low), facade, WALL)
        x += width
    for _ in range(int(rng.integers(1, 4))):  # trees in front of the houses
        cx, cy = rng.uniform(0, w), horizon - rng.uniform(0.05, 0.25) * h
        r = rng.uniform(0.06, 0.14) * h
        blob = (xx - cx) ** 2 + ((yy - cy) * 1.3) ** 2 < r * r
        leaves = rng.uniform(0.75, 1.25, (h, w, 1)) * np.array([60, 130, 50])
        image[blob] = leaves[blob]
        label[blob] = VEGETATION
    ground = yy >= horizon
    curb = horizon + (h - horizon) * rng.uniform(0.15, 0.35)
    asphalt = rng.uniform(70, 110) * np.ones(3)
    _fill(image, label, ground & (yy >= curb), asphalt, ROAD)
    walk = ground & (yy < curb)
    _fill(image, label, walk, asphalt, SIDEWALK)
    joints = walk & (((xx + (yy - horizon) * 2) % 9 == 0) | ((yy - horizon) % 5 == 0))
    image[joints] = asphalt * 1.25
    for _ in range(int(rng.integers(0, 3))):  # grass patches on the pavement level
        a = rng.uniform(0, w)
        patch = walk & (xx >= a) & (xx < a + rng.uniform(0.1, 0.3) * w)
        _fill(image, label, patch, np.array([60, 130, 50]), TERRAIN)
    return image, label, horizon


def _objects(rng: np.random.Generator, image: np.ndarray, label: np.ndarray, horizon: int) -> None:
    h, w = label.shape
    yy, xx = np.mgrid[0:h, 0:w]
    things = []
    for _ in range(int(rng.integers(1, 4))):
        things.append((POLE, rng.uniform(0, w), rng.uniform(horizon, h)))
    for _ in range(int(rng.integers(0, 4))):
        things.append((CAR, rng.uniform(0, w), rng.uniform(horizon + 0.1 * h, h)))
    for _ in range(int(rng.integers(0, 4))):
        things.append((PERSON, rng.uniform(0, w), rng.uniform(horizon, h)))
    for cls, cx, base in sorted(things, key=lambda t: t[2]):  # far first: near ones occlude
        depth = (base - horizon + 4) / (h - horizon + 4)
        if cls == POLE:
            half = max(0.5, 1.6 * depth)
            mask = (np.abs(xx - cx) <= half) & (yy <= base) & (yy >= base - h * 0.7 * depth - 8)
            _fill(image, label, mask, np.array([150, 150, 140]), POLE)
            continue
        paint = _PAINT[int(rng.integers(0, len(_PAINT)))].astype(np.float32)
        if cls == CAR:
            cw, ch = 0.45 * w * depth + 6, 0.22 * h * depth + 4
            mask = (np.abs(xx - cx) <= cw / 2) & (yy <= base) & (yy >= base - ch)
            roof = (np.abs(xx - cx) <= cw / 3) & (yy < base - ch) & (yy >= base - 1.5 * ch)
            _fill(image, label, mask | roof, paint, CAR)
            image[roof & (yy < base - 1.3 * ch)] = paint * 0.5
        else:
            ph, pw = 0.45 * h * depth + 6, 0.05 * w * depth + 1.5
            body = ((xx - cx) / pw) ** 2 + ((yy - (base - ph / 2)) / (ph / 2)) ** 2 <= 1
            head = (xx - cx) ** 2 + (yy - (base - ph)) ** 2 <= (pw * 0.8) ** 2
            _fill(image, label, body, paint, PERSON)
            _fill(image, label, head, np.array([220, 180, 150]), PERSON)


def render_scene(seed: int, height: int = 96, width: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """One scene: ``(H, W, 3)`` uint8 image and ``(H, W)`` uint8 labels (classes 0..9).

    Example:
        >>> image, label = render_scene(0, 48, 64)
        >>> image.shape, label.shape, int(label.max()) < 10
        ((48, 64, 3), (48, 64), True)
    """
    rng = np.random.default_rng(seed)
    image, label, horizon = _background(rng, height, width)
    _objects(rng, image, label, horizon)
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(int(rng.integers(0, 3))):  # cast shadows across every class
        slope, offset = rng.uniform(-1.5, 1.5), rng.uniform(-0.3, 1.0) * width
        band = rng.uniform(0.1, 0.35) * width
        dist = xx - (offset + slope * (yy - height))
        image[(dist > 0) & (dist < band) & (yy > horizon * 0.6)] *= rng.uniform(0.45, 0.7)
    gain = rng.uniform(0.6, 1.3) * (1 + rng.uniform(-0.3, 0.3) * (xx / width - 0.5))
    cast = rng.uniform(0.85, 1.15, 3)
    image = image * gain[..., None] * cast + rng.normal(0, 7, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), label


def _key(seed: int, train: int, val: int, height: int, width: int) -> str:
    text = f"v{VERSION}-{seed}-{train}-{val}-{height}x{width}"
    return f"synthetic-{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def ensure_synthetic(
    cache_dir: Path | None = None,
    seed: int = 0,
    train: int = 300,
    val: int = 100,
    height: int = 96,
    width: int = 128,
    progress: bool = True,
) -> Path:
    """Generate the dataset once (atomically: a temporary folder renamed into place) and
    return its root; later calls with the same arguments return the cached copy."""
    from PIL import Image
    from tqdm.auto import tqdm

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = cache / _key(seed, train, val, height, width)
    if (root / "classes.txt").is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-synthetic-", dir=cache))
    try:
        jobs = [("train", i) for i in range(train)] + [("val", i) for i in range(val)]
        for split in ("train", "val"):
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "labels" / split).mkdir(parents=True)
        bar = tqdm(jobs, desc="generating synthetic scenes", unit="img", disable=not progress)
        for split, i in bar:
            scene_seed = seed * 1_000_003 + (0 if split == "train" else 500_000) + i
            image, label = render_scene(scene_seed, height, width)
            Image.fromarray(image).save(tmp / "images" / split / f"{i:05d}.png")
            Image.fromarray(label).save(tmp / "labels" / split / f"{i:05d}.png")
        (tmp / "classes.txt").write_text("\n".join(SYNTHETIC_CLASSES) + "\n")
        try:
            tmp.rename(root)
        except OSError:  # another process finished first
            if not (root / "classes.txt").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
