"""The refit benchmark: ``python -m benches.refit --config dsv3.yaml``.

1. Plan at full scale from metadata only (Megatron trainer layout -> vLLM engine replicas):
   bulk/misc bytes, per-rank bytes in/out, messages and rounds, plan build time and memory.
2. Simulate the refit on the configured cluster (`benches.simulate`, link-level): seconds for
   p2p (also for other `streams` values), golden and the gather + broadcast baseline, beside
   the lower bound.
3. Calibrate this machine's links (`benches.calibrate`) and execute a scaled-down copy of
   the same architecture and layouts on local gloo ranks (`benches.localrun`; NCCL when a
   GPU per rank is present): p2p vs golden vs gather + broadcast, measured in one run, with
   their results checked identical; then predict the local run with the calibrated model
   and print prediction and measurement side by side.
4. With ``--engines``, the scaled-down copy also runs through real torch trainer ranks and
   real vLLM engines via Ray (`backends.scenario`), checked against HF transformers.

Everything goes to ``<out>/<config>.json`` and a plot ``<out>/<config>.png``.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

from backends.megatron_layout import megatron_spec
from backends.vllm_layout import engine_spec
from benches import calibrate, localrun
from benches.config import BenchConfig, Side, load
from benches.simulate import SimResult, simulate
from refit.planner import RefitPlan, plan_refit
from xfer import Plan, plan_reshard
from xfer.local import RankPool

GB = 1e9


def stage_plans(plan: RefitPlan, bucket_bytes: int) -> list[Plan]:
    """Every stage's xfer plan."""
    return [
        plan_reshard(st.items, world_size=len(st.ranks), bucket_bytes=bucket_bytes)
        for st in plan.stages
    ]


def _plan(side: Side) -> tuple[RefitPlan, list[Plan]]:
    trainer = megatron_spec(side.model, side.trainer)
    engine = engine_spec(side.model, side.engine_tp, expert_parallel=side.expert_parallel)
    plan = plan_refit(trainer, [engine] * side.replicas)
    return plan, stage_plans(plan, side.bucket_bytes)


def build_plans(side: Side) -> tuple[RefitPlan, list[Plan], dict[str, float]]:
    """The refit plan and every stage's xfer plan, with build time (one core) and memory:
    timed in one build and traced in another (tracing slows the build about twofold)."""
    t0 = time.process_time()
    plan, plans = _plan(side)
    cpu = time.process_time() - t0
    tracemalloc.start()
    _plan(side)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return plan, plans, {"plan_seconds_cpu": cpu, "plan_peak_mib": peak / 2**20}


def plan_figures(plan: RefitPlan, plans: list[Plan]) -> dict[str, Any]:
    world, t = plan.world, plan.trainer_world
    bytes_in, bytes_out = np.zeros(world), np.zeros(world)
    messages = rounds = chunks = 0
    for st, p in zip(plan.stages, plans, strict=True):
        s = p.stats
        g2r = np.asarray(st.ranks)
        np.add.at(bytes_in, g2r, s.bytes_in)
        np.add.at(bytes_out, g2r, s.bytes_out)
        messages += s.messages
        rounds = max(rounds, s.rounds)
        chunks += len(p.chunks)
    return {
        "summary": plan.summary(),
        "params": len(plan.report),
        "bulk_bytes_per_replica": plan.bulk_bytes,
        "misc_bytes_per_replica": plan.misc_bytes,
        "bulk_fraction": plan.bulk_fraction,
        "messages": messages,
        "max_rounds_per_stage": rounds,
        "chunks": chunks,
        "trainer_out_GB": {"max": bytes_out[:t].max() / GB, "mean": bytes_out[:t].mean() / GB},
        "engine_in_GB": {"max": bytes_in[t:].max() / GB, "mean": bytes_in[t:].mean() / GB},
        "bytes_in": bytes_in.tolist(),
        "bytes_out": bytes_out.tolist(),
    }


def pick_backend(requested: str, world: int) -> str:
    """`auto`: NCCL when this machine has a GPU for every local rank, else gloo."""
    if requested != "auto":
        return requested
    import torch

    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world else "gloo"


