"""The fault campaign: every failure a refit must survive, on real parts, one after another.

    python -m harness.faults [--timeout 5] [--json out.json] [--markdown]

Sets up torch trainer ranks (Ray actors, TP 2) and a vLLM engine (a Ray actor) for a tiny
MoE model, a `Refitter` with ``verify=True`` and a short timeout, then for each case: cause
the failure, attempt a refit, and record which ranks raised, how fast, the error, the engine's
status (stale? rolled back?) and whether it refuses to generate; then fix the cause and check
that the next refit recovers, with vLLM generating exactly what HF transformers generates on
the trainer's current weights. Description faults (wrong dtype, wrong shape, a missing
expert, another model) are caught by `prepare` before any rank communicates.

Then the cases of the security campaign, each with its own verdict: hostile records written
into the refit's store (ignored and reported, nothing deserialized), an engine stopped with
SIGSTOP and resumed with SIGCONT, 200 failing refits in a row (threads, file descriptors and
memory of every process before and after), two refits started at once, the same engine
listed twice, and generation racing an install.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from backends import fault_injection
from harness.scenario import long_prompt

PROMPTS = [long_prompt(130, 1), [9, 8, 7]]


def _cast(rank_obj: Any, name: str, dtype: str) -> None:
    import torch

    ref = rank_obj.params.get(name)
    if ref is not None:
        from xfer import DTensorRef

        rank_obj.params[name] = DTensorRef(ref.local.to(getattr(torch, dtype)), ref.layout)


def _reshape(rank_obj: Any, name: str, undo: bool) -> None:
    from xfer import DTensorRef, Layout

    ref = rank_obj.params.get(name)
    if ref is None:
        return
    shape = list(ref.layout.shape)
    shape[0] += -1 if not undo else 1
    lay = Layout(ref.layout.mesh, ref.layout.placements, shape)
    rank_obj.params[name] = DTensorRef(ref.local, lay)


class Campaign:
    def __init__(self, args: argparse.Namespace) -> None:
        import ray

        from backends.parallel import Parallel
        from backends.torch.trainer import TorchTrainerGroup
        from backends.vllm.ray_engine import RayEngine, VllmEngineActor, engine_kwargs
        from harness.tiny_models import build
        from harness.torch_shards import checkpoint_shards
        from refit.refitter import Refitter

        self.args = args
        self.work = Path(args.workdir or tempfile.mkdtemp(prefix="refit-faults-"))
        self.path = str(self.work / "qwen3_moe")
        self.config = build("qwen3_moe", self.path)
        import torch

        ray.init(
            num_cpus=8,
            num_gpus=torch.cuda.device_count(),
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            runtime_env={"env_vars": {fault_injection.ENV: "1"}},  # arm the test hooks
        )
        self.stage_ranks = [Parallel(tp=2).stage_ranks(0)]
        gpu = args.device == "cuda"
        self.trainer = TorchTrainerGroup.launch(
            2, checkpoint_shards, self.path, 1, 2, False, 1, None, args.device,
            stage_ranks=self.stage_ranks, num_gpus=1 if gpu else 0,
        )  # fmt: skip
        self._engine_cls = ray.remote(num_cpus=0.5, num_gpus=1 if gpu else 0)(VllmEngineActor)
        self._kwargs = engine_kwargs(self.path, self.config, 1, gpu=gpu)
        self.engine_actor = self._engine_cls.remote(self._kwargs)
        self.engine = RayEngine(self.engine_actor, name="engine replica 0")
        self.refitter = Refitter(
            self.trainer, [self.engine], timeout_s=args.timeout, verify=True, delta=True
        )
        self.step = 0
        self.records: list[dict[str, Any]] = []
        self._other: Any = None  # a trainer of another model, for one description case

    # -- helpers ---------------------------------------------------------------------------
    def new_weights(self) -> None:
        from harness.scenario import set_step

        self.step += 1
        self.trainer.call(set_step, self.path, self.step)

    def engine_options(self, fault: tuple[str, str] | None = None) -> None:
        import ray

        ray.get(
            self.engine_actor.rpc.remote(
                "refit_set_options", ["moe_prepack", "tied_lm_head"], False, None, fault
            )
        )

    def generate(self, allow_stale: bool = False) -> Any:
        import ray

        return ray.get(self.engine_actor.generate.remote(PROMPTS, 6, allow_stale))

    def matches_hf(self) -> bool:
        from harness.hf_checkpoint import load_grouped, save_grouped
        from harness.scenario import hf_generate
        from harness.tiny_models import step_weights

        d = self.work / f"step{self.step}"
        save_grouped(step_weights(load_grouped(self.path), self.step), self.config, d)
        ref = hf_generate(str(d), PROMPTS, 6)
        got = self.generate()
        return all(g[0] == h[0] for g, h in zip(got, ref, strict=True)) and all(
            abs(a - b) < 1e-4
            for g, h in zip(got, ref, strict=True)
            for a, b in zip(g[1], h[1], strict=False)
        )

    def status(self) -> dict[str, Any]:
        try:
            s = self.refitter.status()[0][0]
        except Exception as e:  # the engine may be dead
            return {"alive": False, "error": type(e).__name__}
        refused = False
        try:
            self.generate()
        except Exception as e:
            refused = "StaleWeights" in f"{type(e).__name__}{e}"
        return {
            "alive": True,
            "version": s.version,
            "attempted": s.attempted,
            "stale": s.stale,
            "holds": s.holds,
            "described": s.describe(),
            "rolled_back": s.holds == s.version,
            "generate_refused": refused,
        }

    # -- a case ----------------------------------------------------------------------------
    def _wanted(self, name: str) -> bool:
        return not self.args.only or self.args.only in name

    def case(self, name: str, cause: Any, fix: Any, *, refit: bool = True) -> None:
        from refit.errors import RefitError
        from refit.watch import RefitFailed

        if not self._wanted(name):
            return
        print(f"-- {name}", flush=True)
        rec: dict[str, Any] = {"case": name}
        self.new_weights()
        cause()
        t0 = time.monotonic()
        try:
            if refit:
                self.refitter.refit()
            else:
                from refit.refitter import Refitter

                group = self._other or self.trainer
                Refitter(group, [self.engine], timeout_s=self.args.timeout).prepare()
            rec["raised"] = False
        except RefitError as e:
            rec["raised"] = True
            rec["error"] = str(e)
            if isinstance(e, RefitFailed):
                rec["failures"] = [
                    {"rank": f.rank, "role": f.role, "phase": f.phase, "message": f.message[:200]}
                    for f in e.failures
                ]
                cause_text = str(e.__cause__) if e.__cause__ else ""
                rec["sides_raised"] = [
                    side
                    for side in ("trainer", "engine")
                    if side in cause_text or any(f.role == side for f in e.failures)
                ]
        rec["seconds_to_raise"] = round(time.monotonic() - t0, 2)
        rec["status_after"] = self.status() if refit else None
        t1 = time.monotonic()
        fix()
        try:
            self.refitter.refit()
            rec["recovered"] = self.matches_hf()
        except RefitError as e:
            rec["recovered"] = False
            rec["recovery_error"] = str(e)[:500]
        rec["recovery_seconds"] = round(time.monotonic() - t1, 2)
        rec["status_recovered"] = self.status()
        self.records.append(rec)
        print(json.dumps(rec, default=str)[:400], flush=True)

    def run(self) -> list[dict[str, Any]]:
        import ray

        t = self.trainer.actors
        timeout = self.args.timeout
        self.engine_options()
        self.new_weights()
        self.refitter.refit()
        assert self.matches_hf(), "the baseline refit does not match HF"

        self.case(
            "trainer rank raises during the transfer",
            lambda: ray.get(t[1].set_fault.remote("raise", "transfer")),
            lambda: ray.get(t[1].set_fault.remote(None)),
        )
        self.case(
            f"trainer rank stalls past the {timeout:g} s timeout",
            lambda: ray.get(t[0].set_fault.remote(f"sleep:{2.5 * timeout}", "transfer")),
            lambda: ray.get(t[0].set_fault.remote(None)),
        )
        self.case(
            "engine fails before touching its running weights",
            lambda: self.engine_options(("raise", "finish install")),
            lambda: self.engine_options(None),
        )
        self.case(
            "engine fails after it started changing its running weights",
            lambda: self.engine_options(("raise", "processing modules")),
            lambda: self.engine_options(None),
        )
        self.case(
            "trainer changes its weights during the refit (verify=True)",
            lambda: ray.get(t[0].set_fault.remote("mutate", "verify")),
            self._undo_mutation,
        )
        self.case(
            "trainer rank process dies during the transfer",
            lambda: ray.get(t[1].set_fault.remote("exit", "transfer")),
            self._restart_trainer_rank,
        )
        self.case(
            "engine process dies during the transfer",
            lambda: self.engine_options(("exit", "transfer")),
            self._restart_engine,
        )
        name = "model.layers.0.mlp.gate_proj.weight"
        self.case(
            "description: wrong dtype",
            lambda: self.trainer.call(_cast, name, "float64"),
            lambda: self.trainer.call(_cast, name, "float32"),
            refit=False,
        )
        self.case(
            "description: wrong shape",
            lambda: self.trainer.call(_reshape, name, False),
            lambda: self.trainer.call(_reshape, name, True),
            refit=False,
        )
        kept: dict = {}
        expert = "model.layers.1.mlp.experts.up_proj.weight"
        self.case(
            "description: an expert projection missing",
            lambda: kept.update(
                {r: v for r, v in enumerate(self.trainer.call(_pop, expert)) if v is not None}
            ),
            lambda: self.trainer.call(_put, expert, kept),
            refit=False,
        )
        self.case(
            "description: the trainer holds another model",
            self._other_model,
            self._drop_other_model,
            refit=False,
        )
        for case in (
            self.killed_driver,
            self.hostile_store,
            self.stopped_engine,
            self.concurrent_refits,
            self.duplicated_engine,
            self.generation_races_install,
            self.refused_delta,
            self.many_failures,
        ):
            if self._wanted(case.__doc__ or case.__name__):
                case()
        return self.records

    # -- the security campaign's cases ------------------------------------------------------
    def _extra(self, name: str, rec: dict[str, Any], passed: Any) -> None:
        rec = {"case": name, "extra": True, **rec}
        rec["passed"] = bool(passed(rec)) and bool(rec["recovered"])
        self.records.append(rec)
        print(json.dumps(rec, default=str)[:400], flush=True)

    def _stats(self) -> dict[str, dict[str, int]]:
        import ray

        out = {f"trainer rank {r}": s for r, s in enumerate(self.trainer.call(proc_stats))}
        out["engine"] = ray.get(self.engine_actor.call.remote(proc_stats))
        return out

    def killed_driver(self) -> None:
        """driver killed mid-refit: another driver (its own Ray, trainer ranks and engine)
        is killed with SIGKILL while a trainer rank stalls in a refit; every process it
        started must end."""
        import subprocess

        script = self.work / "driver.py"
        script.write_text(_DRIVER.format(path=str(self.work / "qwen3_driver")))
        log = self.work / "driver.log"
        env = dict(os.environ, **{fault_injection.ENV: "1"})
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, str(script)], stdout=out, stderr=out, env=env)
        deadline = time.monotonic() + 240
        while "REFITTING" not in log.read_text() and time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            time.sleep(1)
        time.sleep(2)  # inside the refit
        started = _descendants(proc.pid)
        proc.kill()
        proc.wait()
        t0 = time.monotonic()
        left = started
        while left and time.monotonic() - t0 < 180:
            time.sleep(1)
            left = [p for p in left if _alive(p)]
        self._extra(
            "driver killed (SIGKILL) mid-refit",
            {
                "processes": len(started),
                "left": len(left),
                "seconds_until_none": round(time.monotonic() - t0, 1),
                "recovered": True,  # the campaign's own refitter is not involved
            },
            lambda x: x["processes"] >= 3 and x["left"] == 0,
        )

    def hostile_store(self) -> None:
        """hostile records: forged, pickled and garbled records under the next refit's keys."""
        from xfer import tcp_store, wire

        r = self.refitter
        self.new_weights()
        r.prepare()
        assert r._board is not None
        board = r._board
        version = r.version + 1
        marker = self.work / "pwned"
        hostile = tcp_store("127.0.0.1", r._store.port, is_master=False)
        key = board._key(version, "")
        hostile.add(key + "n", 3)
        hostile.set(key + "failure1", pickle.dumps(_Boom(str(marker))))
        hostile.set(key + "failure2", wire.seal({"rank": 0}, b"guess", key + "failure2"))
        hostile.set(key + "failure3", b"\x00garbage")
        hostile.set(key + "done0", b"done")  # a rank's record, unsealed
        t0 = time.monotonic()
        try:
            stats = r.refit()
            ok, error, ignored = stats.version == version, "", stats.ignored_records
        except Exception as e:
            ok, error, ignored = False, f"{type(e).__name__}: {e}", 0
        self._extra(
            "hostile records in the store (forged failures, a pickle, garbage, a fake done)",
            {
                "refit_ok": ok,
                "error": error[:300],
                "seconds": round(time.monotonic() - t0, 2),
                "ignored_by_ranks": ignored,
                "code_ran": marker.exists(),
                "recovered": ok and self.matches_hf(),
            },
            lambda x: x["refit_ok"] and not x["code_ran"] and x["ignored_by_ranks"] >= 3,
        )

    def stopped_engine(self) -> None:
        """engine process stopped: SIGSTOP during a refit, SIGCONT after the deadline."""
        import ray

        pid = ray.get(self.engine_actor.call.remote(proc_stats))["pid"]
        self.new_weights()
        t0 = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            self.refitter.refit()
            raised, error = False, ""
        except Exception as e:
            raised, error = True, f"{type(e).__name__}: {e}"
        seconds = round(time.monotonic() - t0, 2)
        os.kill(pid, signal.SIGCONT)
        st = self.status()
        try:
            self.refitter.refit()
            recovered = self.matches_hf()
        except Exception as e:
            recovered, error = False, error + f" | recovery: {e}"
        self._extra(
            "engine process stopped (SIGSTOP) during a refit, resumed after the deadline",
            {"raised": raised, "seconds_to_raise": seconds, "error": error[:300],
             "status_after": st, "recovered": recovered},
            lambda x: x["raised"] and x["seconds_to_raise"] < self.args.timeout + 3
            and x["status_after"]["stale"],
        )  # fmt: skip

    def concurrent_refits(self) -> None:
        """two refits started at once on one Refitter."""
        from concurrent.futures import ThreadPoolExecutor

        self.new_weights()
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(self.refitter.refit) for _ in range(2)]
            outcomes = []
            for f in futures:
                try:
                    f.result()
                    outcomes.append("ok")
                except Exception as e:
                    outcomes.append(f"{type(e).__name__}: {e}")
        self._extra(
            "two refits started at once on one Refitter",
            {"outcomes": outcomes, "recovered": "ok" in outcomes and self.matches_hf()},
            lambda x: (
                sorted(o[:2] for o in x["outcomes"]) == ["Re", "ok"]
                and any("already running" in o for o in x["outcomes"])
            ),
        )

    def duplicated_engine(self) -> None:
        """the same engine listed twice."""
        from refit.refitter import Refitter

        try:
            Refitter(self.trainer, [self.engine, self.engine])
            error = ""
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        self._extra(
            "the same engine listed twice",
            {"error": error, "raised": bool(error), "recovered": True},
            lambda x: "repeat an earlier replica" in x["error"],
        )

    def generation_races_install(self) -> None:
        """generation racing an install: the actor serializes them, so generation sees the
        old weights or the new ones, never a mix."""
        import ray

        from harness.hf_checkpoint import load_grouped, save_grouped
        from harness.scenario import hf_generate
        from harness.tiny_models import step_weights

        before = self.generate()
        self.new_weights()
        d = self.work / f"step{self.step}"
        save_grouped(step_weights(load_grouped(self.path), self.step), self.config, d)
        after_ref = hf_generate(str(d), PROMPTS, 6)
        import threading

        out: dict[str, Any] = {}
        t = threading.Thread(target=lambda: out.update(stats=self.refitter.refit()))
        t.start()
        racing = []
        while t.is_alive():
            racing.append(ray.get(self.engine_actor.generate.remote(PROMPTS, 6, True)))
        t.join()
        tokens = [[g[0] for g in r] for r in racing]
        old, new = [g[0] for g in before], [g[0] for g in after_ref]
        self._extra(
            "generation racing an install",
            {
                "generations": len(racing),
                "each_old_or_new": all(x in (old, new) for x in tokens),
                "recovered": self.matches_hf(),
            },
            lambda x: x["generations"] >= 1 and x["each_old_or_new"],
        )

    def refused_delta(self) -> None:
        """a trainer rank lost its delta baselines behind the driver's back."""
        import ray

        self.new_weights()
        self.refitter.refit()  # baselines on every rank (this generation's first is dense)
        self.new_weights()
        ray.get(self.trainer.actors[1].set_fault.remote("forget-baselines"))
        try:
            stats = self.refitter.refit()
            outcome = {"outcome": "ok", "resynced": stats.resynced, "delta": stats.delta}
        except Exception as e:
            outcome = {"outcome": f"{type(e).__name__}: {e}", "resynced": False, "delta": None}
        self.new_weights()
        again = self.refitter.refit()  # the new generation's second refit: a delta again
        self._extra(
            "a delta refused: a trainer rank lost its baselines",
            {**outcome, "next_delta": again.delta, "recovered": self.matches_hf()},
            lambda x: x["outcome"] == "ok" and x["resynced"] and not x["delta"] and x["next_delta"],
        )

    def many_failures(self, n: int | None = None) -> None:
        """failing refits in a row (a trainer rank raises), then one that succeeds: every
        process's threads, descriptors and memory before and after."""
        n = self.args.failures if n is None else n
        import ray

        t = self.trainer.actors
        self.new_weights()
        self.refitter.refit()
        time.sleep(1)
        before = self._stats()
        ray.get(t[1].set_fault.remote("raise", "transfer"))
        failed = 0
        t0 = time.monotonic()
        for _ in range(n):
            try:
                self.refitter.refit()
            except Exception:
                failed += 1
        seconds = time.monotonic() - t0
        ray.get(t[1].set_fault.remote(None))
        self.refitter.refit()
        # Abandoned waits end at the group timeout; a slow machine may need a few of them.
        deadline = time.monotonic() + 6 * self.args.timeout
        while True:
            after = self._stats()
            if not _grown(before, after) or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        self._extra(
            f"{n} failing refits in a row",
            {
                "failed": failed,
                "seconds_per_failure": round(seconds / max(1, n), 3),
                "before": before,
                "after": after,
                "grown": _grown(before, after),
                "recovered": self.matches_hf(),
            },
            lambda x: x["failed"] == n and not x["grown"],
        )

    def _undo_mutation(self) -> None:
        import ray

        from harness.scenario import set_step

        ray.get(self.trainer.actors[0].set_fault.remote(None))
        self.trainer.call(set_step, self.path, self.step)  # the weights it meant to send

    def _restart_trainer_rank(self) -> None:
        self.trainer.restart_rank(1)
        from harness.scenario import set_step

        self.trainer.call(set_step, self.path, self.step)

    def _restart_engine(self) -> None:
        from backends.vllm.ray_engine import RayEngine

        self.engine_actor = self._engine_cls.remote(self._kwargs)
        self.engine = RayEngine(self.engine_actor, name="engine replica 0 (restarted)")
        self.engine_options()
        self.refitter.replace_engine(0, self.engine)

    def _other_model(self) -> None:
        """A trainer of the dense model, to be refit into the MoE engine."""
        from backends.torch.trainer import TorchTrainerGroup
        from harness.tiny_models import build
        from harness.torch_shards import checkpoint_shards

        other = str(self.work / "qwen3")
        build("qwen3", other)
        self._other = TorchTrainerGroup.launch(2, checkpoint_shards, other, 1, 2)

    def _drop_other_model(self) -> None:
        import ray

        for a in self._other.actors:
            ray.kill(a)
        self._other = None


