"""Is the picture usable? Pure functions over frames, so that they are tested on real images.

- black: the mean brightness is below ``black_below`` (lens cap, dead sensor, night
  without infrared);
- covered: the picture has almost no detail (standard deviation of brightness below
  ``covered_below``): a hand, tape or a bag over the lens, or a camera turned to a wall;
- frozen: consecutive frames are bit for bit identical (the stream still arrives, the image
  does not change: a hung encoder repeating its last picture). A live sensor's noise makes
  every frame differ somewhere, even of a still scene at night, so nothing coarser (a
  thumbnail's mean difference, say) is used: it would call a quiet gate "frozen";
- stale: no frame for ``stale_after`` seconds (judged by the caller from the frame age).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import cv2
import numpy as np

THUMBNAIL = (64, 36)


@dataclass(frozen=True)
class PictureCheck:
    brightness: float
    detail: float
    identical: bool | None  # the same pixels as the previous frame examined (None: first)


def thumbnail(frame: np.ndarray) -> np.ndarray:
    grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY) if frame.ndim == 3 else frame
    return cv2.resize(grey, THUMBNAIL, interpolation=cv2.INTER_AREA).astype(np.float32)


def fingerprint(frame: np.ndarray) -> bytes:
    """A digest of every pixel (a 720p frame hashes in a few milliseconds)."""
    return hashlib.blake2b(np.ascontiguousarray(frame).data, digest_size=16).digest()


def assess(frame: np.ndarray, previous: bytes | None) -> tuple[PictureCheck, bytes]:
    """Measure one frame; returns the check and its fingerprint (for the next comparison)."""
    small = thumbnail(frame)
    digest = fingerprint(frame)
    identical = None if previous is None else digest == previous
    return PictureCheck(float(small.mean()), float(small.std()), identical), digest
