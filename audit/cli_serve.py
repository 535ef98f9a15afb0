"""``memaudit serve REF [CONFIG]``: the check service (docs/serving.md) on a private local Ray
(or ``--address``), until interrupted."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable

from audit.config import load_config
from audit.errors import InputError


def add_parser(commands: argparse._SubParsersAction, with_config: Callable[[argparse.ArgumentParser], None]) -> None:
    serve = commands.add_parser("serve", help="serve POST /v1/check: is this image a copy of a training image?")
    serve.add_argument("reference", help="reference folder (or builtin:testbed, or an object-store URI)")
    with_config(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                          "only; 0.0.0.0 for every interface)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--token-env", metavar="NAME", help="require 'Authorization: Bearer <token>', the token "
                                                           "read from the environment variable NAME")
    serve.add_argument("--shard-groups", type=int, default=1, help="index deployments, each over a share of "
                                                                   "the index shards")
    serve.add_argument("--embedder-replicas", type=int, default=1)
    serve.add_argument("--ingress-replicas", type=int, default=1, help="HTTP ingress replicas; pixel verification "
                                                                       "runs there, so more use more cores")
    serve.add_argument("--embedder-gpus", type=float, default=0.0, help="GPU share per embedder replica "
                                                                        "(0: CPU)")
    serve.add_argument("--screen", action="store_true", help="also serve POST /v1/screen: load the config's model "
                                                             "and screen prompts as the audit's screen does")
    serve.add_argument("--screen-baseline", type=int, default=256, metavar="N",
                       help="with --screen: the config's first N prompts set the screen score's scale (default 256)")
    serve.add_argument("--screener-gpus", type=float, default=0.0, help="with --screen: GPU share of the screener "
                                                                        "(0: CPU)")
    serve.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body (default 20)")
    serve.add_argument("--address", help="Ray cluster to join (default: a private local Ray)")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    token = None
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            raise InputError(f"--token-env {args.token_env}: that environment variable is empty or unset; "
                             "export the token in it, or leave --token-env out")
    for name in ("shard_groups", "embedder_replicas", "ingress_replicas"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} {getattr(args, name)}: it must be at least 1")
    if not 0 < args.max_body_mb <= 1024:
        raise InputError(f"--max-body-mb {args.max_body_mb}: it must be in (0, 1024]")
    from audit.pipeline.ray_setup import ray_session
    from audit.pipeline.serve_app import logical_cpus, service_settings, start

    needed = logical_cpus(args.shard_groups, args.embedder_replicas, 1.0, args.ingress_replicas, args.screen)
    with ray_session(args.address or cfg.compute.address, num_cpus=max(os.cpu_count() or 1, needed)):
        # after Ray's own handler (ray.init installs one that exits), before the slow start: a
        # SIGTERM while the application deploys stops it as cleanly as one while it serves
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        settings = service_settings(args.reference, cfg, token, args.max_body_mb,
                                    args.screen_baseline if args.screen else None)
        start(settings, args.host, args.port, shard_group_count=args.shard_groups,
              embedder_replicas=args.embedder_replicas, embedder_gpus=args.embedder_gpus,
              screener_gpus=args.screener_gpus, ingress_replicas=args.ingress_replicas)
        screening = f", prompts screened with {cfg.model.path} on /v1/screen" if args.screen else ""
        print(f"serving {settings['reference']} ({settings['counts']['vectors']} vectors, {settings['model_id']}) "
              f"on http://{args.host}:{args.port}/v1/check{screening}; Ctrl-C stops", flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
        print("memaudit serve: stopping", file=sys.stderr)
    return 0
