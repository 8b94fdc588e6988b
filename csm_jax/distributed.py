"""One process per host: JAX's distributed runtime started from the environment, and each process's share.

A multi-host run starts the same command on every host; `initialize()` connects the processes through
`jax.distributed.initialize` before anything touches a device. Each process then works on its own devices
(`jax.local_devices()`) and its share of the inputs (`share`); the processes meet only at `barrier`s
(`gather`) in JAX's coordination service, never through device collectives, so nothing here needs
cross-process collectives (it runs on CPU too). A process that fails says so (`report_failure`), and the
others' next barrier raises instead of waiting.

Where the process layout comes from, first match:
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
      all three, set by hand or by a launcher; host:port of process 0 (it serves the coordinator there),
      the number of processes, and this process's id 0 .. N-1. JAX reads only the address itself; the count
      and the id are read here. Cluster detection is then off: these three decide.
  Slurm (srun) or Open MPI (mpirun) running more than one task
      JAX detects these itself (JAX_COORDINATOR_ADDRESS alone may set the address, JAX_COORDINATOR_PORT the
      port). Under both, JAX gives each process the one GPU of its local rank (one process per GPU) unless
      JAX_LOCAL_DEVICE_IDS (e.g. 0,1,2,3,4,5,6,7) says which devices a process uses.
  CSM_JAX_DISTRIBUTED=1
      `jax.distributed.initialize()` with no arguments: JAX detects the layout (a Cloud TPU slice from the TPU
      VM's metadata, a GKE TPU or Kubernetes job, Slurm, Open MPI) or fails saying what is missing.
  none of these: one process, no distributed runtime.
"""

from __future__ import annotations

import os
import time
from typing import Mapping

EXPLICIT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
_FORCE = "CSM_JAX_DISTRIBUTED"
_KEYS = "csm_jax"  # prefix of our keys in the coordination service's store
# Launchers JAX's own cluster detection reads: (name, variables it needs, variables giving this step's task count).
_CLUSTERS = (
    ("Slurm", ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"),
     ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")),
    ("Open MPI", ("OMPI_MCA_orte_hnp_uri",), ("OMPI_COMM_WORLD_SIZE",)),
)


def _cluster(env: Mapping[str, str]) -> str | None:
    """The launcher running this process as one of several tasks, if any (as JAX detects it: srun, not a
    batch script's own step; mpirun)."""
    for name, needed, counts in _CLUSTERS:
        count = next((env[c].strip() for c in counts if c in env), "1")
        if all(k in env for k in needed) and count.isdigit() and int(count) > 1:
            return name
    return None


def _int(env: Mapping[str, str], name: str, lo: int) -> int:
    text = env[name].strip()
    if not text.isdigit() or int(text) < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {env[name]!r}")
    return int(text)


def plan(env: Mapping[str, str] | None = None) -> dict | None:
    """The keyword arguments of `jax.distributed.initialize` the environment asks for (see the module
    docstring), or None for a single process. A half-described layout raises ValueError in one line that says
    what to set."""
    env = os.environ if env is None else env
    given = {k: env[k].strip() for k in EXPLICIT if env.get(k, "").strip()}
    cluster = _cluster(env)
    if given:
        if cluster is not None and list(given) == ["JAX_COORDINATOR_ADDRESS"]:
            return {"coordinator_address": given["JAX_COORDINATOR_ADDRESS"]}  # count and id from the launcher
        missing = [k for k in EXPLICIT if k not in given]
        if missing:
            raise ValueError(f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} set but "
                             f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: a multi-host run "
                             f"needs all three (JAX_COORDINATOR_ADDRESS=host:port of process 0, JAX_NUM_PROCESSES=N, "
                             f"JAX_PROCESS_ID=0..N-1 on each process); unset them for one process")
        address = given["JAX_COORDINATOR_ADDRESS"]
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS must be host:port (process 0's host and a free port), "
                             f"got {address!r}")
        n = _int(env, "JAX_NUM_PROCESSES", 1)
        i = _int(env, "JAX_PROCESS_ID", 0)
        if i >= n:
            raise ValueError(f"JAX_PROCESS_ID={i} must be below JAX_NUM_PROCESSES={n} (ids run 0..{n - 1})")
        return {"coordinator_address": address, "num_processes": n, "process_id": i,
                "cluster_detection_method": "deactivate"}
    if cluster is not None:
        return {}
    force = env.get(_FORCE, "").strip().lower()
    if force in ("1", "true", "yes"):
        return {}
    if force not in ("", "0", "false", "no"):
        raise ValueError(f"{_FORCE} must be 1 (start JAX's distributed runtime, layout detected by JAX) or 0, "
                         f"got {env[_FORCE]!r}")
    return None


