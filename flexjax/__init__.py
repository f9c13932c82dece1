"""flexjax: run only as much of a vision network as each input, deadline and battery need.

Networks are data (`flexjax.spec.Net`); Flax modules, parameter names and
costs are derived from them. See DESIGN.md for the architecture.
"""

from flexjax import costs, exits, spec
from flexjax.spec import FINAL, Exit, Layer, Net, SpecError

__version__ = "0.1.0"

__all__ = ["FINAL", "Exit", "Layer", "Net", "SpecError", "costs", "exits", "spec"]
