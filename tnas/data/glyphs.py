"""``glyphs``: an embedded demo dataset, rendered on first use from fonts that ship with matplotlib.

Each class is one character (Latin, digits, Greek, Cyrillic, Hebrew, Georgian, Armenian and
math/misc symbols, with look-alikes such as Latin ``o``/``O``/``0`` or Greek ``Α`` left out).
A character becomes a class only if at least two of the bundled fonts (DejaVu Sans/Serif/Mono,
STIX General, and Computer Modern for ASCII letters and digits) map it in their ``cmap`` and
render it with ink. Each image is the character in a random one of those fonts, with a random
stroke weight and a random affine jitter (rotation +-15 deg, scale 0.8-1.1, shear +-0.15,
shift +-8 %), white on black; with ``channels=3`` the ink and background get random colours.

Classes are split 60 / 20 / 20 % into train / val / test by a fixed permutation (seed
``SPLIT_SEED``, independent of the ``seed`` option), so the splits never share a class.
Images are rendered at twice ``img_size`` and box-downsampled. Everything is deterministic:
image j of class c depends only on (seed, c, images_per_class), never on worker count, so the
same installation gives identical bytes. (Another FreeType or matplotlib version may render
slightly different pixels or cover other characters; the cache fingerprint records both.)
"""
from __future__ import annotations

import functools
import importlib.util
import os
import unicodedata
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tnas.data.cache import RawSplit, SplitSource
from tnas.data.decode import default_workers, parallel_map
from tnas.errors import TnasError

__all__ = ["GLYPH_VERSION", "SPLIT_SEED", "glyph_classes", "glyph_split_classes", "find_glyphs", "render_class"]

GLYPH_VERSION = 1
SPLIT_SEED = 20200426
SPLIT_FRACTIONS = (0.6, 0.2)  # train, val; test gets the rest

UNICODE_FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
)
# Computer Modern text fonts: their cmaps are reliable for ASCII letters and digits only.
ASCII_FONTS = ("cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmti10.ttf", "cmtt10.ttf")
ASCII_ALNUM = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")

