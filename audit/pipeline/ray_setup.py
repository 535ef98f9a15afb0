"""Starting or joining Ray.

Which Ray a command uses (``run``, ``screen``, ``reference embed``, ``watch``; docs/architecture.md,
"Starting Ray"): the cluster at the address it is given -- ``--address``, else the config's
``compute.address``, else ``$RAY_ADDRESS`` (set inside a ``ray job submit`` job) -- or, with no
address, a private local Ray that the command starts on 127.0.0.1 and stops at the end, even when a
cluster that ``ray start`` runs is on the same machine: a local audit never takes over a shared
cluster's GPUs, and what it does never depends on whether someone ran ``ray start`` here. The
address ``auto`` (Ray's own lookup) joins the cluster ``ray start`` runs on this machine; ``local``
is the private local Ray. An address that cannot be joined is refused before any work (nothing
listening: within seconds) with an :class:`~audit.errors.InputError` (the CLI: one line, exit 2).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from audit.errors import InputError

LOOPBACK = "127.0.0.1"
JOIN_CHECK_TIMEOUT_S = 3.0
_FIX = ("start the cluster (ray start --head), correct the address, or leave --address/RAY_ADDRESS unset to use "
        "a private local Ray")


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join the Ray cluster at ``address`` (or ``$RAY_ADDRESS``), else start a private local one
    bound to the loopback interface (see the module docstring). Returns True if it started Ray."""
    if ray.is_initialized():
        return False
    origin = "--address/compute.address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        _join(address, origin)
        return False
    _loopback_only()
    # "local": a new instance even when Ray's lookup would find a cluster on this machine
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address=LOOPBACK,
             log_to_driver=True)
    return True


def _join(address: str, origin: str) -> None:
    """``ray.init`` on ``address`` once a quick check says something listens there; a cluster that
    cannot be joined is an :class:`InputError` rather than Ray's wait (a minute or more, in native
    code that no signal interrupts) and a ConnectionError."""
    host, port = _resolve(address, origin)
    try:
        socket.create_connection((host, port), timeout=JOIN_CHECK_TIMEOUT_S).close()
    except OSError as exc:
        raise _refused(origin, address, f"nothing answers at {host}:{port}: {exc.strerror or exc}") from None
    try:
        ray.init(address=address, log_to_driver=True)
    except (ConnectionError, RuntimeError) as exc:
        if ray.is_initialized():
            ray.shutdown()
        if _token_refused(exc):
            raise InputError(
                f"{origin} {address}: the Ray cluster there refused this process's authentication token; set "
                "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or ~/.ray/auth_token) to the cluster's token, or leave "
                "--address/RAY_ADDRESS unset to use a private local Ray") from exc
        raise _refused(origin, address, _first_line(exc)) from exc


def _resolve(address: str, origin: str) -> tuple[str, int]:
    """(host, port) that ``address`` points at: host:port, ray://host:port, or ``auto`` through
    Ray's lookup (``$RAY_ADDRESS``, then the cluster ``ray start`` recorded on this machine)."""
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        try:
            address = canonicalize_bootstrap_address("auto") or ""
        except (ConnectionError, ValueError):
            raise _refused(origin, address, "Ray's lookup found no cluster on this machine") from None
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise _refused(origin, address, "not host:port, ray://host:port or auto")
    return host.strip("[]"), int(port)


def _refused(origin: str, address: str, why: str) -> InputError:
    return InputError(f"{origin} {address}: cannot join a Ray cluster there ({why}); {_FIX}")


def _token_refused(exc: BaseException) -> bool:
    # Ray passes the GCS client's AuthenticationError on as the text of a RuntimeError (the cause
    # of its ConnectionError), so its name is looked for in the text as well as in the type.
    seen: BaseException | None = exc
    while seen is not None:
        if "AuthenticationError" in f"{type(seen).__name__} {seen}":
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Ray for a block of work (several audits share it); shut down after if it was started here
    (``num_cpus``: the logical CPUs of a private local Ray, default the machine's)."""
    started = connect(address, num_cpus)
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
