"""Single-stroke (Hershey) fonts for the text simulator.

An outline font draws a glyph with the thickness its designer gave it; a
stroke font is a set of pen paths, drawn here with a pen whose width the
simulator chooses, which is how handwriting is made. The Hershey fonts
(A. V. Hershey's vector fonts of 1967, shipped in the MIT-licensed
`hershey-fonts` pip package) give simplex, duplex and script styles of
the Latin letters and digits. `TextAPI` mixes them with the outline
fonts: a font index names either kind, and PE's votes pick among them.

Everything here is public: no private data is read.
"""

from __future__ import annotations

import functools

PREFIX = "hershey:"
# The Hershey fonts that draw the Latin letters and digits as themselves
# (the Greek, Cyrillic, Japanese, symbol and blackletter sets do not).
FONTS = ("futural", "futuram", "cursive", "scripts", "scriptc", "rowmans",
         "rowmand", "rowmant", "timesr", "timesi", "timesrb", "timesib")
_REFERENCE = 100.0  # paths are read at this glyph height, then scaled


def is_stroke_font(name: str) -> bool:
  return name.startswith(PREFIX)


@functools.lru_cache(maxsize=None)
def _font(name: str):
  from HersheyFonts import HersheyFonts
  font = HersheyFonts()
  font.load_default_font(name)
  font.normalize_rendering(_REFERENCE)
  return font


@functools.lru_cache(maxsize=4096)
def paths(name: str, text: str) -> tuple:
  """The pen paths of `text` in font `name` (a PREFIX name): a tuple of
  (m, 2) point tuples, x to the right and y DOWN, at glyph height ~100."""
  font = _font(name[len(PREFIX):])
  out = []
  for stroke in font.strokes_for_text(text):
    pts = tuple((float(x), -float(y)) for x, y in stroke)
    if len(pts) >= 2:
      out.append(pts)
  return tuple(out)


def usable(texts) -> list[str]:
  """The stroke fonts (PREFIX names) that draw every character of `texts`
  with at least one path; [] when the package is not installed."""
  try:
    import HersheyFonts  # noqa: F401
  except ImportError:
    return []
  chars = sorted(set("".join(texts)) - {" "})
  return [PREFIX + f for f in FONTS
          if all(paths(PREFIX + f, ch) for ch in chars)]


def draw(name: str, text: str, height: int, pen: int):
  """`text` drawn with a round pen `pen` pixels wide, scaled so that its
  paths span `height` pixels: a PIL "L" image with a 2-pixel margin beyond
  the ink, white (255) ink on black."""
  from PIL import Image, ImageDraw
  strokes = paths(name, text)
  xs = [x for s in strokes for x, _ in s]
  ys = [y for s in strokes for _, y in s]
  x0, y0 = min(xs), min(ys)
  scale = max(1, height - pen) / max(1e-6, max(ys) - y0)
  half = pen / 2.0
  width = int(round((max(xs) - x0) * scale + pen)) + 4
  tall = int(round((max(ys) - y0) * scale + pen)) + 4
  img = Image.new("L", (max(width, 5), max(tall, 5)), 0)
  canvas = ImageDraw.Draw(img)
  for s in strokes:
    pts = [(2 + half + (x - x0) * scale, 2 + half + (y - y0) * scale)
           for x, y in s]
    canvas.line(pts, fill=255, width=pen, joint="curve")
    for x, y in (pts[0], pts[-1]):   # round pen ends
      canvas.ellipse((x - half, y - half, x + half, y + half), fill=255)
  return img