def initialize(cross_process_collectives: bool = False) -> bool:
    """Starts JAX's distributed runtime when the environment describes a multi-process run; returns whether it
    runs. Call before anything touches a device (jax.devices(), an array); calling again is harmless.
    `cross_process_collectives`: the processes' programs will run collectives across processes (training's
    gradient sums); on CPU that needs JAX's gloo collectives, a process-wide JAX setting made here when a
    multi-process run starts (it concerns JAX's CPU backend only)."""
    import jax

    kwargs = plan()
    if kwargs is None:
        return False
    if jax.distributed.is_initialized():
        return True
    if cross_process_collectives:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**kwargs)
    except ValueError as e:
        if kwargs:
            raise
        raise ValueError(f"JAX found no layout to start from ({e}): {_FORCE}=1 needs a Cloud TPU slice, a GKE or "
                         f"Kubernetes job, Slurm or Open MPI; elsewhere set JAX_COORDINATOR_ADDRESS, "
                         f"JAX_NUM_PROCESSES and JAX_PROCESS_ID instead") from None
    return True


def share(n: int) -> list[int]:
    """The indices of `n` items this process takes: i with i % process_count == process_index, so every
    item goes to exactly one process and long and short runs of items are dealt out evenly."""
    import jax

    return list(range(jax.process_index(), n, jax.process_count()))


def gather(name: str, value: str = "", timeout_s: float = 24 * 3600) -> list[str]:
    """Every process's `value`, in process order, once all have given theirs: a barrier that carries a string.
    `name` must be unique per use. Raises RuntimeError as soon as a process has reported a failure
    (`report_failure`) instead of waiting for it, or after `timeout_s`. A single process gets [value] at once.

    It goes through the coordination service's key-value store (polled), not the devices: no cross-process
    collectives. A process that dies without reporting is noticed by JAX itself when its heartbeats stop
    (100 s by default), which aborts the others."""
    import jax

    if jax.process_count() == 1:
        return [value]
    client = _client()
    n, me = jax.process_count(), jax.process_index()
    client.key_value_set(f"{_KEYS}/{name}/{me:06d}", value)
    deadline = time.monotonic() + timeout_s
    while True:
        failed = client.key_value_dir_get(f"{_KEYS}/failed/")
        if failed:
            key, why = sorted(failed)[0]
            raise RuntimeError(f"process {int(key.rsplit('/', 1)[1])} of {n} failed ({why}); "
                               f"stopped waiting at {name!r}")
        got = sorted(client.key_value_dir_get(f"{_KEYS}/{name}/"))
        if len(got) == n:
            return [v for _, v in got]
        if time.monotonic() > deadline:
            waiting = sorted(set(range(n)) - {int(k.rsplit("/", 1)[1]) for k, _ in got})
            raise TimeoutError(f"processes {waiting} did not reach {name!r} within {timeout_s:.0f} s")
        time.sleep(0.2)


def barrier(name: str, timeout_s: float = 24 * 3600) -> None:
    """Waits until every process has reached `name` (see `gather`)."""
    gather(name, "", timeout_s)


def report_failure(message: str) -> None:
    """Tells the other processes that this one failed, so their next `gather`/`barrier` raises instead of
    waiting; harmless in a single process or if the coordinator is gone already."""
    import jax

    if not jax.distributed.is_initialized() or jax.process_count() == 1:
        return
    try:
        _client().key_value_set(f"{_KEYS}/failed/{jax.process_index():06d}", message.splitlines()[0][:500]
                                if message.strip() else "no message")
    except Exception:  # noqa: BLE001 - already failing: the original error is the one to show
        pass


def _client():
    from jax._src import distributed  # the coordination service client; public jax has no barrier without collectives

    return distributed.global_state.client
