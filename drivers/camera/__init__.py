"""Cameras through OpenCV: RTSP IP cameras, V4L2 USB cameras, and video files (simulation).

- :mod:`.source`: a camera read continuously on its own thread, reconnecting with backoff,
  with the latest frame and a ring of JPEG snapshots covering the pre-alarm window.
- :mod:`.quality`: is the picture usable? (stale, frozen, black, covered)
"""

from drivers.camera.quality import PictureCheck, assess
from drivers.camera.source import CameraSource, Snapshot

__all__ = ["CameraSource", "PictureCheck", "Snapshot", "assess"]
