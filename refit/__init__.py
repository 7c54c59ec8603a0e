"""refit: the planner and the `Refitter` (HF-named parameters, parallelism, paths, groups).

Knows HuggingFace parameter names and parallelism; never imports Megatron, vLLM or Ray.
"""

import logging

# Every module logs under its own name (``refit.refitter``, ...), silent unless the
# application configures logging: ``logging.getLogger("refit").setLevel(logging.INFO)``.
logging.getLogger(__name__).addHandler(logging.NullHandler())
