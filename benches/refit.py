"""The refit benchmark: ``python -m benches.refit --config dsv3.yaml``.

1. Plan at full scale from metadata only (Megatron trainer layout -> vLLM engine replicas):
   one xfer plan over every refit rank (all pipeline stages at once); bulk/misc bytes,
   per-rank bytes in/out, messages, rounds, chunks; plan build time (one core) and memory.
2. Memory: the extra memory each rank needs for a refit, from the plan (`benches.memory`):
   at most double-buffered staging of its largest round, and misc tensors whole on engine
   ranks; and, for a sample of ranks, what the runtime stages with zero copy. The bucket
   comes from the config (`bucket_mib`), or from the engine GPUs' budget (`max_extra_gib`).
3. Simulate the refit on the configured cluster (`benches.simulate`, link-level): seconds for
   p2p, golden and the gather + broadcast baseline, beside the lower bound and the engines'
   receive bound, each with its memory; p2p also for other buckets (time against memory),
   and for 1x, 2x and 4x the engine replicas without and with relay (replicas forwarding
   to each other, `xfer.plan`).
4. Calibrate this machine's links (`benches.calibrate`) and execute a scaled-down copy of
   the same architecture and layouts on local gloo ranks (`benches.localrun`; NCCL with a GPU
   per rank): p2p vs golden vs gather + broadcast through the real runtime, measured in one
   run with their results checked identical, with the memory each rank used; then predict
   the local run with the calibrated model and print prediction and measurement side by side.
5. Deltas (``--delta FRACTION``, 3% by default, 0 to skip): the simulator's model of a
   sparse-delta refit at full scale with that fraction of the elements changed
   (`benches.simulate.simulate_delta`, baselines on the GPU and in host memory); the local
   copy alternating dense and delta refits through the real runtime at that fraction and at
   100% (where every message falls back to dense), checked exact; and the fraction of BF16
   elements AdamW steps at RL learning rates change (`benches.update`).
6. With ``--engines``, the scaled-down copy also runs through real torch trainer ranks and
   real vLLM engines via Ray (`harness.scenario`), checked against HF transformers.

Everything goes to ``<out>/<config>.json`` (standard JSON, with the versions, command and
machine that produced it) and a plot ``<out>/<config>.png``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from backends.megatron.layout import megatron_spec
from backends.vllm.layout import engine_spec
from benches import calibrate, localrun, report
from benches.config import BenchConfig, Side, load
from benches.memory import extra_memory, misc_bytes, zero_copy_extra
from benches.simulate import simulate, simulate_delta
from benches.update import LEARNING_RATES, adam_changed_fraction
from harness.local import RankPool
from refit.planner import RefitPlan, plan_refit
from refit.spec import EngineSpec, TrainerSpec
from xfer import Plan, plan_reshard

PROG = "python -m benches.refit"
SWEEP_MIB = (64, 256, 1024, 4096)  # buckets for the p2p time-against-memory sweep


@dataclass(frozen=True)
class Built:
    """A side's refit plan, its one xfer plan, and what building them cost."""

    refit: RefitPlan
    plan: Plan
    bucket_bytes: int
    seconds_cpu: float  # one build, untraced, on one core
    peak_bytes: int  # Python allocations during a second (traced) build


def specs(side: Side) -> tuple[TrainerSpec, EngineSpec]:
    trainer = megatron_spec(side.model, side.trainer)
    engine = engine_spec(side.model, side.engine_tp, expert_parallel=side.expert_parallel)
    return trainer, engine


def _plan(side: Side) -> tuple[RefitPlan, Plan, int]:
    trainer, engine = specs(side)
    refit = plan_refit(trainer, [engine] * side.replicas)
    # as the Refitter does: relay chosen by the planner where replicas could forward
    bucket = side.bucket_bytes(misc_bytes(refit))
    return refit, plan_reshard(refit.items, world_size=refit.world, bucket_bytes=bucket), bucket


def build_plans(side: Side) -> Built:
    """The refit plan and its xfer plan, with build time (one core) and memory: timed in one
    build and traced in another (tracing slows the build about twofold)."""
    t0 = time.process_time()
    refit, plan, bucket = _plan(side)
    cpu = time.process_time() - t0
    tracemalloc.start()
    try:
        _plan(side)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return Built(refit, plan, bucket, cpu, peak)


