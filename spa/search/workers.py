"""Where trials run: in this process, in a pool of local processes, or on Ray actors.

Every pool has ``size`` slots; ``submit(slot, plan_dict)`` returns a
``concurrent.futures.Future`` of the trial's measurement. A worker is built from
``(model_path, folder, threads, latency, metric)``: paths and settings, never a model or a
session. A slot whose worker died (a crashed process, a lost Ray actor) is restarted by
``restart(slot)``; only the trial it ran fails.
"""

from __future__ import annotations

import os
from concurrent.futures import Future

from spa.errors import ArgumentError

#: ``--workers`` forms.
FORMS = "local:N, ray or ray:ADDRESS"


def parse(spec: str | None) -> tuple[str, object]:
    """``local:N`` -> ("local", N); ``ray`` -> ("ray", None); ``ray:ADDR`` -> ("ray", ADDR)."""
    spec = (spec or "local:1").strip()
    kind, _, rest = spec.partition(":")
    if kind == "local":
        try:
            n = int(rest or 1)
        except ValueError:
            n = 0
        if n < 1:
            raise ArgumentError(f"--workers {spec!r}: expected local:N with N >= 1 processes")
        return "local", n
    if kind == "ray":
        return "ray", rest or None
    raise ArgumentError(f"--workers {spec!r} is not one of {FORMS}")


def cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class InProcess:
    """One slot in the driver's process (``local:1``, ``spa worker``)."""

    size = 1

    def __init__(self, args: tuple):
        from spa.search.evaluate import Evaluator

        self.evaluator = Evaluator(*args)

    def submit(self, slot: int, plan: dict) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(self.evaluator(plan))
        except Exception as exc:  # the trial fails, the study goes on
            fut.set_exception(exc)
        return fut

    def restart(self, slot: int) -> None:
        pass

    def close(self) -> None:
        pass


class LocalPool:
    """``local:N``: N single-process executors (spawned), so one dying process fails one trial."""

    def __init__(self, n: int, args: tuple):
        import multiprocessing as mp

        self.size, self.args = n, args
        self._ctx = mp.get_context("spawn")  # no fork of a process holding onnxruntime threads
        self._slots = [self._start() for _ in range(n)]
        self._check()

    def _check(self) -> None:
        """Every process starts and loads its model, or the pool refuses (nothing is lost)."""
        from concurrent.futures.process import BrokenProcessPool

        from spa.search.evaluate import run_in_process

        try:
            for fut in [ex.submit(run_in_process, None) for ex in self._slots]:
                fut.result()
        except BrokenProcessPool as exc:
            self.close()
            raise ArgumentError(
                "the local worker processes died while starting. Python starts them with 'spawn', which imports "
                "the main script again: a script calling spa.search(..., workers='local:N') must run it under "
                "`if __name__ == \"__main__\":` (and a metric function must be importable, not a lambda)") from exc

    def _start(self):
        from concurrent.futures import ProcessPoolExecutor

        from spa.search.evaluate import init_process

        return ProcessPoolExecutor(1, mp_context=self._ctx, initializer=init_process, initargs=self.args)

    def submit(self, slot: int, plan: dict) -> Future:
        from spa.search.evaluate import run_in_process

        return self._slots[slot].submit(run_in_process, plan)

    def restart(self, slot: int) -> None:
        self._slots[slot].shutdown(wait=False, cancel_futures=True)
        self._slots[slot] = self._start()

    def close(self) -> None:
        for ex in self._slots:
            ex.shutdown(wait=False, cancel_futures=True)


class _Actor:
    """A Ray actor holding one evaluator."""

    def __init__(self, *args):
        from spa.search.evaluate import Evaluator

        self.evaluator = Evaluator(*args)

    def run(self, plan: dict) -> dict:
        return self.evaluator(plan)


class RayPool:
    """``ray`` / ``ray:ADDRESS``: one actor per CPU of the cluster (``ray.init()`` locally when
    Ray is not started and no address is given). Model and study folder must be readable at the
    same paths on every node."""

    def __init__(self, address, args: tuple):
        try:
            import ray
        except ImportError as exc:
            raise ArgumentError('--workers ray needs Ray: pip install "spa-prune[ray]"') from exc
        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
            self.started = True
        n = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.size, self.args = n, (args[0], args[1], 1, *args[3:])  # one intra-op thread per actor CPU
        self._cls = ray.remote(num_cpus=1, max_restarts=0)(_Actor)
        self._slots = [self._cls.remote(*self.args) for _ in range(n)]

    def submit(self, slot: int, plan: dict) -> Future:
        return self._slots[slot].run.remote(plan).future()

    def dead(self, exc: BaseException) -> bool:
        return isinstance(exc, self.ray.exceptions.RayActorError)

    def restart(self, slot: int) -> None:
        self.ray.kill(self._slots[slot])
        self._slots[slot] = self._cls.remote(*self.args)

    def close(self) -> None:
        for a in self._slots:
            self.ray.kill(a)
        if self.started:
            self.ray.shutdown()


def pool(spec: str | None, args: tuple):
    """The pool ``--workers spec`` names, its workers built from ``args``."""
    kind, value = parse(spec)
    model_path, folder, _, *rest = args
    if kind == "ray":
        return RayPool(value, args)
    if value == 1:
        return InProcess((model_path, folder, cpus(), *rest))
    return LocalPool(value, (model_path, folder, max(1, cpus() // value), *rest))


def died(pool_, exc: BaseException) -> bool:
    """Whether ``exc`` says the worker itself is gone (restart its slot), not just its trial."""
    from concurrent.futures.process import BrokenProcessPool

    if isinstance(exc, BrokenProcessPool):
        return True
    return bool(getattr(pool_, "dead", None) and pool_.dead(exc))
