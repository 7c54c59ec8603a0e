"""Megatron-core trainers (real models, 2-4 gloo ranks as Ray actors) into real vLLM engines.

One `backends.scenario --trainer megatron` process per model keeps one engine and refits it
from a Megatron trainer of each layout in turn. Per layout:

* reference: Megatron's own initial weights, gathered from the ranks' HF views, give HF
  transformers the logits Megatron computes (1e-5, float32); the described layouts equal the
  benchmark's metadata model of Megatron's placement;
* per step (new weights loaded into Megatron through the same views): the gathered weights
  equal what was loaded bit for bit, Megatron's logits equal HF's, and after a p2p and a
  golden refit the engine's received tensors and every tensor it runs with are identical
  between the two, its greedy generation equals HF's (logprobs within 1e-4), and HF's output
  changed since the step before.
"""

from __future__ import annotations

import pytest

from tests.support import scenario

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("megatron")


DENSE = ["tp2", "pp2", "tp2pp2", "pp2vpp2", "tp2vocab96"]
MOE = ["tp2", "pp2", "tp2pp2", "ep2", "tp2ep2etp1", "tp2ep2etp2", "pp2vpp2"]


def check(report: dict, layouts: list[str], steps: int = 2) -> dict[str, dict]:
    assert all(map(all, report["initial_tokens_equal"])), report["initial_tokens_equal"]
    by = {lay["layout"]: lay for lay in report["layouts"]}
    assert list(by) == layouts
    for name, lay in by.items():
        assert "error" not in lay, (name, lay.get("error"))
        assert lay["init_logits_diff"] <= 1e-5 and lay["init_logits_max"] > 0.1, name
        if "vocab" not in name:  # the metadata model knows only the default vocab padding
            assert lay["metadata_spec_equal"], name
        assert len(lay["steps"]) == steps, name
        for s in lay["steps"]:
            assert s["export_differs"] == [], (name, s["export_differs"])
            assert s["logits_diff"] <= 1e-5, (name, s["logits_diff"])
            assert not any(s["received_differs"]) and not any(s["state_differs"]), name
            assert s["captured_tensors"] > 0 and s["bulk_bytes"] > 0, name
            assert all(all(row) for row in s["tokens_equal"]), (name, s["tokens_equal"])
            assert s["max_logprob_diff"] <= 1e-4, name
            assert s["hf_changed"], name
        assert lay["ok"], name
    assert report["ok"] and report["returncode"] == 0
    return by


def test_dense_tied_embeddings_into_engine_tp1(workdir):
    r = scenario(
        workdir, "--trainer", "megatron", "--model", "qwen3_tied", "--layouts", ",".join(DENSE),
        timeout=800,
    )  # fmt: skip
    by = check(r, DENSE)
    assert by["tp2pp2"]["world"] == 4
    for name in DENSE[:-1]:
        assert by[name]["bulk_fraction"] == 1.0 and by[name]["misc"] == []
    # Megatron pads the vocab to 384 rows (192 per TP rank): not a torch.chunk split of 256
    ((misc, why),) = by["tp2vocab96"]["misc"]
    assert misc == "model.embed_tokens.weight" and "pads the vocab to 384 rows" in why
    assert all(s["misc_bytes"] > 0 for s in by["tp2vocab96"]["steps"])


@pytest.mark.parametrize("model", ["qwen3_moe", "dsv3"])
def test_moe_models_into_engine_tp2(workdir, model):
    r = scenario(
        workdir, "--trainer", "megatron", "--model", model, "--engine-tp", "2",
        "--layouts", ",".join(MOE), timeout=800,
    )  # fmt: skip
    by = check(r, MOE)
    assert all(lay["bulk_fraction"] == 1.0 for lay in by.values())
    assert by["tp2ep2etp2"]["world"] == 4 and by["ep2"]["plan_facts"]["replica_world"] == 2
    assert by["pp2vpp2"]["plan_facts"]["stages"] == 2