def plan_figures(refit: RefitPlan, plan: Plan) -> dict[str, Any]:
    st, t = plan.stats, refit.trainer_world
    bytes_in, bytes_out = st.bytes_in, st.bytes_out
    return {
        "params": len(refit.report),
        "bulk_params": refit.bulk,
        "misc_params": len(refit.misc),
        "stages": refit.stages,
        "bulk_bytes_per_replica": refit.bulk_bytes,
        "misc_bytes_per_replica": refit.misc_bytes,
        "bulk_fraction": refit.bulk_fraction,
        "bucket_bytes": plan.bucket_bytes,
        "messages": st.messages,
        "rounds": plan.rounds,
        "chunks": len(plan.chunks),
        "remote_bytes": st.remote_bytes,
        "trainer_out_bytes": {"max": int(bytes_out[:t].max()), "mean": float(bytes_out[:t].mean())},
        "engine_in_bytes": {"max": int(bytes_in[t:].max()), "mean": float(bytes_in[t:].mean())},
        "messages_max_per_rank": int((st.messages_in + st.messages_out).max()),
        "bytes_in": bytes_in.tolist(),
        "bytes_out": bytes_out.tolist(),
    }


def sample_ranks(refit: RefitPlan, bound: np.ndarray, per_role: int = 8) -> list[int]:
    """Ranks to compute zero-copy memory for (a second per rank at DeepSeek-V3 scale): in up
    to `per_role` evenly spaced stages the trainer rank with the largest bound; up to
    `per_role` evenly spaced ranks of engine replica 0, and the engine rank with the largest
    bound."""
    t = refit.trainer_world
    stages = np.unique(np.linspace(0, refit.stages - 1, min(per_role, refit.stages)).astype(int))
    trainers = [max(refit.stage_ranks[s], key=lambda r: bound[r]) for s in stages]
    r = refit.replica_world
    engines = [t + int(j) for j in np.unique(np.linspace(0, r - 1, min(per_role, r)).astype(int))]
    engines.append(t + int(bound[t:].argmax()))
    return sorted({int(x) for x in trainers + engines})


def memory_figures(built: Built, side: Side) -> dict[str, Any]:
    """The plan's bound for every rank (the figures asked of a refit), and the runtime's
    zero-copy staging for a sample of ranks."""
    mem = extra_memory(built.refit, built.plan)
    bound = mem.by_path["p2p"]
    ranks = sample_ranks(built.refit, bound)
    zero = zero_copy_extra(built.refit, built.plan, ranks)
    t = built.refit.trainer_world
    return {
        "engine_extra_bytes_max": mem.max("p2p", "engine"),
        "trainer_extra_bytes_max": mem.max("p2p", "trainer"),
        "bucket_bytes": built.bucket_bytes,
        "budget_bytes": side.max_extra_bytes,  # per engine GPU; None: the bucket is given
        "misc_bytes": misc_bytes(built.refit),
        "by_path": mem.to_dict(),
        "floor": {"engine": misc_bytes(built.refit), "trainer": 0},  # misc held whole
        "extra_bytes": bound.tolist(),
        "zero_copy": {
            "ranks": ranks,
            "extra_bytes": [zero[r] for r in ranks],
            "bound_bytes": [int(bound[r]) for r in ranks],
            "engine_max": max((zero[r] for r in ranks if r >= t), default=0),
            "trainer_max": max((zero[r] for r in ranks if r < t), default=0),
        },
    }


def bucket_sweep(built: Built, cfg: BenchConfig) -> list[dict[str, Any]]:
    """p2p seconds and extra memory for other buckets (the same refit plan)."""
    rows = []
    for bucket in sorted({*(m << 20 for m in SWEEP_MIB), built.bucket_bytes}):
        plan = (
            built.plan
            if bucket == built.bucket_bytes
            else plan_reshard(built.refit.items, world_size=built.refit.world, bucket_bytes=bucket)
        )
        mem = extra_memory(built.refit, plan)
        rows.append(
            {
                "bucket_bytes": bucket,
                "p2p": simulate(built.refit, plan, cfg.cluster).p2p,
                "rounds": plan.rounds,
                "engine_extra_bytes_max": mem.max("p2p", "engine"),
                "trainer_extra_bytes_max": mem.max("p2p", "trainer"),
            }
        )
    return rows


