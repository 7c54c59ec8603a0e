"""Rounds: each (sender, receiver) pair's byte stream cut into messages spread over rounds.

`schedule` takes the remote chunks sorted by (sender, receiver) and makes one `Pairs` row per
pair: its stream (the concatenation of its chunks' bytes), cut into ``m`` near-equal messages
spread over the rounds from a per-pair phase, with at most `cap` bytes sent and received per
rank per round (checked with an upper bound; the rounds grow until it holds). `cut` splits
messages at given stream offsets (the parts of `xfer.plan`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xfer.errors import XferError
from xfer.relay import frozen
from xfer.senders import Chunks

__all__ = ["Pairs", "cut", "schedule"]


@dataclass(frozen=True, eq=False)
class Pairs:
    """One row per (sender, receiver) pair with remote chunks, sorted by (sender, receiver).

    Chunks ``first[p]:last[p]`` of `Plan.chunks` form the pair's stream of ``nbytes[p]``
    bytes, cut into ``messages[p]`` messages; message ``j`` covers stream bytes
    ``[j*B//m, (j+1)*B//m)`` and is sent in round ``(phase[p] + j*R//m) % R``.
    """

    sender: np.ndarray
    receiver: np.ndarray
    nbytes: np.ndarray
    first: np.ndarray
    last: np.ndarray
    messages: np.ndarray
    phase: np.ndarray

    def __len__(self) -> int:
        return int(self.sender.shape[0])

    def rounds_of(self, p: int, rounds: int) -> np.ndarray:
        """Round of each message of pair `p`."""
        m = int(self.messages[p])
        return (int(self.phase[p]) + (np.arange(m) * rounds) // m) % rounds

    def bounds_of(self, p: int) -> np.ndarray:
        """Stream byte offsets ``[b_0 = 0, ..., b_m = B]`` of the messages of pair `p`."""
        m, b = int(self.messages[p]), int(self.nbytes[p])
        return (np.arange(m + 1, dtype=np.int64) * b) // m


def schedule(rem: Chunks, world_size: int, cap: int) -> tuple[Pairs, int]:
    """Group sorted remote chunks into pairs and spread each pair's stream over rounds."""
    n = len(rem)
    if n == 0:
        z = frozen(np.zeros(0, np.int64))
        return Pairs(z, z, z, z, z, z, z), 0
    change = np.ones(n, dtype=bool)
    change[1:] = (rem.sender[1:] != rem.sender[:-1]) | (rem.receiver[1:] != rem.receiver[:-1])
    first = np.nonzero(change)[0]
    last = np.append(first[1:], n)
    sender, receiver = rem.sender[first], rem.receiver[first]
    nbytes = np.add.reduceat(rem.nbytes, first)
    out = np.bincount(sender, weights=nbytes, minlength=world_size)
    inn = np.bincount(receiver, weights=nbytes, minlength=world_size)
    degree = max(
        int(np.bincount(sender, minlength=world_size).max()),
        int(np.bincount(receiver, minlength=world_size).max()),
    )
    load = int(max(out.max(), inn.max()))
    small = max(1, cap // (2 * degree))
    rounds = max(1, -(-load // cap))
    phase_base = sender + receiver
    for _ in range(200):
        messages = np.minimum(rounds, -(-nbytes // small))
        phase = phase_base % rounds
        if _fits(sender, receiver, nbytes, messages, phase, rounds, world_size, cap):
            break
        rounds += max(1, rounds // 16)
    else:
        raise XferError(
            f"bucket_bytes={cap} is too small: ranks exchange up to {load} bytes with up to "
            f"{degree} peers; use at least {max(64 * degree, 1 << 16)} bytes"
        )
    pairs = Pairs(*(frozen(a) for a in (sender, receiver, nbytes, first, last, messages, phase)))
    return pairs, rounds


def _fits(
    sender: np.ndarray,
    receiver: np.ndarray,
    nbytes: np.ndarray,
    messages: np.ndarray,
    phase: np.ndarray,
    rounds: int,
    world_size: int,
    cap: int,
) -> bool:
    """Upper-bound check that no rank sends or receives more than `cap` in any round."""
    biggest = -(-nbytes // messages)  # no message of the pair exceeds this
    full = messages == rounds  # such a pair sends in every round
    base_out = np.bincount(sender[full], weights=biggest[full], minlength=world_size)
    base_in = np.bincount(receiver[full], weights=biggest[full], minlength=world_size)
    if max(base_out.max(initial=0), base_in.max(initial=0)) > cap:
        return False
    part = np.nonzero(~full)[0]
    if len(part) == 0:
        return True
    m = messages[part]
    p_idx = np.repeat(part, m)
    j = np.arange(len(p_idx)) - np.repeat(np.cumsum(m) - m, m)
    rnd = (phase[p_idx] + (j * rounds) // messages[p_idx]) % rounds
    load_out = np.zeros((world_size, rounds))
    load_in = np.zeros((world_size, rounds))
    np.add.at(load_out, (sender[p_idx], rnd), biggest[p_idx])
    np.add.at(load_in, (receiver[p_idx], rnd), biggest[p_idx])
    return bool(
        (load_out + base_out[:, None]).max() <= cap and (load_in + base_in[:, None]).max() <= cap
    )


def cut(
    cuts: np.ndarray, a: np.ndarray, z: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Messages ``[a_i, z_i)`` cut at every one of the sorted `cuts` strictly inside them:
    (message of each part, part starts, part ends), parts in order."""
    first = np.searchsorted(cuts, a, side="right")
    n = np.searchsorted(cuts, z, side="left") - first + 1  # parts per message
    msg = np.repeat(np.arange(len(a)), n)
    k = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)  # part within its message
    inner = np.concatenate([cuts, [0]])  # a pad, never picked: k < n - 1 below
    lo = np.where(k == 0, a[msg], inner[first[msg] + k - 1])
    hi = np.where(k == n[msg] - 1, z[msg], inner[np.minimum(first[msg] + k, len(cuts))])
    return msg, lo, hi
