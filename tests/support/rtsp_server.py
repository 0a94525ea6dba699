"""An RTSP camera on loopback for the tests: GStreamer's RTSP server (Debian packages
gir1.2-gst-rtsp-server-1.0, python3-gi, gstreamer1.0-plugins-good), run with the system
Python 3 because PyGObject comes from Debian, not from the project's virtual environment.

    /usr/bin/python3 rtsp_server.py PORT   ->   rtsp://127.0.0.1:PORT/camera

It prints READY once it listens, and serves a live test pattern as MJPEG over RTP.
"""

import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

Gst.init(None)
server = GstRtspServer.RTSPServer()
server.set_address("127.0.0.1")
server.set_service(sys.argv[1])
factory = GstRtspServer.RTSPMediaFactory()
factory.set_launch(
    "( videotestsrc is-live=true pattern=ball"
    " ! video/x-raw,format=I420,width=320,height=240,framerate=10/1"
    " ! jpegenc ! rtpjpegpay name=pay0 pt=26 )")
factory.set_shared(True)
server.get_mount_points().add_factory("/camera", factory)
if server.attach(None) == 0:
    sys.exit("cannot listen")
print("READY", flush=True)
GLib.MainLoop().run()
