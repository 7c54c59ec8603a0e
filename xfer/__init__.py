"""xfer: shard-to-shard reshard of tensors between differently sharded groups of ranks.

Layouts (`Mesh`, `Shard`, `Replicate`, `Layout`) describe who holds what; `plan_reshard`
computes, purely, who sends which bytes to whom; `xferdtensor`, `xferdtensors` and
`Resharder` execute over a `Comm` by one of three paths (golden, p2p, m2n).
"""

import logging

from xfer.api import PATHS, Delta, DTensorRef, Path, Resharder, xferdtensor, xferdtensors
from xfer.comm import Comm, Recorded, RecordingComm, TorchComm, Transfer, Work, tcp_store
from xfer.delta import Baselines
from xfer.errors import XferError
from xfer.execute import XferStats
from xfer.layout import Layout, Replicate, Shard
from xfer.mesh import Mesh
from xfer.plan import DEFAULT_BUCKET_BYTES, Plan, PlanStats, ReshardItem, plan_reshard
from xfer.program import RankProgram, build_program
from xfer.segments import Segments
from xfer.staging import Staging

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "PATHS",
    "Baselines",
    "Comm",
    "DTensorRef",
    "Delta",
    "Layout",
    "Mesh",
    "Path",
    "Plan",
    "PlanStats",
    "RankProgram",
    "Recorded",
    "RecordingComm",
    "Replicate",
    "ReshardItem",
    "Resharder",
    "Segments",
    "Shard",
    "Staging",
    "TorchComm",
    "Transfer",
    "Work",
    "XferError",
    "XferStats",
    "build_program",
    "plan_reshard",
    "tcp_store",
    "xferdtensor",
    "xferdtensors",
]

# Modules log under ``xfer.<module>``, silent unless the application configures logging.
logging.getLogger(__name__).addHandler(logging.NullHandler())
