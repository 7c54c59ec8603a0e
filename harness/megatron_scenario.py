"""The scenario with Megatron-core trainers (``python -m harness.scenario --trainer
megatron``): one engine refitted from every layout of ``--layouts`` in turn.

For each layout it also checks, before refitting, that Megatron's own initial weights,
gathered and mapped to HF, give HF transformers' logits (within ``--logits-atol``), that the
planner's metadata-only Megatron model (`backends.megatron.layout`) describes the same
layouts as the live ranks, and at every step that the weights gathered back from the ranks
are exactly the ones loaded into them.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from backends.vllm.ray_engine import engine_env
from harness.reference import PROMPTS, hf_generate, hf_model
from harness.reports import LayoutReport, MegatronReport, PlanFacts
from harness.scenario import check_step, make_refitter, resources, start_engines, warm_prefix_cache

__all__ = ["parse_layout", "print_report", "reference_logits", "run_megatron"]


def parse_layout(text: str) -> tuple[Any, int]:
    """``tp2pp2``, ``tp2ep2etp1``, ``pp2vpp2``, ``tp2vocab96`` ... -> (`Parallel`, vocab
    divisible by). Data parallel is the smallest that fits the experts unless given (``dp2``);
    etp is tp unless given (Megatron's default); ``vocab<N>`` sets Megatron's
    make-vocab-size-divisible-by (padding, 128 unless given)."""
    import re

    from backends.parallel import Parallel

    sizes = {k: int(v) for k, v in re.findall(r"(vocab|etp|vpp|tp|pp|ep|dp)(\d+)", text)}
    if "".join(f"{k}{v}" for k, v in re.findall(r"([a-z]+)(\d+)", text)) != text:
        raise ValueError(f"cannot read layout {text!r}")
    tp, pp, ep = sizes.get("tp", 1), sizes.get("pp", 1), sizes.get("ep", 1)
    etp = sizes.get("etp", tp)
    dp = sizes.get("dp", 1)
    while "dp" not in sizes and (tp * dp) % (ep * etp):
        dp += 1
    par = Parallel(tp=tp, pp=pp, dp=dp, ep=ep, etp=etp, vpp=sizes.get("vpp", 1))
    return par, sizes.get("vocab", 128)


def reference_logits(group: Any, model: Any, vocab: int, seed: int = 0) -> tuple[float, float]:
    """(max |Megatron logits - HF logits|, max |HF logits|) on random tokens."""
    import torch

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (2, 12), generator=g)
    mine = group.forward(tokens)
    with torch.no_grad():
        want = model(tokens).logits
    return float((mine - want).abs().max()), float(want.abs().max())


def run_megatron(args: argparse.Namespace) -> MegatronReport:
    """One engine (replicas), refitted from Megatron trainers of every layout in turn."""
    engine_env(args.engine_tp)
    import ray
    import torch

    from backends.megatron.layout import megatron_spec
    from harness.hf_checkpoint import load_grouped, save_grouped
    from harness.megatron_actors import MegatronTrainerGroup
    from harness.tiny_models import build, step_weights

    work = Path(args.workdir or tempfile.mkdtemp(prefix="refit-scenario-"))
    overrides: dict[str, Any] = {"num_hidden_layers": args.layers}
    if args.model in ("qwen3", "qwen3_tied"):
        overrides["num_key_value_heads"] = 2  # Megatron splits query groups over TP
    path = str(work / f"{args.model}_megatron")
    config = build(args.model, path, overrides=overrides)
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **resources())
    replicas = start_engines(args, path, config)
    base = load_grouped(path)
    previous = hf_generate(path, PROMPTS, args.tokens)
    initial = warm_prefix_cache(replicas, previous, args.tokens)
    layouts = []
    for li, text in enumerate(args.layouts):
        par, vocab = parse_layout(text)
        lay = LayoutReport(layout=text, parallel=repr(par), world=par.world)
        layouts.append(lay)
        t0 = time.perf_counter()
        group = MegatronTrainerGroup.launch(par.world, config, par, vocab_divisible_by=vocab)
        lay.launch_seconds = time.perf_counter() - t0
        try:
            # Megatron's own initial weights, gathered and mapped to HF, against HF itself
            own = work / f"{args.model}_{text}_init"
            save_grouped(group.export_hf(), config, own)
            lay.init_logits_diff, lay.init_logits_max = reference_logits(
                group, hf_model(str(own)), config["vocab_size"]
            )
            spec = group.describe()
            if vocab == 128:  # the benchmark's metadata model, unpadded
                meta = megatron_spec(config, par, dtype=torch.float32, te=False)
                lay.metadata_spec_equal = (
                    sorted(spec.params, key=lambda p: p.name)
                    == sorted(meta.params, key=lambda p: p.name)
                    and spec.stage_ranks == meta.stage_ranks
                )
            refitter = make_refitter(args, group, replicas)
            plan = refitter.prepare()
            lay.plan = plan.summary()
            lay.plan_facts = PlanFacts.of(plan)
            lay.bulk_fraction = plan.bulk_fraction
            lay.misc = [(c.name, c.reason) for c in plan.report if c.kind == "misc"]
            for step in range(1, args.steps + 1):
                k = 100 * (li + 1) + step  # every layout and step has its own weights
                group.load_hf(path, k)
                weights = step_weights(base, k)
                step_dir = str(work / f"{args.model}_{text}_step{step}")
                save_grouped(weights, config, step_dir)
                model = hf_model(step_dir)
                exported = group.export_hf()
                logits_diff, logits_max = reference_logits(
                    group, model, config["vocab_size"], seed=step
                )
                rec, previous = check_step(
                    refitter,
                    replicas,
                    model,
                    previous,
                    args,
                    step,
                    export_differs=sorted(
                        n for n in weights if not torch.equal(weights[n], exported[n])
                    ),
                    logits_diff=logits_diff,
                    logits_max=logits_max,
                )
                lay.steps.append(rec)
        except Exception as e:  # report the layout as failed, go on with the next
            import traceback

            lay.error = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"
        finally:
            group.shutdown()
        lay.ok = (
            lay.error is None
            and lay.init_logits_diff is not None
            and lay.init_logits_diff <= args.logits_atol
            and lay.metadata_spec_equal is not False
            and all(
                s.ok(args.atol)
                and not s.export_differs
                and s.logits_diff is not None
                and s.logits_diff <= args.logits_atol
                for s in lay.steps
            )
        )
        lay.seconds = time.perf_counter() - t0
    ray.shutdown()
    ok = all(map(all, initial)) and all(lay.ok for lay in layouts)
    return MegatronReport(args=vars(args), initial_tokens_equal=initial, layouts=layouts, ok=ok)


def print_report(report: MegatronReport) -> None:
    for lay in report.layouts:
        if lay.error is not None:
            print(f"{lay.layout}: ERROR {lay.error}")
            continue
        print(
            f"{lay.layout} ({lay.world} ranks): bulk {100 * lay.bulk_fraction:.1f}%, "
            f"init logits diff {lay.init_logits_diff:.1e}, "
            f"metadata spec equal {lay.metadata_spec_equal}, "
            f"{lay.seconds:.1f} s, {'OK' if lay.ok else 'FAILED'}"
        )
        for s in lay.steps:
            print(
                f"  step {s.step}: p2p {s.p2p_seconds:.3f} s, golden {s.golden_seconds:.3f} s, "
                f"logits diff {s.logits_diff:.1e}, tokens equal {s.tokens_equal}, max logprob "
                f"diff {s.max_logprob_diff:.2e}, p2p==golden "
                f"{not any(s.received_differs) and not any(s.state_differs)}"
            )
    print("OK" if report.ok else "FAILED")
