"""Test set-up for the Acme plugin: make one simulated Acme device visible.

The conformance suite (``backplane_platform = "acme"`` in pyproject.toml) runs
in the same session; spawned worker processes inherit this environment.
"""

import os

os.environ.setdefault("ACME_VISIBLE_DEVICES", "0")
