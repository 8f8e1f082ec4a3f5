"""Drawing pairs, masks and correspondences: the one drawing module of segswap.

Every picture the project makes is drawn here: ``segswap-show`` (generated pairs, segment files),
``segswap-predict`` (one predicted pair), the discovery cluster sheets and the validation sheets the
trainer writes at every validation step. Importable as ``segswap.viz``.

Conventions (the same everywhere in segswap):

- images are uint8 RGB arrays ``[H, W, 3]``;
- masks are ``[h, w]`` arrays at any resolution (pixels or the 16-px feature grid): boolean / {0, 255}
  for ground truth, floats in [0, 1] for predictions; they are resized to the image they are drawn on;
- correspondences are normalised ``(x, y)`` positions in [0, 1] of the *other* image, x to the right,
  y down; a grid cell (i, j) of an ``[h, w]`` field sits at ``((j + 0.5) / w, (i + 0.5) / h)``;
- a *line* is ``(x0, y0, x1, y1)``: a point of image 0 and its match in image 1, both normalised.

Only numpy and OpenCV are used, so drawing works wherever segswap is installed.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

from segswap.core.images import write_png  # noqa: F401 - re-exported: segswap.viz.write_png is public

MASK_COLOURS = ((60, 220, 60), (230, 60, 230))  # RGB: image 0 green, image 1 magenta
PREDICTION_COLOUR = (255, 0, 0)                   # RGB: predicted repeated region
OVERLAY_ALPHA = 0.45
OUTSIDE_DIM = 0.6  # darken what is not repeated so the masks read at a glance
GAP = 4
HEADER = 18
WHITE = 255


# ------------------------------------------------------------------------------------------ colours

def hue_colour(k: int, n: int) -> tuple[int, int, int]:
    """The k-th of n hues spread round the colour wheel, as an RGB triple (line k of a sheet)."""
    hue = int(180 * k / max(n, 1)) % 180
    return tuple(int(c) for c in cv2.cvtColor(np.uint8([[[hue, 255, 255]]]), cv2.COLOR_HSV2RGB)[0, 0])


def palette(k: int) -> tuple[int, int, int]:
    """A distinct RGB colour for rank k when the count is open-ended (segments of one image)."""
    hue = (k * 47) % 180  # spread hues so neighbouring ranks differ
    return tuple(int(c) for c in cv2.cvtColor(np.uint8([[[hue, 220, 255]]]), cv2.COLOR_HSV2RGB)[0, 0])


# ------------------------------------------------------------------------------------------ masks

def fit(img: np.ndarray, size: int | tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Resize an image or mask to ``size`` (side, or (width, height)); area filter when shrinking."""
    w, h = (size, size) if isinstance(size, int) else size
    if img.shape[1] == w and img.shape[0] == h:
        return img
    if nearest:
        interp = cv2.INTER_NEAREST
    else:
        interp = cv2.INTER_AREA if img.shape[0] >= h and img.shape[1] >= w else cv2.INTER_LINEAR
    return cv2.resize(img, (w, h), interpolation=interp)


def overlay_mask(img: np.ndarray, mask: np.ndarray, colour, alpha: float = OVERLAY_ALPHA,
                 dim: float = OUTSIDE_DIM) -> np.ndarray:
    """Ground-truth style: tint the masked pixels, dim the rest and outline the mask.

    img: uint8 [H, W, 3]; mask: [h, w], nonzero (floats: > 0.5) = inside, resized to the image (nearest).
    """
    m = np.asarray(mask)
    on = (m > 0.5) if m.dtype.kind == "f" else (m > 0)  # soft grid masks: inside above one half
    on = fit(on.astype(np.uint8), (img.shape[1], img.shape[0]), nearest=True) > 0
    out = img.astype(np.float32)
    out[on] = (1 - alpha) * out[on] + alpha * np.asarray(colour, np.float32)
    out[~on] *= dim
    out = out.astype(np.uint8)
    contours, _ = cv2.findContours(on.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, tuple(int(c) for c in colour), 1, cv2.LINE_AA)
    return out


