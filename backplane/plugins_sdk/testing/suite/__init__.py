"""Conformance test modules; collected only when a platform is requested (see ..plugin)."""
