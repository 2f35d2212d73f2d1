"""Version of the plugin SDK contract, separate from Backplane's own version.

A plugin declares the SDK version it was written against (``sdk_version``).
Plugins with the same major version as ``SDK_VERSION`` are accepted; a different
major is refused with a message that names both.
"""

SDK_VERSION = "1.0"