def replica_sweep(cfg: BenchConfig, progress: Any = None) -> list[dict[str, Any]]:
    """p2p seconds and extra memory for 1x, 2x and 4x the configured engine replicas, without
    and with relay (`xfer.plan`; "auto": the planner's choice), each at the side's budget."""
    rows = []
    for factor in (1, 2, 4):
        side = replace(cfg.full, replicas=cfg.full.replicas * factor)
        trainer, engine = specs(side)
        refit = plan_refit(trainer, [engine] * side.replicas)
        bucket = side.bucket_bytes(misc_bytes(refit))
        for relay in (False, None):
            if progress is not None:
                progress.set_description(
                    f"replicas x{side.replicas}, relay {'auto' if relay is None else 'off'}"
                )
            t0 = time.process_time()
            plan = plan_reshard(
                refit.items, world_size=refit.world, bucket_bytes=bucket, relay=relay
            )
            seconds_cpu = time.process_time() - t0
            sim = simulate(refit, plan, cfg.cluster)
            mem = extra_memory(refit, plan)
            t = refit.trainer_world
            rows.append(
                {
                    "replicas": side.replicas,
                    "relay": "auto" if relay is None else "off",
                    "bucket_bytes": bucket,
                    "relay_depth": plan.relay.max_depth,
                    "followers": len(plan.relay),
                    "p2p": sim.p2p,
                    "receive_bound": sim.receive_bound,
                    "rounds": plan.rounds,
                    "messages": plan.stats.messages,
                    "trainer_out_max": int(plan.stats.bytes_out[:t].max()),
                    "engine_extra_bytes_max": mem.max("p2p", "engine"),
                    "trainer_extra_bytes_max": mem.max("p2p", "trainer"),
                    "plan_seconds_cpu": seconds_cpu,
                }
            )
    return rows


def pick_backend(requested: str, world: int) -> str:
    """`auto`: NCCL when this machine has a GPU for every local rank, else gloo."""
    if requested != "auto":
        return requested
    return "nccl" if gpu_count() >= world else "gloo"


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run_local(
    cfg: BenchConfig, reps: int, engines: bool, progress: Any, backend: str, delta: float = 0.0
) -> dict[str, Any]:
    side = cfg.local
    built = build_plans(side)
    trainer, engine = specs(side)
    bucket = built.bucket_bytes
    pool = RankPool(side.world)

    def execute(t: TrainerSpec, e: EngineSpec) -> dict[str, Any]:
        return localrun.execute(
            t, e, side.replicas, bucket_bytes=bucket, reps=reps, pool=pool, backend=backend
        )

    try:
        progress.set_description("calibrating local links")
        figures = calibrate.merge(pool.run(calibrate.calibrate_rank, side.world, timeout=600))
        runs = []
        for kind in (calibrate.EMPTY, calibrate.TINY, calibrate.LARGE):
            t, e = calibrate.synthetic_specs(side.trainer, side.engine_tp, kind)
            synth = plan_refit(t, [e] * side.replicas)
            plan = plan_reshard(synth.items, world_size=synth.world, bucket_bytes=bucket)
            runs.append((synth, plan, execute(t, e)))
        figures = calibrate.fit(figures, side.world, *runs)
        progress.update(1)
        progress.set_description("executing the scaled-down copy")
        measured = execute(trainer, engine)
        progress.update(1)
        deltas = []
        # received while serving (engine baselines), then patched in place (none)
        delta_runs = ((delta, False), (delta, True), (1.0, True)) if delta else ()
        for fraction, persistent in delta_runs:
            how = "in place" if persistent else "received while serving"
            progress.set_description(f"dense vs delta, {100 * fraction:g}% changed, {how}")
            deltas.append(
                localrun.execute_delta(
                    trainer,
                    engine,
                    side.replicas,
                    fraction=fraction,
                    bucket_bytes=bucket,
                    reps=reps,
                    pool=pool,
                    backend=backend,
                    persistent=persistent,
                )
            )
        progress.update(1)
    finally:
        pool.close()
    cluster = calibrate.local_cluster(figures, side.world)
    nodes = np.zeros(built.refit.world, dtype=np.int64)
    predicted = simulate(built.refit, built.plan, cluster, nodes=nodes)
    out = {
        "backend": backend,
        "layout": f"trainer {side.trainer} -> engine TP{side.engine_tp} x {side.replicas}",
        "trainer_world": built.refit.trainer_world,
        "world": built.refit.world,
        "plan": report.plan_line(built.refit, built.plan),
        "bytes_per_replica": built.refit.bulk_bytes + built.refit.misc_bytes,
        "remote_bytes": int(built.plan.stats.remote_bytes),
        "bucket_bytes": bucket,
        "calibration": figures,
        "cluster": cluster.to_dict(),
        "measured": measured,
        "predicted": predicted.to_dict(),
        "predicted_memory": local_memory(built),
        "plan_seconds_cpu": built.seconds_cpu,
        "plan_peak_bytes": built.peak_bytes,
        "delta": deltas,
    }
    if engines:
        progress.set_description("running real trainer + vLLM engines")
        out["engines"] = run_engines(cfg)
    progress.update(1)
    return out


