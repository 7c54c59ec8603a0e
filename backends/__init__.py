"""backends: the real sides (Megatron-core trainers, vLLM engines) and Ray to run them.

The only package that imports megatron, vllm or ray.
"""

import logging

# Every module logs under its own name (``backends.refitter``, ...), silent unless the
# application configures logging: ``logging.getLogger("backends").setLevel(logging.INFO)``.
logging.getLogger(__name__).addHandler(logging.NullHandler())
