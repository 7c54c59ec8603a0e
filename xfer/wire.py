"""Plain data on the wire: JSON forms of layouts and dtypes, and authenticated records.

Nothing that crosses a socket or a store is ever unpickled. What ranks exchange is JSON:
numbers, strings, lists and objects, decoded by `json.loads` and then checked field by field
(`WireError` names what is wrong), so a hostile or corrupt payload can at worst be refused.

`layout_to_json` / `layout_from_json` carry a `Layout` (mesh ranks and axes, placements as
``"S<dim>"`` / ``"R"``, global shape); `dtype_name` / `dtype_from_name` carry a torch dtype by
name, taken only from torch's own dtype objects.

`seal` / `unseal` wrap a JSON value in a record authenticated with a shared secret (HMAC-SHA256
over the payload and a context string, e.g. the store key it is written under, so a record
cannot be replayed under another key). Without the secret a record cannot be forged; records
are not encrypted.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Sequence
from typing import Any

import torch

from xfer.errors import XferError
from xfer.layout import Layout, Placement, Replicate, Shard
from xfer.mesh import Mesh

__all__ = [
    "MAX_RECORD_BYTES",
    "WireError",
    "as_int",
    "as_ints",
    "as_str",
    "dtype_from_name",
    "dtype_name",
    "dumps",
    "layout_from_json",
    "layout_to_json",
    "loads",
    "seal",
    "unseal",
]

MAX_RECORD_BYTES = 256 << 20  # larger payloads are refused before parsing


class WireError(XferError):
    """A payload read from a peer or a store is malformed or not authentic."""


def dumps(value: Any) -> bytes:
    """Compact JSON bytes (no NaN/Infinity: they are not JSON)."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()


def loads(raw: bytes | bytearray | memoryview | str, *, what: str = "payload") -> Any:
    if isinstance(raw, str):
        raw = raw.encode()
    raw = bytes(raw)
    if len(raw) > MAX_RECORD_BYTES:
        raise WireError(f"{what}: {len(raw)} bytes exceeds {MAX_RECORD_BYTES}")
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise WireError(f"{what}: not JSON ({e})") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# -- field checks ------------------------------------------------------------------------------
def as_int(x: Any, what: str, *, lo: int | None = None) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise WireError(f"{what}: expected an int, got {type(x).__name__}")
    if lo is not None and x < lo:
        raise WireError(f"{what}: {x} < {lo}")
    return x


def as_ints(x: Any, what: str, *, lo: int | None = None) -> tuple[int, ...]:
    if not isinstance(x, list):
        raise WireError(f"{what}: expected a list of ints, got {type(x).__name__}")
    return tuple(as_int(v, f"{what}[{i}]", lo=lo) for i, v in enumerate(x))


def as_str(x: Any, what: str) -> str:
    if not isinstance(x, str):
        raise WireError(f"{what}: expected a string, got {type(x).__name__}")
    return x


def _as_dict(x: Any, what: str, keys: Sequence[str]) -> dict[str, Any]:
    if not isinstance(x, dict):
        raise WireError(f"{what}: expected an object, got {type(x).__name__}")
    missing = [k for k in keys if k not in x]
    if missing:
        raise WireError(f"{what}: missing {missing}")
    return x


# -- dtypes ------------------------------------------------------------------------------------
_DTYPES: dict[str, torch.dtype] = {
    str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.dtype)
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: Any, what: str = "dtype") -> torch.dtype:
    dt = _DTYPES.get(as_str(name, what))
    if dt is None:
        raise WireError(f"{what}: unknown dtype {name!r}")
    return dt


# -- layouts -----------------------------------------------------------------------------------
def _placement_str(p: Placement) -> str:
    return f"S{p.dim}" if isinstance(p, Shard) else "R"


def _placement(x: Any, what: str) -> Placement:
    s = as_str(x, what)
    if s == "R":
        return Replicate()
    if s[:1] == "S" and s[1:].isdigit():
        return Shard(int(s[1:]))
    raise WireError(f"{what}: placement {s!r} is not 'R' or 'S<dim>'")


def layout_to_json(layout: Layout) -> dict[str, Any]:
    return {
        "ranks": layout.mesh.ranks.tolist(),
        "axes": list(layout.mesh.axes),
        "placements": [_placement_str(p) for p in layout.placements],
        "shape": list(layout.shape),
    }


def _nested_ints(x: Any, what: str, depth: int) -> Any:
    if depth == 0:
        return as_int(x, what, lo=0)
    if not isinstance(x, list):
        raise WireError(f"{what}: expected a list, got {type(x).__name__}")
    return [_nested_ints(v, what, depth - 1) for v in x]


def layout_from_json(x: Any, what: str = "layout") -> Layout:
    d = _as_dict(x, what, ("ranks", "axes", "placements", "shape"))
    axes = d["axes"]
    if not isinstance(axes, list) or not axes:
        raise WireError(f"{what}.axes: expected a non-empty list")
    names = [as_str(a, f"{what}.axes") for a in axes]
    ranks = _nested_ints(d["ranks"], f"{what}.ranks", len(names))
    if not isinstance(d["placements"], list):
        raise WireError(f"{what}.placements: expected a list")
    placements = [_placement(p, f"{what}.placements") for p in d["placements"]]
    shape = as_ints(d["shape"], f"{what}.shape", lo=0)
    try:
        return Layout(Mesh(ranks, names), placements, shape)
    except XferError as e:
        raise WireError(f"{what}: {e}") from None


# -- authenticated records -----------------------------------------------------------------------
def _mac(secret: bytes, context: str, payload: bytes) -> str:
    h = hmac.new(secret, context.encode() + b"\0", hashlib.sha256)
    h.update(payload)
    return h.hexdigest()


def seal(value: Any, secret: bytes, context: str) -> bytes:
    """`value` as a record only holders of `secret` can produce, bound to `context`."""
    payload = dumps(value)
    return dumps({"mac": _mac(secret, context, payload), "data": payload.decode()})


def unseal(raw: bytes | str, secret: bytes, context: str) -> Any:
    """The value of a `seal` record; `WireError` if malformed or not made with `secret` for
    `context`."""
    rec = _as_dict(loads(raw, what=context), context, ("mac", "data"))
    mac, data = as_str(rec["mac"], f"{context}.mac"), as_str(rec["data"], f"{context}.data")
    if not hmac.compare_digest(mac, _mac(secret, context, data.encode())):
        raise WireError(f"{context}: record not authenticated by this refit's token")
    return loads(data, what=context)
