"""The self-test daemon: periodic health checks and the end-to-end alarm test."""