def local_memory(built: Built) -> dict[str, dict[str, int]]:
    """Each path's extra memory per role for the local copy: p2p with the runtime's zero copy
    (every rank's program), and its plan bound."""
    mem = extra_memory(built.refit, built.plan)
    out = mem.to_dict()
    zero = zero_copy_extra(built.refit, built.plan, list(range(built.refit.world)))
    t = built.refit.trainer_world
    out["p2p_bound"] = out["p2p"]
    out["p2p"] = {
        "engine": max((v for r, v in zero.items() if r >= t), default=0),
        "trainer": max((v for r, v in zero.items() if r < t), default=0),
    }
    return out


def run_engines(cfg: BenchConfig) -> dict[str, Any]:
    """The scaled-down copy through real trainer ranks and vLLM engines (a subprocess, since
    vLLM keeps process-wide state)."""
    side = cfg.local
    with tempfile.TemporaryDirectory(prefix="refit-engines-") as d:
        out = Path(d) / "report.json"
        cmd = [
            sys.executable, "-m", "harness.scenario", "--config-json", json.dumps(side.model),
            "--trainer-pp", str(side.trainer.pp), "--trainer-dp", str(side.trainer.dp),
            "--trainer-tp", str(side.trainer.tp), "--engine-tp", str(side.engine_tp),
            "--replicas", str(side.replicas), "--steps", "2", "--workdir", d, "--json", str(out),
        ]  # fmt: skip
        if side.trainer.ep > 1:
            cmd.append("--trainer-ep")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if not out.exists():
            return {"ok": False, "error": proc.stderr[-4000:], "vllm_backends": vllm_backends()}
        report = json.loads(out.read_text())
        report["vllm_backends"] = vllm_backends()
        return report


def vllm_backends() -> dict[str, str]:
    """vLLM's own weight-transfer backends beside xfer on this machine: why each did not run."""
    import torch

    if not torch.cuda.is_available():
        why = (
            "not run: needs CUDA (vLLM's engine calls torch.accelerator.current_device_index(), "
            "which raises without an accelerator)"
        )
        return {"nccl": why, "nccl_m2n": why + "; also needs nccl-extensions with NCCL >= 2.30.5"}
    why = "not run: the side-by-side measurement of vLLM's own backends is not implemented yet"
    return {"nccl": why, "nccl_m2n": why}


