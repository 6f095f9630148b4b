"""mmllm: toy listings (photos, title, description, seller table) to structured JSON.

One concept per module, in layers: ARCHITECTURE.md in the repository draws them, with the contracts
between them and the path of one listing from the catalog to its JSON line.
"""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes' CPU backend warns on import, in every CPU run (training the fusion model included), that it
# could not fetch a 4-bit kernel from the hub through the `kernels` package; its own fallback is the one
# meant here (no hub downloads), so the line says nothing a user can act on.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
