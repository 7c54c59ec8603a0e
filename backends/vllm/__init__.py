"""The vLLM engine side: where vLLM keeps each parameter (`layout`), one worker's part of a
refit (`engine`), the "xfer" weight-transfer backend (`transfer`, registered as a vLLM plugin),
the worker extension for ``collective_rpc`` (`worker`), the private vLLM names the install
needs (`private`), and engine replicas as Ray actors (`ray_engine`)."""
