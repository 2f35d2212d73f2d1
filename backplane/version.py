"""Backplane's version, in the right-shifted scheme described in RELEASE.md."""

__version__ = "0.1.0"
