"""Code both roles share: wire formats, privacy math, paths, atomic writes, settings."""

APP_NAME = "cpu_tracker"
__version__ = "0.1.0"
