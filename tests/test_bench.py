"""The benchmark's parts: configs, the link model, the local execution, the command."""

from __future__ import annotations

import json

import pytest
import torch

from benches import localrun
from benches.config import ConfigError, load
from benches.refit import build_plans, main
from benches.simulate import Cluster, simulate
from refit.planner import plan_refit
from refit.spec import DestParam, EngineSpec, SourceParam, TrainerSpec
from xfer import Layout, Mesh, Replicate, plan_reshard

CONFIGS = ["dsv3", "llama3_8b", "qwen3_30b_a3b", "qwen3_235b_a22b"]


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_load(name):
    cfg = load(f"{name}.yaml")
    assert cfg.full.world > cfg.local.world >= 6
    assert cfg.cluster.nic_GBps == 50.0  # 400 Gb/s


def test_dsv3_config_is_the_published_comparison_point():
    cfg = load("dsv3")
    t = cfg.full.trainer
    assert (t.pp, t.ep, t.tp, t.world) == (16, 16, 1, 256)
    assert (cfg.full.engine_tp, cfg.full.replicas) == (32, 8)
    assert cfg.cluster.gpus_per_node == 8
    assert cfg.published and cfg.published[0]["seconds"] == [2.39, 2.83]


def test_fp8_precision_and_bad_names():
    assert "quantization_config" in load("dsv3", precision="fp8").full.model
    with pytest.raises(ConfigError, match=r"known: \[.dsv3.yaml."):
        load("nope")


def _one_tensor_plan(nbytes_rows: int):
    shape = (nbytes_rows, 512)  # bf16: 1 KiB rows
    src = SourceParam(
        "w", shape, torch.bfloat16, 0, Layout(Mesh([0], ("tp",)), [Replicate()], shape)
    )
    dst = DestParam(
        "w", shape, torch.bfloat16, "w", Layout(Mesh([0], ("tp",)), [Replicate()], shape)
    )
    plan = plan_refit(TrainerSpec(1, ((0,),), (src,)), [EngineSpec(1, (dst,))])
    return plan, [plan_reshard(st.items, world_size=2) for st in plan.stages]


def test_model_of_one_message_across_nodes():
    plan, sps = _one_tensor_plan(2048)  # 2 MiB from rank 0 to rank 1 on the next node
    c = Cluster("test", gpus_per_node=1, nic_GBps=2.0, nvlink_GBps=100.0, msg_latency_us=5,
                round_latency_us=10, collective_latency_us=20, copy_GBps=4.0, copy_overlaps=False)  # fmt: skip
    r = simulate(plan, sps, c, streams=1)
    nbytes = 2048 * 512 * 2
    link = nbytes / 2e9
    copies = nbytes / 4e9  # the busiest rank packs (or unpacks) it once
    latency = 10e-6 + 5e-6  # one round; each rank handles one message
    agree = 10e-6 + 20e-6
    assert r.p2p == pytest.approx(link + copies + latency + agree, rel=1e-9)
    assert r.lower_bound == pytest.approx(link, rel=1e-9) and r.receive_bound == r.lower_bound
    assert r.golden > r.p2p and r.baseline > r.p2p


def test_dsv3_at_full_scale_model_properties():
    cfg = load("dsv3")
    plan, sps, _ = build_plans(cfg.full)
    assert plan.bulk_fraction == 1.0
    by_streams = [simulate(plan, sps, cfg.cluster, streams=k).p2p for k in (1, 2, 16)]
    assert by_streams[0] > by_streams[1] > by_streams[2]
    r = simulate(plan, sps, cfg.cluster, streams=cfg.full.streams)
    assert r.lower_bound <= r.p2p <= 1.10 * r.lower_bound
    assert r.receive_bound == pytest.approx(43.94e9 / 50e9, rel=0.01)  # the design's ~0.88 s
    assert r.golden > 10 * r.p2p and r.baseline > r.golden


def test_local_execution_paths_agree(ranks):
    cfg = load("dsv3")
    small = {**cfg.local.model, "hidden_size": 256, "intermediate_size": 512,
             "moe_intermediate_size": 128, "vocab_size": 2048, "num_hidden_layers": 2}  # fmt: skip
    from dataclasses import replace

    side = replace(cfg.local, model=small)
    plan, _, _ = build_plans(side)
    out = localrun.execute(plan, streams=side.streams, bucket_bytes=1 << 20, reps=1, pool=ranks)
    assert out["identical"]
    assert all(out["paths"][p]["correct"] for p in localrun.PATHS)


def test_command_plans_simulates_and_writes(tmp_path, capsys):
    assert main(["--config", "llama3_8b.yaml", "--skip-local", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "llama3_8b.json").read_text())
    assert report["full"]["plan"]["bulk_fraction"] == 1.0
    assert report["full"]["sim"]["p2p"] >= report["full"]["sim"]["lower_bound"] > 0
    assert (tmp_path / "llama3_8b.png").stat().st_size > 10_000
    assert "gather + broadcast baseline" in capsys.readouterr().out
