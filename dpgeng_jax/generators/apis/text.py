"""`text`: a simulator that renders each class as a glyph string.

Sim-PE's DrawText (Lin et al. 2025, arXiv 2502.05505) as a PE image API:
class c is drawn as its text (default the class index as a digit) in a
font shipped with a pip package (matplotlib's TTF files; a user directory
adds more), with a random size, aspect ratio, rotation, stroke width,
position, shear, elastic distortion, blur and ink/background levels,
rendered at 2-4x the data's resolution and area-averaged down to it, with
the data's channel count. Every image is a function of its parameters
(`Samples.state`), so a variation perturbs the parameters by a scale that
shrinks with the degree (DrawText's schedule: new-font probability degree,
size +-(2 + 4 degree)/28 of the canvas, rotation +-(3 + 8 degree) degrees,
stroke +-degree pixel at 28 px).

Marks (ours): each image also has `marks` slots for straight strokes that
are drawn over the glyph (ink) or cut out of it (erasing). `random` leaves
them empty; a variation moves the ends of the marks an image has and, with
probability `mark_rate`, adds one or switches one off. Such strokes are
where handwriting departs from fonts (a crossed 7, a flag on a 1, an open
4); the votes keep the images whose marks bring them closer to the private
data, so the population can leave the fonts' shapes.

Everything here is public: no private data is read.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import math
import os
import warnings

import jax
import numpy as np

from dpgeng_jax.errors import require_int
from dpgeng_jax.generators.apis import Samples, numpy_rng, strokes

# matplotlib fonts that have digit glyphs but draw something else for them
# (a code-point placeholder, TeX symbol and extension encodings).
_NOT_TEXT = ("LastResort", "cmex10", "cmsy10")
POLARITIES = ("light", "dark", "both")
MAX_MARKS = 16  # mark slots per image (each is drawn for every image)
WARP_POINTS = 4  # control points per axis of the elastic field


def shipped_font_files() -> list[str]:
  """The TTF files of matplotlib (installed with the package)."""
  import matplotlib
  return sorted(glob.glob(os.path.join(matplotlib.get_data_path(),
                                       "fonts", "ttf", "*.ttf")))


def usable_fonts(texts, font_dir: str = "",
                 stroke_fonts: bool = False) -> list[str]:
  """Font files that have a glyph for every character of `texts`: the
  shipped ones, any .ttf/.otf under `font_dir` and, with `stroke_fonts`,
  the Hershey stroke fonts that draw them (`strokes`, named
  "hershey:NAME")."""
  from matplotlib.ft2font import FT2Font
  files = [f for f in shipped_font_files()
           if not any(s in os.path.basename(f) for s in _NOT_TEXT)]
  own = []
  if font_dir:
    if not os.path.isdir(font_dir):
      raise ValueError(f"font directory {font_dir!r} does not exist")
    # os.walk does not follow links to folders (a recursive glob did, and
    # a link loop in the folder hung the run).
    for root, dirs, names in os.walk(font_dir):
      dirs.sort()
      # Regular files only: a FIFO named like a font blocked the run.
      own += [os.path.join(root, n) for n in sorted(names)
              if n.lower().endswith((".ttf", ".otf"))
              and os.path.isfile(os.path.join(root, n))]
  chars = sorted(set("".join(texts)) - {" "})
  usable, unreadable = [], 0
  for f in files + own:
    try:
      font = FT2Font(f)
    except (OSError, RuntimeError, ValueError):
      unreadable += f in own
      continue
    if all(font.get_char_index(ord(ch)) != 0 for ch in chars):
      usable.append(f)
  if font_dir and not set(own) & set(usable):
    # The report says the folder's fonts were used: none would have been.
    raise ValueError(
        f"no font under --pe-font-dir {font_dir!r} draws all of "
        f"{''.join(chars)!r} ({len(own)} .ttf/.otf files, {unreadable} of "
        "them unreadable)")
  if stroke_fonts:
    usable += strokes.usable(texts)
  if not usable:
    raise ValueError(f"no font has glyphs for all of {''.join(chars)!r}; "
                     "give a --pe-font-dir with suitable fonts")
  return usable


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Ranges of `random` (public hyperparameters)."""
  texts: tuple = ()              # per class; () means str(class index)
  font_dir: str = ""
  size: tuple = (0.8, 1.45)      # font size / canvas height (a digit
                                 # is ~0.72 of it: 0.58-1.04 of the
                                 # canvas, MNIST's box to a full frame)
  aspect: tuple = (0.6, 1.3)     # horizontal / vertical scale
  rotation: float = 15.0         # +- degrees
  stroke: tuple = (0.0, 0.06)    # stroke width / canvas
  shift: float = 0.08            # +- position / canvas
  shear: float = 0.25            # +- horizontal shear
  elastic: tuple = (0.0, 0.06)   # displacement amplitude / canvas
  blur: tuple = (0.0, 0.03)      # Gaussian sigma / canvas
  polarity: str = "light"        # light ink on dark, dark on light, both
  stroke_fonts: bool = False     # also the Hershey single-stroke fonts
  pen: float = 0.08              # stroke fonts: pen width / glyph height
                                 # is pen + 2 x stroke
  marks: int = 2                 # straight strokes a variation may add
                                 # or erase, per image (0: none)
  mark_rate: float = 0.15        # chance per variation to add or erase one
  mark_length: tuple = (0.1, 0.4)  # a new mark's length / canvas