def simulate_full(cfg: BenchConfig, progress: Any, delta: float = 0.0) -> dict[str, Any]:
    progress.set_description("planning at full scale")
    built = build_plans(cfg.full)
    progress.update(1)
    progress.set_description("simulating")
    sim = simulate(built.refit, built.plan, cfg.cluster).to_dict()
    if delta:  # delta refits move on the plan without relay (two receive buffers per bucket)
        direct = plan_reshard(
            built.refit.items,
            world_size=built.refit.world,
            bucket_bytes=cfg.full.bucket_bytes(misc_bytes(built.refit)),
            relay=False,
        )
        sim["delta"] = simulate_delta(built.refit, direct, cfg.cluster, delta)
        for where in ("host", "trainer-device"):
            sim["delta"][where] = simulate_delta(
                built.refit, direct, cfg.cluster, delta, baselines=where
            )
    progress.update(1)
    progress.set_description("sweeping the bucket")
    sweep = bucket_sweep(built, cfg)
    progress.update(1)
    progress.set_description("memory with zero copy (sampled ranks)")
    memory = memory_figures(built, cfg.full)
    progress.update(1)
    replicas = replica_sweep(cfg, progress)
    progress.update(1)
    return {
        "config": cfg.name,
        "precision": cfg.precision,
        "trainer": repr(cfg.full.trainer),
        "engine": f"TP{cfg.full.engine_tp} x {cfg.full.replicas} replicas",
        "trainer_world": built.refit.trainer_world,
        "world": built.refit.world,
        "summary": report.plan_line(built.refit, built.plan),
        "cluster": cfg.cluster.to_dict(),
        "plan": plan_figures(built.refit, built.plan),
        "memory": memory,
        "sim": sim,
        "update_model": [adam_changed_fraction(lr) for lr in LEARNING_RATES] if delta else [],
        "bucket_sweep": sweep,
        "replica_sweep": replicas,
        "plan_seconds_cpu": built.seconds_cpu,
        "plan_peak_bytes": built.peak_bytes,
    }


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--config", default="dsv3.yaml", help="a file in benches/configs or a path")
    ap.add_argument(
        "--precision",
        choices=["bf16", "fp8"],
        default=argparse.SUPPRESS,
        help="override the config's precision (default: the config's own)",
    )
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions of the local run")
    ap.add_argument("--skip-local", action="store_true", help="plan and simulate only")
    ap.add_argument("--engines", action="store_true", help="also run real trainer + vLLM engines")
    ap.add_argument(
        "--delta",
        type=float,
        default=0.03,
        metavar="FRACTION",
        help="fraction of elements a step changes for the dense vs delta figures (0: skip)",
    )
    ap.add_argument("--out", default="out", help="directory for the JSON and the plot")
    ap.add_argument(
        "--backend",
        choices=["auto", "gloo", "nccl"],
        default="auto",
        help="local execution: nccl needs a GPU per local rank, gloo runs on CPU (auto: nccl "
        "when there are enough GPUs)",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    command = f"{PROG} {shlex.join(sys.argv[1:] if argv is None else argv)}".strip()
    if args.reps < 1:
        ap.error(f"--reps must be at least 1, got {args.reps}")
    if not 0 <= args.delta <= 1:
        ap.error(f"--delta is a fraction of the elements, 0..1, got {args.delta}")
    cfg = load(args.config, precision=getattr(args, "precision", None))
    backend = pick_backend(args.backend, cfg.local.world)
    if backend == "nccl" and not args.skip_local and gpu_count() < cfg.local.world:
        ap.error(
            f"--backend nccl needs a GPU per local rank: {cfg.name}'s scaled-down copy has "
            f"{cfg.local.world} ranks (trainer {cfg.local.trainer.world} + engines "
            f"{cfg.local.engine_tp} x {cfg.local.replicas}) but this machine has {gpu_count()} "
            "GPUs; use --backend gloo"
        )
    from tqdm import tqdm

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = 5 + (0 if args.skip_local else 4)
    with tqdm(total=steps, leave=False) as bar:
        full = simulate_full(cfg, bar, args.delta)
        local = (
            None
            if args.skip_local
            else run_local(cfg, args.reps, args.engines, bar, backend, args.delta)
        )
    report.print_report(cfg, full, local)
    record = {"full": full, "local": local, "provenance": report.provenance(command)}
    json_path, png_path = out_dir / f"{cfg.name}.json", out_dir / f"{cfg.name}.png"
    report.write_json(json_path, record)
    report.plot(cfg, full, local, png_path)
    print(f"\n   wrote {json_path} and {png_path}")
    ok = local is None or (
        all(local["measured"]["paths"][p]["correct"] for p in localrun.PATHS)
        and local["measured"]["identical"]
        and all(d["correct"] for d in local["delta"])
    )
    if local and "engines" in local:
        ok = ok and bool(local["engines"].get("ok"))
        for name, why in local["engines"]["vllm_backends"].items():
            print(f"vLLM's {name} backend: {why}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