def _grown(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> list[str]:
    """What leaked: a process whose threads or descriptors grew by more than a few (fewer is
    no leak: an earlier case's leftovers may end meanwhile)."""
    return [
        f"{p} {k} {before[p][k]} -> {after[p][k]}"
        for p in before
        for k in ("threads", "fds")
        if after[p][k] - before[p][k] > 5
    ]


def proc_stats(_obj: Any = None) -> dict[str, int]:
    """Threads, open file descriptors and resident memory of the calling process."""
    fds = len(os.listdir("/proc/self/fd"))
    threads = len(os.listdir("/proc/self/task"))
    rss = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return {"threads": threads, "fds": fds, "rss": rss, "pid": os.getpid()}


_DRIVER = """
import os
import ray
from backends.torch.trainer import TorchTrainerGroup
from backends.vllm.ray_engine import RayEngine, VllmEngineActor, engine_kwargs
from harness.tiny_models import build
from harness.torch_shards import checkpoint_shards
from refit import Refitter

path = {path!r}
config = build("qwen3", path)
ray.init(num_cpus=4, log_to_driver=False, include_dashboard=False,
         runtime_env={{"env_vars": {{"REFIT_FAULT_INJECTION": "1"}}}})
trainer = TorchTrainerGroup.launch(2, checkpoint_shards, path, 1, 2)
engine = ray.remote(num_cpus=0.5)(VllmEngineActor).remote(engine_kwargs(path, config))
refitter = Refitter(trainer, RayEngine(engine), timeout_s=60)
refitter.refit()
ray.get(trainer.actors[1].set_fault.remote("sleep:600", "transfer"))
print("REFITTING", flush=True)
refitter.refit()
"""


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out.setdefault(ppid, []).append(int(d))
    return out


def _descendants(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        for c in kids.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class _Boom:
    """Unpickling this would write a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path(self.path).write_text, ("code ran",))


def _pop(rank_obj: Any, name: str) -> Any:
    return rank_obj.params.pop(name, None)


def _put(rank_obj: Any, name: str, kept: dict) -> None:
    if rank_obj.rank in kept:
        rank_obj.params[name] = kept[rank_obj.rank]


def _clean(text: str) -> str:
    """One line, without gloo's source paths."""
    import re

    text = re.sub(r"\[/[^\]]*\] ", "", text)
    return " ".join(text.replace("|", "/").split())


def _extra_row(r: dict[str, Any]) -> str:
    if "before" in r:
        growth = {
            k: max(r["after"][p][k] - r["before"][p][k] for p in r["before"])
            for k in ("threads", "fds", "rss")
        }
        what = (
            f"{r['failed']} failed ({r['seconds_per_failure']} s each); largest change over "
            f"every process: threads {growth['threads']:+d}, fds {growth['fds']:+d}, RSS "
            f"{growth['rss'] / 2**20:+.1f} MiB"
        )
    elif "code_ran" in r:
        what = (
            f"refit {'succeeded' if r['refit_ok'] else 'failed'} in {r['seconds']} s; "
            f"{r['ignored_by_ranks']} records ignored and reported by the ranks; code ran: "
            f"{r['code_ran']}"
        )
    elif "outcomes" in r:
        what = "; ".join(_clean(o)[:70] for o in r["outcomes"])
    elif "seconds_until_none" in r:
        what = (
            f"{r['processes']} processes it started; {r['left']} left after "
            f"{r['seconds_until_none']} s"
        )
    elif "generations" in r:
        what = (
            f"{r['generations']} generations during the refit, each on the old or the new "
            f"weights: {r['each_old_or_new']}"
        )
    elif "resynced" in r:
        what = (
            f"refit {_clean(r['outcome'])[:60]}; resynced dense at once: {r['resynced']}; "
            f"next refit a delta: {r['next_delta']}"
        )
    elif "seconds_to_raise" in r:
        st = r["status_after"]
        what = (
            f"raised in {r['seconds_to_raise']} s; engine after: "
            f"{'stale' if st.get('stale') else 'fresh'}"
        )
    else:
        what = _clean(r.get("error", ""))[:100]
    nxt = "recovered, matches HF" if r.get("recovered") else "did not recover"
    return f"| {r['case']} | {'yes' if r['passed'] else 'NO'} | {what} | {nxt} |"


def markdown(records: list[dict[str, Any]]) -> str:
    extra = [r for r in records if r.get("extra")]
    records = [r for r in records if not r.get("extra")]
    rows = [
        "| case | every side raised | seconds to raise | reported as | engine after | next refit |",
        "|---|---|---|---|---|---|",
    ]
    tail = [
        "",
        "| case | passed | what happened | next refit |",
        "|---|---|---|---|",
        *[_extra_row(r) for r in extra],
    ]
    for r in records:
        if not r.get("raised"):
            raised = "no (not detected)"
        elif r.get("failures") is None:
            raised = "prepare, before any communication"
        else:
            raised = ", ".join(sorted(set(r.get("sides_raised", [])))) or "driver"
        if r.get("failures"):
            f = r["failures"][0]
            who = "driver" if f["rank"] < 0 else f"{f['role']} rank {f['rank']}"
            reported = f"{who} in {f['phase']}: {_clean(f['message'])[:70]}"
        else:
            lines = r.get("error", "").splitlines()
            reported = _clean(lines[1] if len(lines) > 1 else lines[0] if lines else "")[:80]
        st = r.get("status_after") or {}
        if not st:
            after = "untouched"
        elif not st.get("alive"):
            after = "dead (restarted)"
        else:
            held = (
                "rolled back"
                if st["rolled_back"]
                else "partly new"
                if st["holds"] is None
                else "holds the new weights"
            )
            after = (
                f"{'stale' if st['stale'] else 'fresh'}, {held}, "
                f"{'refuses' if st['generate_refused'] else 'serves'} generate"
            )
        nxt = "recovered, matches HF" if r.get("recovered") else "did not recover"
        rows.append(
            f"| {r['case']} | {raised} | {r['seconds_to_raise']} | {reported} | {after} | {nxt} |"
        )
    return "\n".join(rows + tail)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m harness.faults",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--timeout", type=float, default=5.0, help="the Refitter's timeout (s)")
    ap.add_argument(
        "--failures", type=int, default=200, help="failing refits in a row, for the leak count"
    )
    ap.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="cuda: a GPU per rank, NCCL"
    )
    ap.add_argument("--only", default="", help="run only the cases whose name contains this")
    ap.add_argument("--workdir", help="where models are written (default: a temporary dir)")
    ap.add_argument("--json", help="write every case's record here")
    ap.add_argument("--markdown", action="store_true", help="print the results as a table")
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    socket.setdefaulttimeout(None)
    records = Campaign(args).run()
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1, default=str))
    if args.markdown:
        print(markdown(records))
    ok = all(r["passed"] if r.get("extra") else r["raised"] and r["recovered"] for r in records)
    print("all cases raised and recovered" if ok else "SOME CASES FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