def run_local(
    cfg: BenchConfig, reps: int, engines: bool, progress: Any, backend: str = "gloo"
) -> dict[str, Any]:
    side = cfg.local
    plan, plans, build = build_plans(side)
    pool = RankPool(side.world)
    run = functools.partial(
        localrun.execute,
        streams=side.streams,
        bucket_bytes=side.bucket_bytes,
        reps=reps,
        pool=pool,
        backend=backend,
    )
    try:
        progress.set_description("calibrating local links")
        figures = pool.run(calibrate.calibrate_rank, side.world, timeout=600)[0]
        runs = []
        for kind in (calibrate.TINY, calibrate.LARGE):
            synth = calibrate.synthetic_plan(side.trainer, side.engine_tp, side.replicas, **kind)
            runs.append((synth, stage_plans(synth, side.bucket_bytes), run(synth)))
        figures = calibrate.fit(figures, side.world, side.streams, runs[0], runs[1])
        progress.update(1)
        progress.set_description("executing the scaled-down copy")
        measured = run(plan)
        progress.update(1)
    finally:
        pool.close()
    cluster = calibrate.local_cluster(figures, side.world)
    nodes = np.zeros(plan.world, dtype=np.int64)
    predicted = simulate(plan, plans, cluster, streams=side.streams, nodes=nodes)
    out = {
        "backend": backend,
        "layout": f"trainer {side.trainer} -> engine TP{side.engine_tp} x {side.replicas}",
        "plan": plan.summary(),
        "bytes_per_replica": plan.bulk_bytes + plan.misc_bytes,
        "calibration": figures,
        "cluster": cluster.to_dict(),
        "measured": measured,
        "predicted": predicted.to_dict(),
        **build,
    }
    if engines:
        progress.set_description("running real trainer + vLLM engines")
        out["engines"] = run_engines(cfg)
    progress.update(1)
    return out


def run_engines(cfg: BenchConfig) -> dict[str, Any]:
    """The scaled-down copy through real trainer ranks and vLLM engines (a subprocess, since
    vLLM keeps process-wide state)."""
    import subprocess
    import tempfile

    side = cfg.local
    with tempfile.TemporaryDirectory(prefix="refit-engines-") as d:
        report = Path(d) / "report.json"
        cmd = [
            sys.executable, "-m", "backends.scenario", "--config-json", json.dumps(side.model),
            "--trainer-pp", str(side.trainer.pp), "--trainer-dp", str(side.trainer.dp),
            "--trainer-tp", str(side.trainer.tp), "--engine-tp", str(side.engine_tp),
            "--replicas", str(side.replicas), "--streams", str(side.streams), "--steps", "2",
            "--workdir", d, "--json", str(report),
        ]  # fmt: skip
        if side.trainer.ep > 1:
            cmd.append("--trainer-ep")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if not report.exists():
            return {"ok": False, "error": proc.stderr[-4000:]}
        return json.loads(report.read_text())


def print_report(cfg: BenchConfig, full: dict[str, Any], local: dict[str, Any] | None) -> None:
    f, sim = full["plan"], full["sim"]
    print(f"\n== {cfg.name}: {f['summary']}")
    print(
        f"   precision {cfg.precision}; bulk {100 * f['bulk_fraction']:.3f}% of bytes; "
        f"{f['messages']} messages, up to {f['max_rounds_per_stage']} rounds per stage, "
        f"{f['chunks']} chunks"
    )
    print(
        f"   plan built in {full['plan_seconds_cpu']:.2f} s CPU (one core), peak "
        f"{full['plan_peak_mib']:.0f} MiB; per rank: trainer out max "
        f"{f['trainer_out_GB']['max']:.2f} GB, engine in max {f['engine_in_GB']['max']:.2f} GB"
    )
    print(f"\n   simulated on {cfg.cluster.name}:")
    lb = sim["lower_bound"]
    rows = [
        ("lower bound (max rank in/out)", lb),
        ("  engine receive bound", sim["receive_bound"]),
        (f"p2p (streams={cfg.full.streams})", sim["p2p"]),
        ("golden (broadcast every shard)", sim["golden"]),
        ("gather + broadcast baseline", sim["baseline"]),
    ]
    for label, secs in rows:
        print(f"   {label:<34}{secs:>9.3f} s   {secs / lb:>6.2f} x bound")
    sweep = "  ".join(f"{k}: {v:.2f} s" for k, v in full["streams_sweep"].items())
    print(f"   p2p by streams (stages in flight): {sweep}")
    for p in cfg.published:
        lo, hi = p["seconds"]
        print(f"   published: {p['what']}: {lo}-{hi} s")
    if local is None:
        return
    m, pr = local["measured"], local["predicted"]
    cal = local["calibration"]
    print(
        f"\n== scaled-down copy on this machine ({platform.node()}, {local['backend']}): "
        f"{local['plan']}"
    )
    print(
        f"   calibrated links: pair {cal['pair_GBps']:.2f} GB/s, aggregate "
        f"{cal['aggregate_GBps']:.2f} GB/s; reshard {cal['p2p_GBps']:.2f} GB/s p2p, "
        f"{cal['broadcast_GBps']:.2f} GB/s broadcast (copies included); "
        f"{cal['round_latency_us']:.0f} us/round, {cal['msg_latency_us']:.0f} us/message, "
        f"{cal['collective_latency_us']:.0f} us/broadcast"
    )
    base = m["paths"]["p2p"]["seconds"]
    print(f"   {'path':<16}{'measured':>10}{'predicted':>11}{'error':>8}{'x p2p':>8}  identical")
    for path, key in calibrate.PATHS:
        s = m["paths"][path]["seconds"]
        p = pr[key]
        print(
            f"   {path:<16}{s:>9.3f}s{p:>10.3f}s{100 * (p - s) / s:>7.0f}%{s / base:>8.2f}"
            f"  {m['paths'][path]['correct'] and m['identical']}"
        )
    if "engines" in local:
        e = local["engines"]
        if "steps" in e:
            for s in e["steps"]:
                print(
                    f"   real engines, step {s['step']}: p2p {s['p2p_seconds']:.3f} s, golden "
                    f"{s['golden_seconds']:.3f} s, tokens equal HF: {s['tokens_equal']}"
                )
        print(f"   real trainer + vLLM engines: {'OK' if e.get('ok') else 'FAILED'}")


