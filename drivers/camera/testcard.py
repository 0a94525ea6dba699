"""A test card: real video written with OpenCV, for the simulation, the tests and the
benchmark (no camera needed).

Every frame carries its own number, drawn as 16 black or white blocks across the top (a
barcode that survives JPEG), over a noisy picture (real sensors are noisy, so a picture
only freezes when the stream does). Segments of black, covered (flat grey) and frozen
(repeated) frames simulate a camera in trouble.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

WIDTH, HEIGHT = 320, 240
BITS, BAND = 16, 32


def _frame(number: int, rng: np.random.Generator, kind: str) -> np.ndarray:
    if kind == "black":
        return np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    if kind == "covered":
        return np.full((HEIGHT, WIDTH, 3), 128, np.uint8)
    frame = rng.integers(40, 216, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    block = WIDTH // BITS
    for bit in range(BITS):
        value = 255 if (number >> (BITS - 1 - bit)) & 1 else 0
        frame[:BAND, bit * block:(bit + 1) * block] = value
    return frame


def write_video(path: Path, segments: list[tuple[str, float]], fps: float = 20.0,
                size: tuple[int, int] = (WIDTH, HEIGHT)) -> Path:
    """``segments``: (kind, seconds) with kind "counter", "black", "covered" or "frozen"."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    assert writer.isOpened(), "OpenCV cannot write MJPG video here"
    rng = np.random.default_rng(7)
    number = 0
    for kind, seconds in segments:
        repeated = None
        for _ in range(round(seconds * fps)):
            if kind == "frozen":
                repeated = repeated if repeated is not None else _frame(number, rng, "counter")
                frame = repeated
            else:
                frame = _frame(number, rng, kind)
            if size != (WIDTH, HEIGHT):
                frame = cv2.resize(frame, size, interpolation=cv2.INTER_NEAREST)
            writer.write(frame)
            number += 1
    writer.release()
    return path


def frame_number(jpeg: bytes) -> int:
    """Read the number back from a snapshot."""
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_GRAYSCALE)
    image = cv2.resize(image, (WIDTH, HEIGHT))
    block = WIDTH // BITS
    number = 0
    for bit in range(BITS):
        mean = image[4:BAND - 4, bit * block + 4:(bit + 1) * block - 4].mean()
        number = number << 1 | (1 if mean > 128 else 0)
    return number
