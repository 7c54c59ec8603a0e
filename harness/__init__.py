"""harness: test and benchmark support, not the product.

Tiny models (`tiny_models`, `hf_checkpoint`), end-to-end scenarios (`scenario`), the fault
campaign (`faults`), a ``vllm serve`` process (`serve`), Megatron models built from an HF
config and the Ray actors that hold them (`megatron_model`, `megatron_patches`,
`megatron_actors`), torch trainer ranks built from a checkpoint (`torch_shards`) and local
gloo rank pools (`local`). It imports the product (`backends`, `refit`, `xfer`); nothing in
the product imports it.
"""
