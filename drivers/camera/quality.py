"""Is the picture usable? Pure functions over frames, so that they are tested on real images.

- black: the mean brightness is below ``black_below`` (lens cap, dead sensor, night
  without infrared);
- covered: the picture has almost no detail (standard deviation of brightness below
  ``covered_below``): a hand, tape or a bag over the lens, or a camera turned to a wall;
- frozen: consecutive frames are identical (the stream still arrives, the image does not
  change: a hung encoder). Real sensors always have some noise, so "identical" means a mean
  absolute difference below ``frozen_below`` on a small grey thumbnail;
- stale: no frame for ``stale_after`` seconds (judged by the caller from the frame age).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

THUMBNAIL = (64, 36)


@dataclass(frozen=True)
class PictureCheck:
    brightness: float
    detail: float
    change: float | None  # mean absolute difference to the previous thumbnail


def thumbnail(frame: np.ndarray) -> np.ndarray:
    grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY) if frame.ndim == 3 else frame
    return cv2.resize(grey, THUMBNAIL, interpolation=cv2.INTER_AREA).astype(np.float32)


def assess(frame: np.ndarray, previous_thumbnail: np.ndarray | None) -> tuple[PictureCheck,
                                                                               np.ndarray]:
    """Measure one frame; returns the check and its thumbnail (for the next comparison)."""
    small = thumbnail(frame)
    change = None
    if previous_thumbnail is not None:
        change = float(np.mean(np.abs(small - previous_thumbnail)))
    return PictureCheck(float(small.mean()), float(small.std()), change), small
