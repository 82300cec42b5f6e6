"""e4t: one-image personalization of text-to-image diffusion models (E4T).

This module is the public API for domain plugin authors. It never imports
torch: registering a domain must stay cheap, so a domain holds factories
(callables that import what they need when called), not objects.
"""

from e4tcli.domain import PLACEHOLDER, Domain, EncoderDefaults, OffsetDefaults, PhaseDefaults
from e4tcli.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["Domain", "EncoderDefaults", "OffsetDefaults", "PhaseDefaults", "PLACEHOLDER", "hookimpl", "__version__"]
