"""The one place that finds out whether OpenTelemetry is installed.

Every other module of this package asks :data:`AVAILABLE` before importing anything of
``opentelemetry``, so that a program without it never imports it (and pays nothing).
"""

from __future__ import annotations

from importlib import metadata

try:
    import opentelemetry.trace  # noqa: F401 - only probing: the modules import what they use
except ImportError:
    AVAILABLE = False
else:
    AVAILABLE = True

try:
    VERSION = metadata.version("sayiir-persistence")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    VERSION = "0"
