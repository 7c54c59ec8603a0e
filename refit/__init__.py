"""refit: the planner and the `Refitter` (HF-named parameters, parallelism, paths, groups).

Knows HuggingFace parameter names and parallelism; never imports Megatron, vLLM or Ray.
``from refit import Refitter`` is the public entry point.
"""

import logging

from refit.errors import RefitError
from refit.refitter import RefitStats, Refitter
from refit.watch import RefitFailed

__all__ = ["RefitError", "RefitFailed", "RefitStats", "Refitter"]

# Every module logs under its own name (``refit.refitter``, ...), silent unless the
# application configures logging: ``logging.getLogger("refit").setLevel(logging.INFO)``.
logging.getLogger(__name__).addHandler(logging.NullHandler())
