"""The fault campaign: every failure a refit must survive, on real parts, one after another.

    python -m harness.faults [--timeout 5] [--json out.json] [--markdown]

Sets up torch trainer ranks (Ray actors, TP 2) and a vLLM engine (a Ray actor) for a tiny
MoE model, a `Refitter` with ``verify=True`` and a short timeout, then for each case: cause
the failure, attempt a refit, and record which ranks raised, how fast, the error, the engine's
status (stale? rolled back?) and whether it refuses to generate; then fix the cause and check
that the next refit recovers, with vLLM generating exactly what HF transformers generates on
the trainer's current weights. Description faults (wrong dtype, wrong shape, a missing
expert, another model) are caught by `prepare` before any rank communicates.

Then the cases of the security campaign, each with its own verdict: hostile records written
into the refit's store (ignored and reported, nothing deserialized), an engine stopped with
SIGSTOP and resumed with SIGCONT, 200 failing refits in a row (threads, file descriptors and
memory of every process before and after), two refits started at once, the same engine
listed twice, and generation racing an install.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from backends import fault_injection
from harness.fault_extras import PROMPTS, ExtraCases
from harness.fault_report import (
    CampaignReport,
    CaseReport,
    EngineSeen,
    ReportedFailure,
    markdown,
)
from harness.reports import write


def _cast(rank_obj: Any, name: str, dtype: str) -> None:
    import torch

    ref = rank_obj.params.get(name)
    if ref is not None:
        from xfer import DTensorRef

        rank_obj.params[name] = DTensorRef(ref.local.to(getattr(torch, dtype)), ref.layout)


def _reshape(rank_obj: Any, name: str, undo: bool) -> None:
    from xfer import DTensorRef, Layout

    ref = rank_obj.params.get(name)
    if ref is None:
        return
    shape = list(ref.layout.shape)
    shape[0] += -1 if not undo else 1
    lay = Layout(ref.layout.mesh, ref.layout.placements, shape)
    rank_obj.params[name] = DTensorRef(ref.local, lay)


class Campaign(ExtraCases):
    def __init__(self, args: argparse.Namespace) -> None:
        import ray

        from backends.parallel import Parallel
        from backends.torch.trainer import TorchTrainerGroup
        from backends.vllm.ray_engine import RayEngine, VllmEngineActor, engine_kwargs
        from harness.tiny_models import build
        from harness.torch_shards import checkpoint_shards
        from refit.refitter import Refitter

        self.args = args
        self.work = Path(args.workdir or tempfile.mkdtemp(prefix="refit-faults-"))
        self.path = str(self.work / "qwen3_moe")
        self.config = build("qwen3_moe", self.path)
        import torch

        ray.init(
            num_cpus=8,
            num_gpus=torch.cuda.device_count(),
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            runtime_env={"env_vars": {fault_injection.ENV: "1"}},  # arm the test hooks
        )
        self.stage_ranks = [Parallel(tp=2).stage_ranks(0)]
        gpu = args.device == "cuda"
        self.trainer = TorchTrainerGroup.launch(
            2, checkpoint_shards, self.path, 1, 2, False, 1, None, args.device,
            stage_ranks=self.stage_ranks, num_gpus=1 if gpu else 0,
        )  # fmt: skip
        self._engine_cls = ray.remote(num_cpus=0.5, num_gpus=1 if gpu else 0)(VllmEngineActor)
        self._kwargs = engine_kwargs(self.path, self.config, 1, gpu=gpu)
        self.engine_actor = self._engine_cls.remote(self._kwargs)
        self.engine = RayEngine(self.engine_actor, name="engine replica 0")
        self.refitter = Refitter(
            self.trainer, [self.engine], timeout_s=args.timeout, verify=True, delta=True
        )
        self.step = 0
        self.report = CampaignReport()
        self._other: Any = None  # a trainer of another model, for one description case

    # -- helpers ---------------------------------------------------------------------------
    def new_weights(self) -> None:
        from harness.reference import set_step

        self.step += 1
        self.trainer.call(set_step, self.path, self.step)

    def engine_options(self, fault: tuple[str, str] | None = None) -> None:
        import ray

        ray.get(
            self.engine_actor.rpc.remote(
                "refit_set_options", ["moe_prepack", "tied_lm_head"], False, None, fault
            )
        )

    def generate(self, allow_stale: bool = False) -> Any:
        import ray

        return ray.get(self.engine_actor.generate.remote(PROMPTS, 6, allow_stale))

    def matches_hf(self) -> bool:
        from harness.hf_checkpoint import load_grouped, save_grouped
        from harness.reference import hf_generate
        from harness.tiny_models import step_weights

        d = self.work / f"step{self.step}"
        save_grouped(step_weights(load_grouped(self.path), self.step), self.config, d)
        ref = hf_generate(str(d), PROMPTS, 6)
        got = self.generate()
        return all(g[0] == h[0] for g, h in zip(got, ref, strict=True)) and all(
            abs(a - b) < 1e-4
            for g, h in zip(got, ref, strict=True)
            for a, b in zip(g[1], h[1], strict=False)
        )

    def status(self) -> EngineSeen:
        try:
            s = self.refitter.status()[0][0]
        except Exception as e:  # the engine may be dead
            return EngineSeen(status=None, error=type(e).__name__)
        refused = False
        try:
            self.generate()
        except Exception as e:
            refused = "StaleWeights" in f"{type(e).__name__}{e}"
        return EngineSeen(status=s, generate_refused=refused)

    # -- a case ----------------------------------------------------------------------------
    def _wanted(self, name: str) -> bool:
        return not self.args.only or self.args.only in name

    def case(self, name: str, cause: Any, fix: Any, *, refit: bool = True) -> None:
        from refit.errors import RefitError
        from refit.watch import RefitFailed

        if not self._wanted(name):
            return
        print(f"-- {name}", flush=True)
        self.new_weights()
        cause()
        raised, error, failures, sides = False, "", None, []
        t0 = time.monotonic()
        try:
            if refit:
                self.refitter.refit()
            else:
                from refit.refitter import Refitter

                group = self._other or self.trainer
                Refitter(group, [self.engine], timeout_s=self.args.timeout).prepare()
        except RefitError as e:
            raised, error = True, str(e)
            if isinstance(e, RefitFailed):
                failures = [
                    ReportedFailure(f.rank, f.role, f.phase, f.message[:200]) for f in e.failures
                ]
                cause_text = str(e.__cause__) if e.__cause__ else ""
                sides = [
                    side
                    for side in ("trainer", "engine")
                    if side in cause_text or any(f.role == side for f in e.failures)
                ]
        seconds = round(time.monotonic() - t0, 2)
        status_after = self.status() if refit else None
        t1 = time.monotonic()
        fix()
        recovery_error = ""
        try:
            self.refitter.refit()
            recovered = self.matches_hf()
        except RefitError as e:
            recovered, recovery_error = False, str(e)[:500]
        rec = CaseReport(
            case=name,
            raised=raised,
            error=error,
            failures=failures,
            sides_raised=sides,
            seconds_to_raise=seconds,
            status_after=status_after,
            recovered=recovered,
            recovery_error=recovery_error,
            recovery_seconds=round(time.monotonic() - t1, 2),
            status_recovered=self.status(),
        )
        self.report.cases.append(rec)
        print(str(rec)[:400], flush=True)

    def run(self) -> CampaignReport:
        import ray

        t = self.trainer.actors
        timeout = self.args.timeout
        self.engine_options()
        self.new_weights()
        self.refitter.refit()
        assert self.matches_hf(), "the baseline refit does not match HF"

        self.case(
            "trainer rank raises during the transfer",
            lambda: ray.get(t[1].set_fault.remote("raise", "transfer")),
            lambda: ray.get(t[1].set_fault.remote(None)),
        )
        self.case(
            f"trainer rank stalls past the {timeout:g} s timeout",
            lambda: ray.get(t[0].set_fault.remote(f"sleep:{2.5 * timeout}", "transfer")),
            lambda: ray.get(t[0].set_fault.remote(None)),
        )
        self.case(
            "engine fails before touching its running weights",
            lambda: self.engine_options(("raise", "finish install")),
            lambda: self.engine_options(None),
        )
        self.case(
            "engine fails after it started changing its running weights",
            lambda: self.engine_options(("raise", "processing modules")),
            lambda: self.engine_options(None),
        )
        self.case(
            "trainer changes its weights during the refit (verify=True)",
            lambda: ray.get(t[0].set_fault.remote("mutate", "verify")),
            self._undo_mutation,
        )
        self.case(
            "trainer rank process dies during the transfer",
            lambda: ray.get(t[1].set_fault.remote("exit", "transfer")),
            self._restart_trainer_rank,
        )
        self.case(
            "engine process dies during the transfer",
            lambda: self.engine_options(("exit", "transfer")),
            self._restart_engine,
        )
        name = "model.layers.0.mlp.gate_proj.weight"
        self.case(
            "description: wrong dtype",
            lambda: self.trainer.call(_cast, name, "float64"),
            lambda: self.trainer.call(_cast, name, "float32"),
            refit=False,
        )
        self.case(
            "description: wrong shape",
            lambda: self.trainer.call(_reshape, name, False),
            lambda: self.trainer.call(_reshape, name, True),
            refit=False,
        )
        kept: dict = {}
        expert = "model.layers.1.mlp.experts.up_proj.weight"
        self.case(
            "description: an expert projection missing",
            lambda: kept.update(
                {r: v for r, v in enumerate(self.trainer.call(_pop, expert)) if v is not None}
            ),
            lambda: self.trainer.call(_put, expert, kept),
            refit=False,
        )
        self.case(
            "description: the trainer holds another model",
            self._other_model,
            self._drop_other_model,
            refit=False,
        )
        for case in (
            self.killed_driver,
            self.hostile_store,
            self.stopped_engine,
            self.concurrent_refits,
            self.duplicated_engine,
            self.generation_races_install,
            self.refused_delta,
            self.many_failures,
        ):
            if self._wanted(case.__doc__ or case.__name__):
                case()
        return self.report

    def _undo_mutation(self) -> None:
        import ray

        from harness.reference import set_step

        ray.get(self.trainer.actors[0].set_fault.remote(None))
        self.trainer.call(set_step, self.path, self.step)  # the weights it meant to send

    def _restart_trainer_rank(self) -> None:
        self.trainer.restart_rank(1)
        from harness.reference import set_step

        self.trainer.call(set_step, self.path, self.step)

    def _restart_engine(self) -> None:
        from backends.vllm.ray_engine import RayEngine

        self.engine_actor = self._engine_cls.remote(self._kwargs)
        self.engine = RayEngine(self.engine_actor, name="engine replica 0 (restarted)")
        self.engine_options()
        self.refitter.replace_engine(0, self.engine)

    def _other_model(self) -> None:
        """A trainer of the dense model, to be refit into the MoE engine."""
        from backends.torch.trainer import TorchTrainerGroup
        from harness.tiny_models import build
        from harness.torch_shards import checkpoint_shards

        other = str(self.work / "qwen3")
        build("qwen3", other)
        self._other = TorchTrainerGroup.launch(2, checkpoint_shards, other, 1, 2)

    def _drop_other_model(self) -> None:
        import ray

        for a in self._other.actors:
            ray.kill(a)
        self._other = None


def _pop(rank_obj: Any, name: str) -> Any:
    return rank_obj.params.pop(name, None)


def _put(rank_obj: Any, name: str, kept: dict) -> None:
    if rank_obj.rank in kept:
        rank_obj.params[name] = kept[rank_obj.rank]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m harness.faults",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--timeout", type=float, default=5.0, help="the Refitter's timeout (s)")
    ap.add_argument(
        "--failures", type=int, default=200, help="failing refits in a row, for the leak count"
    )
    ap.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="cuda: a GPU per rank, NCCL"
    )
    ap.add_argument("--only", default="", help="run only the cases whose name contains this")
    ap.add_argument("--workdir", help="where models are written (default: a temporary dir)")
    ap.add_argument("--json", help="write the campaign's report here (`CampaignReport`)")
    ap.add_argument("--markdown", action="store_true", help="print the results as a table")
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    socket.setdefaulttimeout(None)
    report = Campaign(args).run()
    if args.json:
        write(report, args.json)
    if args.markdown:
        print(markdown(report))
    print("all cases raised and recovered" if report.ok else "SOME CASES FAILED")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