def _visible(text: str) -> bool:
  """Whether `text` has a character that draws ink: not a space, nor a
  format (zero-width), control or combining-only character."""
  import unicodedata
  return any(unicodedata.category(ch)[0] not in "ZC"
             and unicodedata.category(ch) not in ("Mn", "Me")
             for ch in text)


class TextAPI:
  """The text simulator for images of `image_shape` and `num_classes`."""

  def __init__(self, image_shape, num_classes: int,
               cfg: TextConfig = TextConfig()):
    self.image_shape = tuple(image_shape)
    h, w, c = self.image_shape
    if c not in (1, 3):
      raise ValueError(f"the text API renders 1 or 3 channels, not {c}")
    texts = tuple(cfg.texts) or tuple(str(i) for i in range(num_classes))
    if len(texts) != num_classes:
      raise ValueError(f"{len(texts)} class texts for {num_classes} "
                       "classes")
    if not all(_visible(t) for t in texts):
      raise ValueError("every class text must have a visible character "
                       "(spaces, zero-width and control characters draw "
                       "nothing)")
    same = sorted({t for t in texts if texts.count(t) > 1})
    if same:
      # Public choices, but such classes' samples are the same glyphs:
      # their votes cannot tell the classes apart.
      warnings.warn(f"classes share the texts {same}: the text API draws "
                    "the same glyphs for them", stacklevel=2)
    if cfg.polarity not in POLARITIES:
      raise ValueError(f"polarity must be one of {POLARITIES}")
    require_int(cfg.marks, "marks", 0)
    if cfg.marks > MAX_MARKS:
      raise ValueError(f"marks must be <= {MAX_MARKS}, got {cfg.marks}")
    if not 0.0 <= cfg.mark_rate <= 1.0:
      raise ValueError(f"mark_rate must be in [0, 1], got {cfg.mark_rate}")
    lo, hi = cfg.mark_length
    if not 0.0 <= lo <= hi <= 2.0:
      raise ValueError(f"mark_length must be 0 <= low <= high <= 2, got "
                       f"{cfg.mark_length}")
    self.cfg, self.texts = cfg, texts
    self.fonts = usable_fonts(texts, cfg.font_dir, cfg.stroke_fonts)
    # Rendered at 2-4x the data's resolution, at least 32 px.
    self.scale = max(2, math.ceil(32 / max(h, w)))
    self.canvas = (h * self.scale, w * self.scale)

  # Parameters ----------------------------------------------------------

  def random(self, key: jax.Array, labels) -> Samples:
    labels = np.asarray(labels, np.int32)
    rng, n, c = numpy_rng(key), len(labels), self.cfg
    channels = self.image_shape[-1]
    light = {"light": np.ones(n, bool), "dark": np.zeros(n, bool),
             "both": rng.random(n) < 0.5}[c.polarity]
    ink = rng.uniform(0.8, 1.0, (n, channels))
    bg = rng.uniform(0.0, 0.2, (n, channels))
    if channels == 3:  # colours: any pair with enough contrast
      ink = rng.uniform(0.0, 1.0, (n, 3))
      bg = np.clip(ink + rng.choice([-1, 1], (n, 1)) * rng.uniform(
          0.4, 0.8, (n, 3)), 0, 1)
    else:
      ink, bg = np.where(light[:, None], ink, bg), np.where(
          light[:, None], bg, ink)
    state = {
        "font": rng.integers(0, len(self.fonts), n),
        "size": rng.uniform(*c.size, n),
        "aspect": np.exp(rng.uniform(*np.log(c.aspect), n)),
        "rotation": rng.uniform(-c.rotation, c.rotation, n),
        "stroke": rng.uniform(*c.stroke, n),
        "shift": rng.uniform(-c.shift, c.shift, (n, 2)),
        "shear": rng.uniform(-c.shear, c.shear, n),
        "elastic": rng.uniform(*c.elastic, n),
        "elastic_seed": rng.integers(0, 2 ** 31, n),
        "blur": rng.uniform(*c.blur, n),
        "ink": ink, "bg": bg,
    }
    if c.marks:  # (x0, y0, x1, y1, width, kind); kind 0 off, 1 ink, -1 erase
      state["marks"] = np.zeros((n, c.marks, 6))
    return Samples(self.render(labels, state), labels, state)

  def variation(self, key: jax.Array, samples: Samples,
                degree: float) -> Samples:
    rng, d, c = numpy_rng(key), float(np.clip(degree, 0.0, 1.0)), self.cfg
    s = {k: np.array(v, copy=True) for k, v in samples.state.items()}
    n = len(samples.labels)

    def jitter(name, scale, lo=None, hi=None):
      v = s[name] + rng.uniform(-scale, scale, s[name].shape)
      s[name] = np.clip(v, lo, hi) if lo is not None else v

    new_font = rng.random(n) < d
    s["font"] = np.where(new_font, rng.integers(0, len(self.fonts), n),
                         s["font"])
    jitter("size", (2 + 4 * d) / 28, 0.4, 1.6)
    s["aspect"] = np.clip(s["aspect"] * np.exp(rng.uniform(
        -1, 1, n) * (0.03 + 0.1 * d)), 0.4, 2.0)
    jitter("rotation", 3 + 8 * d, -3 * c.rotation, 3 * c.rotation)
    jitter("stroke", d / 28, 0.0, 0.12)
    jitter("shift", 0.02 + 0.04 * d, -0.2, 0.2)
    jitter("shear", 0.05 + 0.1 * d, -0.6, 0.6)
    jitter("elastic", 0.01 + 0.02 * d, 0.0, 0.12)
    reseed = rng.random(n) < d
    s["elastic_seed"] = np.where(reseed, rng.integers(0, 2 ** 31, n),
                                 s["elastic_seed"])
    jitter("blur", 0.01 * (0.5 + d), 0.0, 0.06)
    jitter("ink", 0.1 * d, 0.0, 1.0)
    jitter("bg", 0.1 * d, 0.0, 1.0)
    if "marks" in s:
      s["marks"] = self._vary_marks(rng, s["marks"], d)
    return Samples(self.render(samples.labels, s), samples.labels, s)

  def _vary_marks(self, rng, marks, d):
    """Moves every mark's ends by up to (0.03 + 0.1 d) of the canvas; then,
    with probability mark_rate, one of the image's slots is redrawn: a new
    ink or erasing stroke (a free slot first; centre in the middle 70 % of
    the canvas, any direction, length in mark_length) or, half the time
    when all are taken, an existing one switched off."""
    m = marks.copy()
    n, slots = m.shape[:2]
    on = m[..., 5] != 0
    move = rng.uniform(-1, 1, (n, slots, 4)) * (0.03 + 0.1 * d)
    m[..., :4] = np.clip(m[..., :4] + np.where(on[..., None], move, 0), 0, 1)
    change = rng.random(n) < self.cfg.mark_rate
    free = ~on
    slot = np.where(free.any(1), np.argmax(free, 1),
                    rng.integers(0, slots, n))
    add = change & (free.any(1) | (rng.random(n) < 0.5))
    centre = rng.uniform(0.15, 0.85, (n, 2))
    angle = rng.uniform(0, np.pi, n)
    half = 0.5 * rng.uniform(*self.cfg.mark_length, n)[:, None] * np.stack(
        [np.cos(angle), np.sin(angle)], 1)
    new = np.concatenate([np.clip(centre - half, 0, 1),
                          np.clip(centre + half, 0, 1),
                          rng.uniform(0.04, 0.12, (n, 1)),
                          rng.choice([-1.0, 1.0], (n, 1))], 1)
    rows = np.arange(n)
    m[rows[add], slot[add]] = new[add]
    off = change & ~add
    m[rows[off], slot[off], 5] = 0.0
    return m

  # Rendering -----------------------------------------------------------

  @functools.lru_cache(maxsize=1024)
  def _font(self, index: int, size: int):
    from PIL import ImageFont
    return ImageFont.truetype(self.fonts[index], size)

  @functools.lru_cache(maxsize=4096)
  def _outline_glyph(self, index: int, size: int, stroke: int, text: str):
    """(the text in font `index` at `size` px with a `stroke` px outline,
    on a 2 px margin; its width; its height): a population repeats these
    (whole pixels of size and stroke), so they are drawn once."""
    from PIL import Image, ImageDraw
    font = self._font(index, size)
    l, t, r, b = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox(
        (0, 0), text, font=font, stroke_width=stroke)
    gw, gh = max(1, r - l), max(1, b - t)
    glyph = Image.new("L", (gw + 4, gh + 4), 0)
    ImageDraw.Draw(glyph).text((2 - l, 2 - t), text, fill=255, font=font,
                               stroke_width=stroke, stroke_fill=255)
    return glyph, gw, gh

  def render(self, labels, state) -> np.ndarray:
    """(n, H, W, C) float32 in [0, 1] from the parameters."""
    h, w, _ = self.image_shape
    masks = np.stack([self._mask(int(y), {k: v[i] for k, v in state.items()})
                      for i, y in enumerate(labels)])
    ink = np.asarray(state["ink"], np.float32)[:, None, None, :]
    bg = np.asarray(state["bg"], np.float32)[:, None, None, :]
    out = bg + (ink - bg) * masks[..., None]
    return np.clip(out, 0.0, 1.0).astype(np.float32).reshape(
        len(labels), h, w, -1)

  def _draw_marks(self, m, marks):
    from PIL import Image, ImageDraw
    ch, cw = self.canvas
    for kind in (1.0, -1.0):
      sel = marks[marks[:, 5] == kind]
      if not len(sel):
        continue
      layer = Image.new("L", (cw, ch), 0)
      draw = ImageDraw.Draw(layer)
      for x0, y0, x1, y1, width, _ in sel:
        draw.line([(x0 * cw, y0 * ch), (x1 * cw, y1 * ch)], fill=255,
                  width=max(1, int(round(width * ch))))
      ink = np.asarray(layer, np.float32) / 255.0
      m = np.maximum(m, ink) if kind > 0 else m * (1.0 - ink)
    return m

  @functools.cached_property
  def _warp_basis(self) -> np.ndarray:
    """(WARP_POINTS^2, H, W) on the canvas: the cubic-spline upsampling
    (`ndimage.zoom`, order 3) of each control point's unit displacement.
    Zoom is linear, so an elastic field is these weighted by its control
    points: one small matmul per image instead of two spline fits."""
    from scipy import ndimage
    ch, cw = self.canvas
    unit = np.eye(WARP_POINTS ** 2).reshape(-1, WARP_POINTS, WARP_POINTS)
    return np.stack([ndimage.zoom(u, (ch / WARP_POINTS, cw / WARP_POINTS),
                                  order=3)[:ch, :cw] for u in unit])

  @functools.cached_property
  def _pixel_grid(self) -> np.ndarray:
    """(2, H, W) float32: the canvas's row and column coordinates."""
    ch, cw = self.canvas
    return np.mgrid[0:ch, 0:cw].astype(np.float32)

  def _mask(self, label: int, p: dict) -> np.ndarray:
    """The glyph coverage of one image in [0, 1], at the data's size."""
    from PIL import Image
    from scipy import ndimage
    ch, cw = self.canvas
    text = self.texts[label]
    size = max(4, int(round(float(p["size"]) * ch)))
    name = self.fonts[int(p["font"])]
    if strokes.is_stroke_font(name):
      # Paths scaled to a digit's height in an outline font of this size.
      height = max(3, int(round(0.72 * size)))
      pen = max(1, int(round((self.cfg.pen + 2 * float(p["stroke"]))
                             * height)))
      glyph = strokes.draw(name, text, height, pen)
      gw, gh = glyph.size[0] - 4, glyph.size[1] - 4
    else:
      glyph, gw, gh = self._outline_glyph(
          int(p["font"]), size, int(round(float(p["stroke"]) * ch)), text)
    # Output -> glyph coordinates: the inverse of shift . rotate . shear .
    # fit (wide strings are shrunk to the canvas width).
    aspect = float(p.get("aspect", 1.0))
    fit = min(1.0, 0.92 * cw / (gw * aspect), 0.92 * ch / gh * 1.15)
    th = math.radians(float(p["rotation"]))
    rot = np.array([[math.cos(th), -math.sin(th)],
                    [math.sin(th), math.cos(th)]])
    shear = np.array([[1.0, float(p["shear"])], [0.0, 1.0]])
    stretch = np.diag([aspect, 1.0])
    inv = np.linalg.inv(fit * rot @ shear @ stretch)
    centre_out = np.array([cw / 2, ch / 2]) + np.asarray(
        p["shift"], float) * np.array([cw, ch])
    centre_in = np.array([(gw + 4) / 2, (gh + 4) / 2])
    off = centre_in - inv @ centre_out
    img = glyph.transform((cw, ch), Image.AFFINE,
                          (inv[0, 0], inv[0, 1], off[0],
                           inv[1, 0], inv[1, 1], off[1]),
                          resample=Image.BILINEAR)
    m = np.asarray(img, np.float32) / 255.0
    if "marks" in p:
      m = self._draw_marks(m, np.asarray(p["marks"]))
    amp = float(p["elastic"]) * ch
    if amp > 0:
      grid = np.random.default_rng(int(p["elastic_seed"])).uniform(
          -1, 1, (2, WARP_POINTS ** 2)) * amp
      coords = self._pixel_grid + np.tensordot(grid, self._warp_basis, 1)
      m = ndimage.map_coordinates(m, coords, order=1, mode="constant")
    sigma = float(p["blur"]) * ch
    if sigma > 0.05:
      m = ndimage.gaussian_filter(m, sigma)
    small = Image.fromarray(m.astype(np.float32), mode="F").resize(
        (self.image_shape[1], self.image_shape[0]), Image.BOX)
    return np.clip(np.asarray(small, np.float32), 0.0, 1.0)