def plot(cfg: BenchConfig, full: dict[str, Any], local: dict[str, Any] | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f, sim = full["plan"], full["sim"]
    n = 3 if local else 2
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.2))
    t = full["trainer_world"]
    ax = axes[0]
    ax.plot(np.asarray(f["bytes_out"]) / GB, label="bytes out", lw=0.8)
    ax.plot(np.asarray(f["bytes_in"]) / GB, label="bytes in", lw=0.8)
    ax.axvline(t - 0.5, color="gray", ls=":")
    ax.set(xlabel="refit rank (trainer | engines)", ylabel="GB", title="bytes per rank (p2p plan)")
    ax.legend()
    ax = axes[1]
    labels = ["lower\nbound", "p2p", "golden", "gather+\nbcast"]
    vals = [sim["lower_bound"], sim["p2p"], sim["golden"], sim["baseline"]]
    ax.bar(labels, vals, color=["gray", "C2", "C1", "C3"])
    for p in cfg.published:
        ax.axhspan(*p["seconds"], color="C0", alpha=0.2, label="published")
    ax.set_yscale("log")
    ax.set(
        ylabel="seconds (simulated)", title=f"{cfg.name} on {cfg.cluster.gpus_per_node}-GPU nodes"
    )
    if cfg.published:
        ax.legend()
    if local:
        ax = axes[2]
        paths = calibrate.PATHS
        x = np.arange(len(paths))
        ax.bar(
            x - 0.2,
            [local["measured"]["paths"][p]["seconds"] for p, _ in paths],
            0.4,
            label="measured",
        )
        ax.bar(x + 0.2, [local["predicted"][k] for _, k in paths], 0.4, label="predicted")
        ax.set_xticks(x, [p for p, _ in paths])
        ax.set(ylabel="seconds", title="scaled-down copy on this machine")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="dsv3.yaml", help="a file in benches/configs or a path")
    ap.add_argument("--precision", choices=["bf16", "fp8"], help="override the config's")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions of the local run")
    ap.add_argument("--skip-local", action="store_true", help="plan and simulate only")
    ap.add_argument("--engines", action="store_true", help="also run real trainer + vLLM engines")
    ap.add_argument("--out", default="out", help="directory for the JSON and the plot")
    ap.add_argument(
        "--backend",
        choices=["auto", "gloo", "nccl"],
        default="auto",
        help="local execution: nccl with a GPU per rank, gloo on CPU (auto: nccl if possible)",
    )
    args = ap.parse_args(argv)
    from tqdm import tqdm

    cfg = load(args.config, precision=args.precision)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = 2 + (0 if args.skip_local else 3)
    with tqdm(total=steps, desc="planning at full scale", leave=False) as bar:
        plan, plans, build = build_plans(cfg.full)
        figures = plan_figures(plan, plans)
        bar.update(1)
        bar.set_description("simulating")
        sim: SimResult = simulate(plan, plans, cfg.cluster, streams=cfg.full.streams)
        sweep = {}
        k = 1
        while k <= len(plan.stages):
            same = k == cfg.full.streams
            sweep[k] = sim.p2p if same else simulate(plan, plans, cfg.cluster, streams=k).p2p
            k *= 2
        bar.update(1)
        full = {
            "config": cfg.name,
            "precision": cfg.precision,
            "trainer": repr(cfg.full.trainer),
            "engine": f"TP{cfg.full.engine_tp} x {cfg.full.replicas} replicas",
            "trainer_world": plan.trainer_world,
            "cluster": cfg.cluster.to_dict(),
            "plan": figures,
            "sim": sim.to_dict(),
            "streams_sweep": sweep,
            **build,
        }
        backend = pick_backend(args.backend, cfg.local.world)
        local = None if args.skip_local else run_local(cfg, args.reps, args.engines, bar, backend)
    print_report(cfg, full, local)
    report = {"full": full, "local": local, "machine": platform.node()}
    (out_dir / f"{cfg.name}.json").write_text(json.dumps(report, indent=1, default=str))
    plot(cfg, full, local, out_dir / f"{cfg.name}.png")
    print(f"\n   wrote {out_dir / (cfg.name + '.json')} and {out_dir / (cfg.name + '.png')}")
    ok = local is None or (
        all(local["measured"]["paths"][p]["correct"] for p in localrun.PATHS)
        and local["measured"]["identical"]
    )
    if local and "engines" in local:
        ok = ok and bool(local["engines"].get("ok"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
