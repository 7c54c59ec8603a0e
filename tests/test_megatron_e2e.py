"""Megatron-core trainers (real models, 2-4 gloo ranks as Ray actors) into real vLLM engines.

One `harness.scenario --trainer megatron` process per model keeps one engine and refits it
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

from tests.support import check_megatron, scenario

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("megatron")


DENSE = ["tp2", "pp2", "tp2pp2", "pp2vpp2", "tp2vocab96"]
MOE = ["tp2", "pp2", "tp2pp2", "ep2", "tp2ep2etp1", "tp2ep2etp2", "pp2vpp2"]


def test_dense_tied_embeddings_into_engine_tp1(workdir):
    r = scenario(
        workdir, "--trainer", "megatron", "--model", "qwen3_tied", "--layouts", ",".join(DENSE),
        timeout=800,
    )  # fmt: skip
    by = check_megatron(r, DENSE)
    assert by["tp2pp2"].world == 4
    for name in DENSE[:-1]:
        assert by[name].bulk_fraction == 1.0 and by[name].misc == []
    # Megatron pads the vocab to 384 rows (192 per TP rank): not a torch.chunk split of 256
    ((misc, why),) = by["tp2vocab96"].misc
    assert misc == "model.embed_tokens.weight" and "pads the vocab to 384 rows" in why
    assert all(s.misc_bytes > 0 for s in by["tp2vocab96"].steps)


@pytest.mark.parametrize("model", ["qwen3_moe", "dsv3"])
def test_moe_models_into_engine_tp2(workdir, model):
    r = scenario(
        workdir, "--trainer", "megatron", "--model", model, "--engine-tp", "2",
        "--layouts", ",".join(MOE), timeout=800,
    )  # fmt: skip
    by = check_megatron(r, MOE)
    assert all(lay.bulk_fraction == 1.0 for lay in by.values())
    assert by["tp2ep2etp2"].world == 4 and by["ep2"].plan_facts.replica_world == 2
    assert by["pp2vpp2"].plan_facts.stages == 2
