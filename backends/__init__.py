"""backends: the real sides (Megatron-core trainers, vLLM engines) and Ray to run them.

`vllm` is the engine side, `megatron` and `torch` the trainer sides; `parallel` is the one
vocabulary of a trainer's parallel sizes both trainer sides share, `ray_trainer` the Ray
group of trainer ranks they share. With `harness` (test and benchmark support, which this
package never imports), the only package that imports megatron, vllm or ray.
"""

import logging

# Every module logs under its own name (``backends.vllm.engine``, ...), silent unless the
# application configures logging: ``logging.getLogger("backends").setLevel(logging.INFO)``.
logging.getLogger(__name__).addHandler(logging.NullHandler())