def tint(img: np.ndarray, prob: np.ndarray, colour=PREDICTION_COLOUR, strength: float = 0.6) -> np.ndarray:
    """Prediction style: blend ``colour`` in with the soft mask as opacity (no threshold, no outline).

    img: uint8 [H, W, 3]; prob: float [h, w] in [0, 1] (resized to the image, bilinear).
    """
    alpha = fit(np.asarray(prob, np.float32), (img.shape[1], img.shape[0]))[..., None]
    alpha = np.clip(alpha, 0.0, 1.0) * strength
    return (img.astype(np.float32) * (1 - alpha) + np.asarray(colour, np.float32) * alpha).astype(np.uint8)


# ---------------------------------------------------------------------------------- correspondences

def sample_lines(flow01: np.ndarray, n: int, rng: np.random.Generator,
                 where: np.ndarray | None = None) -> list[tuple[float, float, float, float]]:
    """Up to ``n`` lines ``(x0, y0, x1, y1)`` from the cells of ``flow01`` [h, w, 2].

    Candidates are the cells with a finite flow and, if ``where`` [h, w] (bool) is given, where it is
    true; the pick is uniform without replacement, from ``rng``.
    """
    flow = np.asarray(flow01, np.float32)
    ok = np.isfinite(flow[..., 0])
    if where is not None:
        ok &= np.asarray(where, bool)
    rows, cols = np.nonzero(ok)
    if not len(rows) or n <= 0:
        return []
    pick = rng.choice(len(rows), size=min(n, len(rows)), replace=False)
    return lines_at(flow, rows[pick], cols[pick])


def lines_at(flow01: np.ndarray, rows, cols) -> list[tuple[float, float, float, float]]:
    """Lines from the centres of the given cells of ``flow01`` [h, w, 2] to where the flow sends them."""
    gh, gw = flow01.shape[:2]
    return [((c + 0.5) / gw, (r + 0.5) / gh, float(flow01[r, c, 0]), float(flow01[r, c, 1]))
            for r, c in zip(rows, cols)]


def draw_lines(canvas: np.ndarray, lines, size0: tuple[int, int], offset1: tuple[int, int],
               size1: tuple[int, int] | None = None, n_colours: int | None = None) -> np.ndarray:
    """Draw lines (in place) on a canvas holding image 0 at (0, 0) and image 1 at ``offset1`` (x, y).

    size0 / size1: (width, height) of the two panels on the canvas (size1 defaults to size0). Line k
    gets hue k of ``n_colours`` (default: the number of lines), so two panels drawn with the same
    cells in the same order share colours.
    """
    w0, h0 = size0
    w1, h1 = size1 or size0
    n = n_colours or max(len(lines), 1)
    for k, (x0, y0, x1, y1) in enumerate(lines):
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
            continue
        colour = hue_colour(k, n)
        a = (int(x0 * w0), int(y0 * h0))
        b = (int(x1 * w1) + offset1[0], int(y1 * h1) + offset1[1])
        cv2.line(canvas, a, b, colour, 1, cv2.LINE_AA)
        cv2.circle(canvas, a, 3, colour, -1, cv2.LINE_AA)
        cv2.circle(canvas, b, 3, colour, -1, cv2.LINE_AA)
    return canvas


# ---------------------------------------------------------------------------------- panels and sheets

