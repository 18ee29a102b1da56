"""Bridges to federated-learning frameworks.

`capture` is the on-disk format of what a server saw (no framework needed to
read it); `flower` wraps a Flower strategy to write it.  Importing this
package imports no framework: only `gradleak.integrations.flower` imports
Flower, and only when it is imported itself.
"""

from gradleak.errors import ConfigError

FLOWER_EXTRA = 'pip install "gradleak[flower]"'


def missing_flower() -> ConfigError:
    """The one line a Flower command prints when Flower is not installed."""
    return ConfigError(f"the Flower commands need the flower extra: {FLOWER_EXTRA}")
