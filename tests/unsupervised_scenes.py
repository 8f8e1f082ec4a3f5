"""Synthetic test scenes for the unsupervised segment tests: a textured object planted on texture."""
from __future__ import annotations

import cv2
import numpy as np


def planted_scene(seed: int, height: int = 120, width: int = 160) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [H, W, 3] RGB, bool [H, W] object mask): a striped orange ellipse on green noise texture."""
    rng = np.random.default_rng(seed)
    noise = cv2.GaussianBlur(rng.standard_normal((height, width, 3)).astype(np.float32), (0, 0), 1.5)
    image = np.array([60, 140, 50], np.float32) + 60.0 * noise
    ay, ax = int(height * rng.uniform(0.18, 0.24)), int(width * rng.uniform(0.16, 0.22))
    cy = int(rng.uniform(ay + 8, height - ay - 8))
    cx = int(rng.uniform(ax + 8, width - ax - 8))
    mask = np.zeros((height, width), np.uint8)
    cv2.ellipse(mask, (cx, cy), (ax, ay), float(rng.uniform(0, 180)), 0, 360, 1, -1)
    mask = mask.astype(bool)
    cols = np.arange(width)[None, :].repeat(height, 0)
    stripes = 50.0 * np.sin(cols / 2.5)[..., None]
    image[mask] = (np.array([210, 90, 40], np.float32) + stripes)[mask]
    return np.clip(image, 0, 255).astype(np.uint8), mask
