"""Backplane's version, in the right-shifted scheme described in RELEASE.md.

MAJOR: incompatible architecture or API changes; MINOR: major features and the
end of deprecation windows; PATCH: features and backwards-compatible fixes;
``.postN``: fixes only. The packaging metadata reads ``__version__`` from here.
"""

__version__ = "0.1.0"


def version_tuple(version: str | None = None) -> tuple[int, int, int]:
    """(major, minor, patch) of ``version`` (default: this Backplane's)."""
    from packaging.version import Version

    release = Version(version or __version__).release + (0, 0)
    return release[0], release[1], release[2]