def label(panel: np.ndarray, text: str, height: int = HEADER) -> np.ndarray:
    """Add a white title bar of ``height`` px above a panel."""
    head = np.full((height, panel.shape[1], 3), WHITE, np.uint8)
    cv2.putText(head, text, (3, height - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([head, panel], axis=0)


def side_by_side(im0: np.ndarray, im1: np.ndarray, lines=(), gap: int = GAP,
                 n_colours: int | None = None) -> np.ndarray:
    """[image 0 | gap | image 1] (same height) with ``lines`` drawn from image 0 into image 1."""
    sep = np.full((im0.shape[0], gap, 3), WHITE, np.uint8)
    canvas = np.ascontiguousarray(np.concatenate([im0, sep, im1], axis=1))
    return draw_lines(canvas, lines, (im0.shape[1], im0.shape[0]), (im0.shape[1] + gap, 0),
                      (im1.shape[1], im1.shape[0]), n_colours)


def hconcat(panels: list[np.ndarray], gap: int = 2 * GAP) -> np.ndarray:
    """Panels of one height left to right with white gaps."""
    sep = np.full((panels[0].shape[0], gap, 3), WHITE, np.uint8)
    parts = [p for panel in panels for p in (panel, sep)][:-1]
    return np.concatenate(parts, axis=1)


def vstack(rows: list[np.ndarray], gap: int = GAP) -> np.ndarray:
    """Rows top to bottom, each padded on the right to the widest and followed by a white gap."""
    if not rows:
        raise ValueError("nothing to draw")
    width = max(r.shape[1] for r in rows)
    return np.concatenate([np.pad(r, ((0, gap), (0, width - r.shape[1]), (0, 0)), constant_values=WHITE)
                           for r in rows], axis=0)


def grid(tiles: list[np.ndarray], columns: int, gap: int = GAP) -> np.ndarray:
    """Equal-sized tiles in a grid of ``columns``, white gaps round every tile."""
    if not tiles:
        raise ValueError("nothing to draw")
    th, tw = tiles[0].shape[:2]
    cols = min(columns, len(tiles))
    rows = math.ceil(len(tiles) / cols)
    sheet = np.full((rows * (th + gap) + gap, cols * (tw + gap) + gap, 3), WHITE, np.uint8)
    for k, t in enumerate(tiles):
        r, c = divmod(k, cols)
        y, x = gap + r * (th + gap), gap + c * (tw + gap)
        sheet[y:y + th, x:x + tw] = t
    return sheet


# ------------------------------------------------------------------------------------ pair pictures

def ground_truth_panel(img0, img1, mask0, mask1, lines, tile: int, n_colours: int | None = None) -> np.ndarray:
    """Both images at ``tile`` px with ground-truth masks (green / magenta) and correspondence lines."""
    p0 = overlay_mask(fit(img0, tile), mask0, MASK_COLOURS[0])
    p1 = overlay_mask(fit(img1, tile), mask1, MASK_COLOURS[1])
    return side_by_side(p0, p1, lines, n_colours=n_colours)


def prediction_panel(img0, img1, mask0, mask1, lines, tile: int | None = None, gap: int = GAP,
                     n_colours: int | None = None) -> np.ndarray:
    """Both images (resized to ``tile`` px if given) tinted red by the predicted soft masks, with lines."""
    if tile:
        img0, img1 = fit(img0, tile), fit(img1, tile)
    return side_by_side(tint(img0, mask0), tint(img1, mask1), lines, gap=gap, n_colours=n_colours)


def prediction_lines(mask0: np.ndarray, flow01: np.ndarray, n: int, threshold: float,
                     rng: np.random.Generator) -> list[tuple[float, float, float, float]]:
    """Up to ``n`` predicted lines from the cells whose predicted mask0 exceeds ``threshold``."""
    return sample_lines(flow01, n, rng, where=np.asarray(mask0) > threshold)


def pair_sheet_row(img0, img1, gt: dict, pred: dict, tile: int, n_lines: int, rng: np.random.Generator,
                   title: str = "") -> np.ndarray:
    """One validation-sheet row: ground truth beside the prediction, lines from the same cells.

    gt: ``mask0, mask1`` [h, w], ``flow01`` [h, w, 2] and ``weight01`` [h, w] (cells with a true match);
    pred: ``mask0, mask1`` [h, w] in [0, 1] and ``flow01`` [h, w, 2]. The lines start at up to
    ``n_lines`` ground-truth cells; line k has the same colour in both panels, so a predicted
    correspondence can be compared with its true one at a glance.
    """
    cells = np.argwhere(np.asarray(gt["weight01"]) > 0.5)
    if len(cells) > n_lines:
        cells = cells[np.sort(rng.choice(len(cells), n_lines, replace=False))]
    rows, cols = cells[:, 0], cells[:, 1]
    n = max(len(cells), 1)
    left = ground_truth_panel(img0, img1, gt["mask0"], gt["mask1"], lines_at(gt["flow01"], rows, cols), tile, n)
    right = prediction_panel(img0, img1, pred["mask0"], pred["mask1"],
                             lines_at(np.asarray(pred["flow01"]), rows, cols), tile, n_colours=n)
    return hconcat([label(left, f"{title} ground truth"), label(right, "prediction (red: mask, lines: flow01)")])


# ---------------------------------------------------------------------------------- segments, regions

def segment_tile(rgb: np.ndarray, masks: list[np.ndarray], labels: list[tuple[str, tuple[float, float]]],
                 title: str, tile_height: int, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """One image with its segments filled in distinct colours, outlined and labelled; a title above.

    masks: boolean [H, W] per segment (rank order); labels: (text, (x, y) in image pixels) per segment.
    """
    overlay = rgb.copy()
    outlines = []
    for k, mask in enumerate(masks):
        if mask.shape != rgb.shape[:2]:
            mask = fit(mask.astype(np.uint8), (rgb.shape[1], rgb.shape[0]), nearest=True) > 0
        overlay[mask] = palette(k)
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        outlines.append(contours)
    out = cv2.addWeighted(overlay, alpha, rgb, 1.0 - alpha, 0.0)
    scale = tile_height / out.shape[0]
    out = cv2.resize(out, (max(1, round(out.shape[1] * scale)), tile_height), interpolation=cv2.INTER_AREA)
    for k, (contours, (text, (x, y))) in enumerate(zip(outlines, labels)):
        colour = palette(k)
        cv2.drawContours(out, [np.round(c * scale).astype(np.int32) for c in contours], -1, colour, 2)
        org = (int(x * scale) + 2, int(y * scale) + 14)
        cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 3)
        cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, 0.45, colour, 1)
    bar = np.full((22, out.shape[1], 3), WHITE, np.uint8)
    cv2.putText(bar, title[:max(8, out.shape[1] // 8)], (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    return np.concatenate([bar, out], axis=0)


def region_tile(img: np.ndarray, box, tile: int = 160, margin: float = 0.25) -> np.ndarray:
    """A region (box x1, y1, x2, y2 in pixels) with ``margin`` context, box in green, on a grey square."""
    h, w = img.shape[:2]
    x1, y1, x2, y2 = box
    mx, my = (x2 - x1) * margin, (y2 - y1) * margin
    cx1, cy1 = int(max(0, x1 - mx)), int(max(0, y1 - my))
    cx2, cy2 = int(min(w, x2 + mx)), int(min(h, y2 + my))
    crop = img[cy1:max(cy2, cy1 + 1), cx1:max(cx2, cx1 + 1)].copy()
    cv2.rectangle(crop, (int(x1 - cx1), int(y1 - cy1)), (int(x2 - cx1) - 1, int(y2 - cy1) - 1), (0, 255, 0),
                  max(1, round(max(crop.shape[:2]) / tile)))
    s = tile / max(crop.shape[:2])
    crop = fit(crop, (max(1, round(crop.shape[1] * s)), max(1, round(crop.shape[0] * s))))
    out = np.full((tile, tile, 3), 128, np.uint8)
    oy, ox = (tile - crop.shape[0]) // 2, (tile - crop.shape[1]) // 2
    out[oy:oy + crop.shape[0], ox:ox + crop.shape[1]] = crop
    return out


# ------------------------------------------------------------------------------------------- files