# Candidate characters; look-alikes across and within groups are left out on purpose (e.g. Cyrillic Ze,
# Georgian vin and Armenian yi all look like the digit 3; Armenian pyur looks like Greek Phi).
CHARACTER_GROUPS = (
    ("latin upper", "ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
    ("latin lower", "abdefghijkmnpqrty"),
    ("digits", "23456789"),
    ("greek upper", "ΓΔΘΛΞΠΣΦΨΩ"),
    ("greek lower", "αβγδεζηθλμξπσςτφψω"),
    ("cyrillic upper", "БДЖИЙЛЦЧШЩЪЫЬЭЮЯ"),
    ("hebrew", "אבגדהזטיכלמנסעפצקשת"),
    ("georgian", "აბგდეთილმპჟრსტუფქღყშჩცძწჭხჯჰ"),
    ("armenian", "ԱԲԴԵԷԸԹԺԻԽԾԿՀՁՂՃՄՆՇՉՊՋՌՑՔՖ"),
    ("symbols", "∀∃∂∇∞∫√≈≠≤≥⊂⊃⊕⊗±÷∠⊥ℵ℘ℜℑ←→↑↓↔⇒⇔♠♣♥♦¶†‡★☆@#%&?€£©®∮∴∵≡≅⊆⊇∉⊞⊠⊢⌈⌊⌂♪♫☺☻☼♀♂✓⊙⊘⊛⊲⊳"),
)

_MIN_FONTS = 2
_BASE_FILL = 0.6  # the glyph's longer side covers 60 % of the image before jitter


def font_directory() -> str:
    """matplotlib's bundled TrueType fonts (found without importing matplotlib)."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or spec.origin is None:
        raise TnasError("the glyphs dataset needs matplotlib's bundled fonts, but matplotlib is not installed")
    return os.path.join(os.path.dirname(spec.origin), "mpl-data", "fonts", "ttf")


def _font_paths() -> List[str]:
    directory = font_directory()
    paths = [os.path.join(directory, f) for f in UNICODE_FONTS + ASCII_FONTS]
    present = [p for p in paths if os.path.isfile(p)]
    if len(present) < _MIN_FONTS:
        raise TnasError(f"the glyphs dataset needs the TrueType fonts in {directory}; found {len(present)} of them")
    return present


def fonts_fingerprint() -> str:
    import hashlib

    import PIL
    from PIL import features

    digest = hashlib.sha1(f"glyphs-v{GLYPH_VERSION}:{PIL.__version__}:{features.version('freetype2')}".encode())
    for path in _font_paths():
        digest.update(f"{os.path.basename(path)}:{os.path.getsize(path)};".encode())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=64)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size, layout_engine=ImageFont.Layout.BASIC)


def _render_crop(char: str, path: str, size: int, stroke: int) -> np.ndarray:
    """The character rendered white on black at font ``size``, cropped to its ink (float32 0..255)."""
    font = _font(path, size)
    left, top, right, bottom = font.getbbox(char, stroke_width=stroke)
    width, height = max(1, right - left) + 4, max(1, bottom - top) + 4
    image = Image.new("L", (width, height), 0)
    ImageDraw.Draw(image).text((2 - left, 2 - top), char, font=font, fill=255, stroke_width=stroke, stroke_fill=255)
    array = np.asarray(image)
    rows = np.flatnonzero(array.max(axis=1) > 32)
    cols = np.flatnonzero(array.max(axis=0) > 32)
    if rows.size == 0 or cols.size == 0:
        return np.zeros((0, 0), np.uint8)
    return array[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


@functools.lru_cache(maxsize=1)
def glyph_classes() -> Tuple[Tuple[str, Tuple[str, ...]], ...]:
    """All classes as (character, font paths that render it), in a fixed order."""
    from fontTools.ttLib import TTFont

    fonts = _font_paths()
    cmaps = {}
    for path in fonts:
        try:
            cmaps[path] = set(TTFont(path, lazy=True).getBestCmap() or {})
        except Exception:  # a broken font file: just do not use it
            cmaps[path] = set()
    classes = []
    seen = set()
    for _, characters in CHARACTER_GROUPS:
        for char in characters:
            if char in seen:
                continue
            seen.add(char)
            usable = []
            for path in fonts:
                if os.path.basename(path) in ASCII_FONTS and char not in ASCII_ALNUM:
                    continue
                if ord(char) not in cmaps[path]:
                    continue
                crop = _render_crop(char, path, 32, 0)
                if crop.size and int((crop > 128).sum()) >= 6:
                    usable.append(path)
            if len(usable) >= _MIN_FONTS:
                classes.append((char, tuple(usable)))
    if len(classes) < 15:
        raise TnasError(f"the glyphs dataset found only {len(classes)} renderable characters in {font_directory()}")
    return tuple(classes)


def glyph_class_name(char: str) -> str:
    return f"U+{ord(char):04X} {unicodedata.name(char, 'UNNAMED')}"


def glyph_split_classes(split: str) -> List[int]:
    """Global class ids of a split (sorted); train / val / test are disjoint and cover all classes."""
    total = len(glyph_classes())
    permutation = np.random.default_rng(SPLIT_SEED).permutation(total)
    n_train = int(round(total * SPLIT_FRACTIONS[0]))
    n_val = int(round(total * SPLIT_FRACTIONS[1]))
    parts = {"train": permutation[:n_train], "val": permutation[n_train:n_train + n_val],
             "test": permutation[n_train + n_val:]}
    return sorted(int(c) for c in parts[split])


def _affine(crop_shape: Tuple[int, int], canvas: int, rng: np.random.Generator) -> Tuple[float, ...]:
    """PIL AFFINE coefficients (output -> input) for a random jitter of a crop onto the canvas."""
    height, width = crop_shape
    angle = np.deg2rad(rng.uniform(-15.0, 15.0))
    scale = rng.uniform(0.8, 1.1) * _BASE_FILL * canvas / max(height, width)
    shear = rng.uniform(-0.15, 0.15)
    shift = rng.uniform(-0.08, 0.08, size=2) * canvas
    cos, sin = np.cos(angle), np.sin(angle)
    forward = scale * np.array([[cos, -sin], [sin, cos]]) @ np.array([[1.0, shear], [0.0, 1.0]])
    inverse = np.linalg.inv(forward)
    centre_in = np.array([width / 2.0, height / 2.0])
    centre_out = np.array([canvas / 2.0, canvas / 2.0]) + shift
    offset = centre_in - inverse @ centre_out
    return (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])


def render_class(job: Tuple[int, int, int, int, int]) -> np.ndarray:
    """All images of one class: job = (class id, images per class, img_size, channels, seed)."""
    class_id, count, img_size, channels, seed = job
    char, fonts = glyph_classes()[class_id]
    rng = np.random.default_rng([seed, GLYPH_VERSION, class_id])
    canvas = 2 * img_size
    font_size = canvas
    stroke_levels = (0, int(round(font_size / 56)), int(round(1.5 * font_size / 56)))
    out = np.empty((count, img_size, img_size, channels), np.uint8)
    crops: Dict[Tuple[str, int], Image.Image] = {}
    for index in range(count):
        path = fonts[int(rng.integers(len(fonts)))]
        stroke = stroke_levels[int(rng.integers(0, 3))]
        key = (path, stroke)
        if key not in crops:
            crops[key] = Image.fromarray(_render_crop(char, path, font_size, stroke))
        crop = crops[key]
        coefficients = _affine((crop.height, crop.width), canvas, rng)
        image = crop.transform((canvas, canvas), Image.Transform.AFFINE, coefficients,
                               resample=Image.Resampling.BILINEAR, fillcolor=0).reduce(2)
        gray = np.asarray(image, dtype=np.uint8)
        if channels == 1:
            out[index, ..., 0] = gray
        else:
            ink = rng.integers(150, 256, size=3)
            background = rng.integers(0, 100, size=3)
            alpha = gray[..., None].astype(np.float32) / 255.0
            out[index] = np.rint(background + (ink - background) * alpha).astype(np.uint8)
    return out


def _check_options(options: Dict[str, Any]) -> Tuple[int, int]:
    images_per_class = options.get("images_per_class", 20)
    seed = options.get("seed", 0)
    if not isinstance(images_per_class, (int, np.integer)) or not 2 <= int(images_per_class) <= 10000:
        raise TnasError(f"glyphs: images_per_class must be an integer in 2..10000, got {images_per_class!r}")
    if not isinstance(seed, (int, np.integer)) or int(seed) < 0:
        raise TnasError(f"glyphs: seed must be a non-negative integer, got {seed!r}")
    return int(images_per_class), int(seed)


def find_glyphs(root: Optional[str], split: str, options: Dict[str, Any]) -> SplitSource:
    images_per_class, seed = _check_options(options)
    fingerprint = fonts_fingerprint()

    def load() -> RawSplit:
        class_ids = glyph_split_classes(split)
        names = [glyph_class_name(glyph_classes()[c][0]) for c in class_ids]
        labels = np.repeat(np.arange(len(class_ids), dtype=np.int64), images_per_class)

        def generate(out: np.ndarray, num_workers: Optional[int], progress: Optional[bool]) -> None:
            img_size, channels = out.shape[1], out.shape[3]
            jobs = [(c, images_per_class, img_size, channels, seed) for c in class_ids]
            parallel = len(jobs) * images_per_class * img_size * img_size >= 1000 * 28 * 28
            blocks = parallel_map(render_class, jobs, num_workers, parallel and default_workers() > 1)
            for position, block in enumerate(blocks):
                out[position * images_per_class:(position + 1) * images_per_class] = block

        return RawSplit(labels, names, "glyphs (rendered from matplotlib's fonts)", generate=generate)

    return SplitSource(fingerprint, f"glyphs rendered from {font_directory()}", load)
