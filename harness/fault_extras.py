"""The fault campaign's cases beyond injected failures (`harness.faults`): a killed driver,
hostile records in the store, a stopped engine, two refits at once, an engine listed twice,
generation racing an install, a refused delta, and many failing refits in a row (leaks).

`ExtraCases` is a mixin of `harness.faults.Campaign`: its methods use the campaign's
trainer, engine, refitter and helpers, and put their records in its report."""

from __future__ import annotations

import os
import pickle
import signal
import sys
import time
from pathlib import Path
from typing import Any

from backends import fault_injection
from harness.fault_report import (
    CampaignReport,
    ConcurrentRefits,
    DriverKilled,
    DuplicatedEngine,
    Extra,
    GenerationRace,
    HostileStore,
    ManyFailures,
    ProcStats,
    RefusedDelta,
    StoppedEngine,
)
from harness.reference import long_prompt

PROMPTS = [long_prompt(130, 1), [9, 8, 7]]  # the campaign's generation checks


class ExtraCases:
    """The extra cases, for `Campaign`, which provides what is declared here and the helpers
    `new_weights`, `generate`, `matches_hf` and `status`."""

    args: Any
    work: Path
    report: CampaignReport
    trainer: Any
    engine: Any
    engine_actor: Any
    refitter: Any
    config: Any
    path: str
    step: int

    def _extra(self, field: str, rec: Extra) -> None:
        setattr(self.report, field, rec)
        print(str(rec)[:400], flush=True)

    def _stats(self) -> dict[str, ProcStats]:
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
            "driver_killed",
            DriverKilled(
                case="driver killed (SIGKILL) mid-refit",
                passed=len(started) >= 3 and not left,
                recovered=True,  # the campaign's own refitter is not involved
                processes=len(started),
                left=len(left),
                seconds_until_none=round(time.monotonic() - t0, 1),
            ),
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
        seconds = round(time.monotonic() - t0, 2)
        ran = marker.exists()
        self._extra(
            "hostile_store",
            HostileStore(
                case="hostile records in the store (forged failures, a pickle, garbage, a fake "
                "done)",
                passed=ok and not ran and ignored >= 3,
                recovered=ok and self.matches_hf(),
                refit_ok=ok,
                error=error[:300],
                seconds=seconds,
                ignored_by_ranks=ignored,
                code_ran=ran,
            ),
        )

    def stopped_engine(self) -> None:
        """engine process stopped: SIGSTOP during a refit, SIGCONT after the deadline."""
        import ray

        pid = ray.get(self.engine_actor.call.remote(proc_stats)).pid
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
            "stopped_engine",
            StoppedEngine(
                case="engine process stopped (SIGSTOP) during a refit, resumed after the deadline",
                passed=raised and seconds < self.args.timeout + 3 and st.stale,
                recovered=recovered,
                raised=raised,
                seconds_to_raise=seconds,
                error=error[:300],
                status_after=st,
            ),
        )

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
            "concurrent_refits",
            ConcurrentRefits(
                case="two refits started at once on one Refitter",
                passed=sorted(o[:2] for o in outcomes) == ["Re", "ok"]
                and any("already running" in o for o in outcomes),
                recovered="ok" in outcomes and self.matches_hf(),
                outcomes=outcomes,
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
            "duplicated_engine",
            DuplicatedEngine(
                case="the same engine listed twice",
                passed="repeat an earlier replica" in error,
                recovered=True,
                raised=bool(error),
                error=error,
            ),
        )

    def generation_races_install(self) -> None:
        """generation racing an install: the actor serializes them, so generation sees the
        old weights or the new ones, never a mix."""
        import ray

        from harness.hf_checkpoint import load_grouped, save_grouped
        from harness.reference import hf_generate
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
        each = all(x in (old, new) for x in tokens)
        self._extra(
            "generation_race",
            GenerationRace(
                case="generation racing an install",
                passed=len(racing) >= 1 and each,
                recovered=self.matches_hf(),
                generations=len(racing),
                each_old_or_new=each,
            ),
        )

    def refused_delta(self) -> None:
        """a trainer rank lost its delta baselines behind the driver's back."""
        import ray

        self.new_weights()
        self.refitter.refit()  # baselines on every rank (this generation's first is dense)
        self.new_weights()
        ray.get(self.trainer.actors[1].set_fault.remote("forget-baselines"))
        delta: bool | None = None
        try:
            stats = self.refitter.refit()
            outcome, resynced, delta = "ok", stats.resynced, stats.delta
        except Exception as e:
            outcome, resynced = f"{type(e).__name__}: {e}", False
        self.new_weights()
        again = self.refitter.refit()  # the new generation's second refit: a delta again
        self._extra(
            "refused_delta",
            RefusedDelta(
                case="a delta refused: a trainer rank lost its baselines",
                passed=outcome == "ok" and resynced and delta is False and again.delta,
                recovered=self.matches_hf(),
                outcome=outcome,
                resynced=resynced,
                delta=delta,
                next_delta=again.delta,
            ),
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
        grown = _grown(before, after)
        self._extra(
            "many_failures",
            ManyFailures(
                case=f"{n} failing refits in a row",
                passed=failed == n and not grown,
                recovered=self.matches_hf(),
                failed=failed,
                seconds_per_failure=round(seconds / max(1, n), 3),
                before=before,
                after=after,
                grown=grown,
            ),
        )


def _grown(before: dict[str, ProcStats], after: dict[str, ProcStats]) -> list[str]:
    """What leaked: a process whose threads or descriptors grew by more than a few (fewer is
    no leak: an earlier case's leftovers may end meanwhile)."""
    return [
        f"{p} {k} {getattr(before[p], k)} -> {getattr(after[p], k)}"
        for p in before
        for k in ("threads", "fds")
        if getattr(after[p], k) - getattr(before[p], k) > 5
    ]


def proc_stats(_obj: Any = None) -> ProcStats:
    """Threads, open file descriptors and resident memory of the calling process."""
    fds = len(os.listdir("/proc/self/fd"))
    threads = len(os.listdir("/proc/self/task"))
    rss = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return ProcStats(threads=threads, fds=fds, rss=rss, pid=os.getpid())


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
