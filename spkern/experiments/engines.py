"""Where a sweep's runs execute.

An engine takes runs and hands back their results; the sweep (spkern.experiments.sweep)
decides which runs, in which order, and is the only writer of the results. The interface is
small on purpose, so that another scheduler fits without touching the grid or the results:

* ``slots``: how many runs it executes at once;
* ``submit(train_fn, cfg, data, device)``: starts ``train_fn(cfg, data, device=..., progress=...)``
  and returns a :class:`concurrent.futures.Future` of its result (the run's dict);
* ``cancel(future)``: gives up a run the sweep no longer needs (best effort);
* ``close()``: releases what the engine started.

:class:`SerialEngine` runs each run at once, in this process (the default; a run's steps
show in the progress bar). :class:`RayEngine` runs each as a Ray task: one per GPU
(``gpus_per_run``) where there are GPUs, else ``workers`` CPU workers with an equal share of
the cores each; a worker process that dies is replaced and its run retried by Ray, and the
run is recorded once, by the sweep, when its result arrives. A SLURM engine would be the
same few lines around submitit's ``AutoExecutor`` (its jobs are waited on like futures).
"""

import concurrent.futures
import os
from typing import Optional

ENGINES = ("serial", "ray")


class SerialEngine:
    """Every run at once in this process, one after another."""

    slots = 1
    speculates = False  # (running ahead of the adaptive search would only add work here)

    def __init__(self, progress=None):
        self.progress = progress  # a tqdm bar over each run's steps

    def submit(self, train_fn, cfg, data, device) -> concurrent.futures.Future:
        future = concurrent.futures.Future()
        future.set_result(train_fn(cfg, data, device=device, progress=self.progress))
        return future

    def cancel(self, future):
        pass

    def close(self):
        pass


def _train_task(train_fn, cfg, data, device, threads):
    """A run in a Ray worker: its share of the cores, no progress bar."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    return train_fn(cfg, data, device=device, progress=None)


class RayEngine:
    """Every run a Ray task, on a local Ray cluster started for the sweep (``address=None``)
    or on an existing one (``address``: ``"auto"`` or ``"host:port"``).

    With ``gpus_per_run`` each run gets that many GPUs (device ``cuda``) and there are as many
    slots as the cluster's GPUs allow; otherwise ``workers`` runs at once (default: one per
    core), each on ``cores // workers`` cores. ``max_retries``: how often a run whose worker
    process died is started again.
    """

    speculates = True

    def __init__(self, workers: Optional[int] = None, gpus_per_run: float = 0, address: Optional[str] = None,
                 max_retries: int = 3):
        try:
            import ray
        except ImportError:
            raise RuntimeError("the ray engine needs Ray: pip install 'ray>=2.40' (requirements.txt pins the "
                               "tested version)") from None
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be a positive number, got {workers}")
        if gpus_per_run < 0:
            raise ValueError(f"gpus_per_run must be >= 0, got {gpus_per_run}")
        self._ray = ray
        self._refs = {}  # future -> its Ray task
        self._started = not ray.is_initialized()
        if self._started:
            kw = dict(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
            if address is None:
                kw["num_cpus"] = os.cpu_count() or 1
            ray.init(address=address, **kw)
        resources = ray.cluster_resources()
        cpus, gpus = int(resources.get("CPU", 1)), resources.get("GPU", 0)
        if gpus_per_run:
            if gpus < gpus_per_run:
                self.close()
                raise ValueError(f"gpus_per_run={gpus_per_run}, but the Ray cluster has {gpus:g} GPUs")
            self.slots = max(1, int(gpus // gpus_per_run))
            self.threads = None
            self.device = "cuda"
            options = dict(num_gpus=gpus_per_run, num_cpus=max(1, cpus // self.slots))
        else:
            self.slots = workers or cpus
            self.threads = max(1, cpus // self.slots)
            self.device = None
            options = dict(num_cpus=self.threads)
        self.address = address or "a local cluster started for the sweep"
        self._task = ray.remote(_train_task).options(max_retries=max_retries, retry_exceptions=False, **options)
        self._data = self._data_ref = None

    def submit(self, train_fn, cfg, data, device) -> concurrent.futures.Future:
        if data is not self._data:  # the data once in Ray's object store, for every task
            self._data, self._data_ref = data, self._ray.put(data)
        ref = self._task.remote(train_fn, cfg, self._data_ref, self.device or device, self.threads)
        future = ref.future()
        self._refs[future] = ref
        future.add_done_callback(lambda f: self._refs.pop(f, None))
        return future

    def cancel(self, future):
        ref = self._refs.pop(future, None)
        if ref is not None:
            self._ray.cancel(ref, force=True)

    def close(self):
        for future in list(self._refs):
            self.cancel(future)
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
            self._started = False


__all__ = ["ENGINES", "RayEngine", "SerialEngine"]
