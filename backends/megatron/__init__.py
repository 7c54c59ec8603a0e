"""The Megatron-core trainer side: Megatron's placement from metadata (`layout`), a live rank's
parameters as HF shards (`map`), and the refit side of a rank and its Ray group (`worker`)."""
