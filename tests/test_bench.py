"""The benchmark's parts: configs, the link and memory models, the local execution, the command."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from benches import localrun
from benches.config import CONFIG_DIR, ConfigError, load
from benches.memory import extra_memory
from benches.refit import build_plans, local_memory, main, parser, specs
from benches.report import plain
from benches.simulate import Cluster, simulate
from refit.planner import plan_refit
from refit.spec import DestParam, EngineSpec, SourceParam, TrainerSpec
from xfer import Layout, Mesh, Replicate, plan_reshard

CONFIGS = ["dsv3", "kimi_k2", "llama3_8b", "qwen3_30b_a3b", "qwen3_235b_a22b"]
GIB = 2**30


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_load(name):
    cfg = load(f"{name}.yaml")
    assert cfg.full.world > cfg.local.world >= 6
    assert cfg.cluster.nic_GBps == 50.0  # 400 Gb/s
    assert cfg.cluster.nvlink_GBps == 450.0


def test_dsv3_config_is_the_published_comparison_point():
    cfg = load("dsv3")
    t = cfg.full.trainer
    assert (t.pp, t.ep, t.tp, t.world) == (16, 16, 1, 256)
    assert (cfg.full.engine_tp, cfg.full.replicas) == (32, 8)
    assert cfg.cluster.gpus_per_node == 8
    assert cfg.published and cfg.published[0]["seconds"] == [2.39, 2.83]
    # the bucket comes from the 2 GiB budget per engine GPU: (budget - misc) / 2
    assert cfg.full.max_extra_bytes == 2 * GIB
    assert cfg.full.bucket_bytes(0) == GIB
    assert cfg.full.bucket_bytes(100 << 20) == GIB - (50 << 20)
    with pytest.raises(ConfigError, match="leaves a bucket"):
        cfg.full.bucket_bytes(2 * GIB)


def test_fp8_precision_and_bad_names():
    assert "quantization_config" in load("dsv3", precision="fp8").full.model
    with pytest.raises(ConfigError, match=r"known: \[.dsv3.yaml."):
        load("nope")


def _write_variant(tmp_path, old: str, new: str):
    """llama3_8b.yaml with `old` replaced by `new`."""
    raw = (CONFIG_DIR / "llama3_8b.yaml").read_text()
    assert old in raw
    path = tmp_path / "variant.yaml"
    path.write_text(raw.replace(old, new))
    return path


@pytest.mark.parametrize(
    "old, new, section, known",
    [
        (
            "refit: {bucket_mib: 512}",
            "refit: {bucket_mb: 512}",
            "refit",
            "bucket_mib, max_extra_gib",
        ),
        ("nic_GBps: 50", "nic_gbps: 400", "cluster", "nic_GBps"),
        (
            "  refit: {bucket_mib: 16}",
            "  refit: {streams: 2, bucket_mib: 16}",
            "local.refit",
            "bucket_mib",
        ),
        ("engine: {tp: 2, replicas: 4}", "engine: {tp: 2, replica: 4}", "engine", "replicas"),
        ("precision: bf16", "precison: bf16", "top level", "precision"),
    ],
)
def test_unknown_keys_are_refused_naming_the_known_ones(tmp_path, old, new, section, known):
    path = _write_variant(tmp_path, old, new)
    with pytest.raises(ConfigError) as e:
        load(str(path))
    msg = str(e.value)
    assert f"{section}: unknown key" in msg and "known keys:" in msg and known in msg


def _one_tensor(rows: int, *, misc: bool = False):
    """A [rows, 512] bf16 tensor (1 KiB rows) from trainer rank 0 to one engine rank."""
    shape = (rows, 512)
    whole = Layout(Mesh([0], ("tp",)), [Replicate()], shape)
    src = SourceParam("w", shape, torch.bfloat16, 0, whole)
    dst = DestParam("w", shape, torch.bfloat16, "w", None if misc else whole)
    refit = plan_refit(TrainerSpec(1, ((0,),), (src,)), [EngineSpec(1, (dst,))])
    return refit, plan_reshard(refit.items, world_size=refit.world, bucket_bytes=1 << 20)


def test_model_of_one_message_across_nodes():
    refit, plan = _one_tensor(2048)  # 2 MiB from rank 0 to rank 1 on the next node
    c = Cluster("test", gpus_per_node=1, nic_GBps=2.0, nvlink_GBps=100.0, msg_latency_us=5,
                round_latency_us=10, collective_latency_us=20, step_latency_us=100,
                copy_GBps=4.0, copy_overlaps=False)  # fmt: skip
    r = simulate(refit, plan, c)
    nbytes = 2048 * 512 * 2
    rounds = plan.rounds  # 1 MiB buckets: two rounds of 1 MiB
    assert rounds == 2 and r.rounds == 2
    link = nbytes / 2e9
    copies = nbytes / 4e9  # the busiest rank packs (or unpacks) it once
    latency = rounds * (10e-6 + 5e-6)  # each rank handles one message per round
    assert r.p2p == pytest.approx(link + copies + latency + 100e-6, rel=1e-9)
    assert r.breakdown["step"] == pytest.approx(100e-6)
    assert r.lower_bound == pytest.approx(link, rel=1e-9) and r.receive_bound == r.lower_bound
    assert r.golden > r.p2p and r.baseline > link


def test_memory_model_staging_and_misc():
    refit, plan = _one_tensor(4096, misc=True)  # 4 MiB misc tensor, 1 MiB buckets
    assert len(refit.misc) == 1 and refit.bulk == 0
    mem = extra_memory(refit, plan)
    st = plan.stats
    assert mem.max("p2p", "trainer") == 2 * st.peak_send_round[0] == 2 << 20
    assert mem.max("p2p", "engine") == 2 * st.peak_recv_round[1] + (4 << 20) == 6 << 20
    # golden holds the largest cell, the baseline the whole tensor (and misc on engines)
    assert mem.max("golden", "engine") == (4 << 20) + (4 << 20)
    assert mem.max("baseline", "trainer") == 4 << 20  # the root holds it already: no gather


def test_dsv3_at_full_scale_model_properties():
    cfg = load("dsv3")
    built = build_plans(cfg.full)
    # 8 replicas may relay: a forwarding engine rank sends from its receive buffers, so two
    # buffers of 1 GiB fit 2 GiB
    assert built.refit.bulk_fraction == 1.0 and built.bucket_bytes == GIB
    assert len(built.plan.relay) > 0  # the planner found relay faster
    r = simulate(built.refit, built.plan, cfg.cluster)
    assert r.lower_bound <= r.p2p <= 1.20 * r.lower_bound
    assert r.receive_bound == pytest.approx(43.94e9 / 50e9, rel=0.01)  # the design's ~0.88 s
    assert r.golden > 10 * r.p2p and r.baseline > r.golden
    mem = extra_memory(built.refit, built.plan)
    assert GIB < mem.max("p2p", "engine") <= 2 * GIB  # within the budget
    assert 0 < mem.max("p2p", "trainer") <= 2 * GIB  # two send buffers, within 4 GiB
    st = built.plan.stats
    t = built.refit.trainer_world
    # the trainer sends one chain's worth, not a replica's each: engines forward the rest
    assert st.bytes_out[:t].sum() + st.relay_bytes == st.bytes_in[t:].sum()
    assert st.bytes_out[:t].sum() <= st.bytes_in[t:].sum() // 2  # half or less
    assert mem.max("p2p", "engine") == 2 * st.peak_recv_round[t:].max()
    # engine ranks send only what they forward, from their receive staging
    forwarders = np.unique(built.plan.relay.forwarder)
    assert (forwarders >= t).all() and st.peak_send_round[forwarders].max() > 0


def test_local_execution_paths_agree_and_memory_matches_the_model(ranks):
    cfg = load("dsv3", precision="fp8")  # fp8: scales are misc tensors, held whole
    small = {**cfg.local.model, "hidden_size": 256, "intermediate_size": 512,
             "moe_intermediate_size": 128, "vocab_size": 2048, "num_hidden_layers": 2}  # fmt: skip
    side = replace(cfg.local, model=small, bucket_cap=1 << 20)
    built = build_plans(side)
    assert built.refit.misc and built.refit.bulk
    trainer, engine = specs(side)
    out = localrun.execute(
        trainer, engine, side.replicas, bucket_bytes=built.bucket_bytes, reps=1, pool=ranks
    )
    assert out["identical"]
    assert all(out["paths"][p]["correct"] for p in localrun.PATHS)
    # what each rank held matches the model: p2p with zero copy, from every rank's program
    # (within the plan's bound), golden and the baseline from the plan
    model = local_memory(built)
    for path, key in (("p2p", "p2p"), ("golden", "golden"), ("gather+bcast", "baseline")):
        assert out["paths"][path]["extra_bytes"] == model[key], path
    for role in ("engine", "trainer"):
        # within the bound, and not nothing: trainer ranks stage the column slices they send
        # (strided on their side), engine ranks hold the misc tensors (the scales) whole
        assert 0 < model["p2p"][role] <= model["p2p_bound"][role]
    # without parts (part_bytes=0, through the ranks' options) a round's message to a peer
    # spans several tensors and is staged on both sides: more staging on every engine rank
    whole = localrun.execute(
        trainer, engine, side.replicas, bucket_bytes=built.bucket_bytes, reps=1, pool=ranks,
        part_bytes=0,
    )  # fmt: skip
    assert whole["identical"] and all(whole["paths"][p]["correct"] for p in localrun.PATHS)
    staged = whole["paths"]["p2p"]["extra_bytes"]["engine"]
    assert staged > model["p2p"]["engine"], (staged, model["p2p"])
    # processor time: every rank's, summed over ranks, within what the cores can give
    cores = out["host_cores"]
    for path in localrun.PATHS:
        row = out["paths"][path]
        assert row["cpu_seconds"] > 0 and 0 < row["busy_cores"] <= cores + 0.25, (path, row)


def test_local_delta_run_is_exact_and_sends_what_changed(ranks):
    cfg = load("dsv3")
    small = {**cfg.local.model, "hidden_size": 256, "intermediate_size": 512,
             "moe_intermediate_size": 128, "vocab_size": 2048, "num_hidden_layers": 2}  # fmt: skip
    side = replace(cfg.local, model=small, bucket_cap=1 << 20)
    built = build_plans(side)
    trainer, engine = specs(side)
    kw = {"bucket_bytes": built.bucket_bytes, "reps": 1, "pool": ranks}
    sparse = localrun.execute_delta(trainer, engine, side.replicas, fraction=0.03, **kw)
    every = localrun.execute_delta(
        trainer, engine, side.replicas, fraction=1.0, persistent=True, **kw
    )
    for out in (sparse, every):
        assert out["correct"]  # every engine rank holds the full tensors' slices, bit for bit
        assert out["dense"]["wire_bytes"] == out["dense"]["dense_bytes"] > 0
        assert out["delta"]["baseline_bytes"]["trainer"] > 0
    assert sparse["delta"]["baseline_bytes"]["engine"] > 0  # received while serving
    ratio = sparse["delta"]["wire_bytes"] / sparse["delta"]["dense_bytes"]
    assert 0.06 < ratio < 0.12  # 3% of bf16 words, 6 B per changed word
    assert every["delta"]["wire_bytes"] == every["delta"]["dense_bytes"]  # dense fallback
    # engine buffers that persist are patched in place: no engine baselines
    assert every["delta"]["baseline_bytes"]["engine"] == 0
    # delta refits are received first and installed after: the pause is part of the refit
    assert 0 < sparse["delta"]["pause_s"] < sparse["delta"]["seconds"]


def test_command_plans_simulates_and_writes_standard_json(tmp_path):
    assert main(["--config", "llama3_8b.yaml", "--skip-local", "--out", str(tmp_path)]) == 0

    def no_constants(x):
        raise AssertionError(f"non-standard JSON constant {x}")

    report = json.loads((tmp_path / "llama3_8b.json").read_text(), parse_constant=no_constants)
    full = report["full"]
    assert full["plan"]["bulk_fraction"] == 1.0
    assert full["sim"]["p2p"] >= full["sim"]["lower_bound"] > 0
    assert full["sim"]["receive_bound"] > 0
    mem = full["memory"]
    assert mem["engine_extra_bytes_max"] > 0 and mem["trainer_extra_bytes_max"] > 0
    assert mem["engine_extra_bytes_max"] <= 2 * full["plan"]["bucket_bytes"]
    prov = report["provenance"]
    assert prov["versions"]["torch"] == torch.__version__
    assert prov["command"].startswith("python -m benches.refit --config llama3_8b.yaml")
    assert prov["machine"]["cpu_cores"] >= 1 and "gpus" in prov["machine"]
    assert report["local"] is None
    assert (tmp_path / "llama3_8b.png").stat().st_size > 10_000
    delta = full["sim"]["delta"]  # 3% changed by default
    assert delta["fraction"] == 0.03 and abs(delta["ratio"] - 0.09) < 1e-9
    assert delta["seconds"] < delta["dense_seconds"] == pytest.approx(full["sim"]["p2p"])
    assert delta["host"]["seconds"] > delta["trainer-device"]["seconds"] > delta["seconds"]
    rates = [u["steady"] for u in full["update_model"]]
    assert 0 < rates[0] < rates[1] < rates[2] < 1  # AdamW at lr 1e-7, 1e-6, 1e-5


def test_plain_json_replaces_non_finite_numbers():
    import numpy as np

    x = plain({"a": math.nan, "b": [np.float32(math.inf), np.int64(3)], 4: np.array([1.5])})
    assert x == {"a": None, "b": [None, 3], "4": [1.5]}
    json.dumps(x, allow_nan=False)


def test_cli_names_itself_and_shows_defaults():
    text = " ".join(parser().format_help().split())
    assert text.startswith("usage: python -m benches.refit")
    assert "(default: dsv3.yaml)" in text and "(default: 5)" in text


@pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.device_count() >= 8, reason="has a GPU per rank"
)
def test_nccl_is_refused_without_a_gpu_per_rank(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["--config", "dsv3", "--backend", "nccl", "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--backend nccl" in err and f"{load('dsv3').local.world} ranks" in err
    assert not out.exists()  # refused before anything started


def test_the_calibration_fit_recovers_the_figures_that_made_the_runs():
    # three synthetic refits "measured" by the model itself with known figures: the fit,
    # handed the raw tiny-operation latencies, gets back the round and broadcast latencies
    # and the three throughputs; the message latency stays as measured (the large run's
    # parts make many messages per round, which a scaled message latency would overprice)
    from benches import calibrate

    cfg = load("dsv3")
    side = cfg.local
    true = {
        "pair_GBps": 50.0, "aggregate_GBps": 4.0, "round_latency_us": 900.0,
        "msg_latency_us": 40.0, "collective_latency_us": 300.0, "step_latency_us": 5000.0,
        "p2p_GBps": 3.0, "broadcast_GBps": 2.5, "baseline_broadcast_GBps": 3.5,
    }  # fmt: skip
    runs = []
    for kind in (calibrate.EMPTY, calibrate.TINY, calibrate.LARGE):
        t, e = calibrate.synthetic_specs(side.trainer, side.engine_tp, kind)
        refit = plan_refit(t, [e] * side.replicas)
        plan = plan_reshard(refit.items, world_size=refit.world, bucket_bytes=16 << 20)
        sim = simulate(
            refit,
            plan,
            calibrate.local_cluster(true, refit.world),
            nodes=np.zeros(refit.world, dtype=np.int64),
        )
        paths = {"p2p": sim.p2p, "golden": sim.golden, "gather+bcast": sim.baseline}
        runs.append((refit, plan, {"paths": {k: {"seconds": v} for k, v in paths.items()}}))
    assert runs[2][1].stats.messages > len(runs[2][1].pairs)  # the large tensors go in parts
    # what `calibrate_rank` measures: links and tiny-operation latencies, no rates yet
    keep = ("pair_GBps", "aggregate_GBps", "msg_latency_us")
    raw = {k: true[k] for k in keep} | {"round_latency_us": 100.0, "collective_latency_us": 50.0}
    fitted = calibrate.fit(raw, side.world, *runs)
    # within 5%: the fit leaves the tiny run's few bytes out of its latency
    for key, want in true.items():
        assert fitted[key] == pytest.approx(want, rel=0.05), key


def test_calibration_views_merge_into_rank_zeros_figures_and_the_cores_cost_per_gb():
    from benches import calibrate

    views = [
        {"pair_GBps": 2.0 + r, "aggregate_GBps": 5.0, "pairs_cpu_s": 0.01 * (r + 1),
         "pairs_bytes": 4 * 2.0**26}
        for r in range(4)
    ]  # fmt: skip
    merged = calibrate.merge(views)
    assert merged["pair_GBps"] == 2.0 and merged["aggregate_GBps"] == 5.0
    assert "pairs_cpu_s" not in merged and "pairs_bytes" not in merged
    assert merged["aggregate_cpu_s_per_GB"] == pytest.approx(0.1 / (4 * 2.0**26 / 1e9))
