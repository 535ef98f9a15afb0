"""Starting or joining Ray."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import ray

LOOPBACK = "127.0.0.1"


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join the Ray cluster at ``address`` (or ``$RAY_ADDRESS``, as set by ``ray job submit``),
    else start a local one bound to the loopback interface. Returns True if it started Ray."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    _loopback_only()
    ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address=LOOPBACK, log_to_driver=True)
    return True


@contextmanager
def ray_session(address: str | None = None) -> Iterator[None]:
    """Ray for a block of work (several audits share it); shut down after if it was started here."""
    started = connect(address)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _loopback_only() -> None:
    # Ray resolves "127.0.0.1" to the machine's routable address unless multi-node clusters are
    # off; turning them off (for this process and the workers it spawns) makes every Ray
    # process of a local instance listen on 127.0.0.1 only.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def cpu_actor_resources(cpus_per_worker: int | str, n_workers: int) -> dict[str, float]:
    """CPU actors share the cluster's CPUs evenly unless a count is configured; an actor never
    asks for more CPUs than the largest node has (it could not be placed)."""
    from audit.errors import InputError

    total = int(ray.cluster_resources().get("CPU", 1))
    largest = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=total)
    cpus = max(1, min(total // n_workers, largest)) if cpus_per_worker == "auto" else int(cpus_per_worker)
    if cpus > largest:
        raise InputError(f"compute.cpus_per_worker: {cpus} but the largest node of the Ray cluster has {largest} "
                         "CPUs; lower it or use auto")
    return {"num_cpus": cpus}


def embedding_placement(device_setting: str, cpus_per_worker: int | str) -> tuple[str, dict[str, float], int]:
    """Where embedding actors run: (device, actor resources, how many). One actor per GPU when the
    cluster has GPUs and the config allows them, else one CPU actor."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus > 0 and device_setting in {"auto", "cuda"}:
        return "cuda", {"num_gpus": 1.0, "num_cpus": 1}, gpus
    device = "cpu" if device_setting == "auto" else device_setting
    return device, cpu_actor_resources(cpus_per_worker, 1), 1
