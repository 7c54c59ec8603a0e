"""The plain PyTorch / DTensor trainer side (FSDP2, torchtitan users): `trainer`.

Modules here import the real ``torch`` (imports are absolute; this package is
``backends.torch``)."""
