"""Serving on more than one process or machine with Ray Serve: every replica runs the same FastAPI app as
`python api.py` (both endpoints, the OpenAI API, streaming, the API key, its own batching engine), and Ray's
HTTP proxy spreads the requests over the replicas and replaces a replica that dies.

    python api.py --ray-replicas 2                          # a local Ray instance, 2 replicas
    python api.py --ray-replicas 2 --ray-max-replicas 8     # autoscaling between 2 and 8
    python api.py --ray-address auto --ray-replicas 4 --ray-num-gpus 1 --host 0.0.0.0    # a running cluster

Each answer carries an `X-Replica` header naming the replica that produced it. On a cluster every node needs
this repository at the same path (replicas import it from there) and the checkpoint at --model-path.
"""
import importlib
import os
import signal
import threading
from typing import Optional

from . import ROOT

REPLICA_HEADER = "x-replica"


def replica_class():
    """The deployment's class (made here, so that importing this module does not need Ray)."""
    from ray import serve

    @serve.ingress()
    class ChatGLMReplica:
        """One replica: builds the app (loading the model) in its own process."""

        def __init__(self, factory: str, args):
            module, _, function = factory.partition(":")
            # not `app`: the ingress wrapper has a property of that name
            self.asgi_app = getattr(importlib.import_module(module), function)(args)
            self.name = serve.get_replica_context().replica_id.unique_id

        def __serve_build_asgi_app__(self):
            name = self.name.encode()
            inner = self.asgi_app

            async def named(scope, receive, send):  # X-Replica on every answer
                async def send_named(message):
                    if message["type"] == "http.response.start":
                        message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(), name)]}
                    await send(message)

                await inner(scope, receive, send_named if scope["type"] == "http" else send)

            return named

    return ChatGLMReplica


def serve_with_ray(factory: str, args, replicas: int, host: str, port: int, max_ongoing_requests: int,
                   max_replicas: Optional[int] = None, num_cpus: float = 1, num_gpus: float = 0,
                   address: Optional[str] = None) -> None:
    """Deploys `replicas` copies of the app that `factory` ("module:function", imported in each replica) makes of
    `args` (it loads the model) behind Ray's HTTP proxy on host:port, then blocks until SIGTERM or Ctrl-C and shuts
    Serve (and a Ray instance started here) down. max_ongoing_requests should cover a replica's batch and queue,
    so that the replica's own engine does the batching and answers 429 beyond its queue."""
    import ray
    from ray import serve

    # Replicas import this repository (api.py, runtime/, chatglm_6b/) from its path.
    ray.init(address=address, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}})
    stop = threading.Event()  # set on SIGTERM or Ctrl-C, also while deploying (replacing Ray's own handlers)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        scaling = {"num_replicas": replicas} if not max_replicas else {"autoscaling_config": {
            "min_replicas": replicas, "max_replicas": max_replicas,
            "target_ongoing_requests": max(1, max_ongoing_requests // 2)}}
        deployment = serve.deployment(replica_class(), name="ChatGLM", max_ongoing_requests=max_ongoing_requests,
                                      ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus}, **scaling)
        serve.run(deployment.bind(factory, args), name="chatglm", route_prefix="/", blocking=False)
        print(f"Ray Serve: {replicas}{f'-{max_replicas}' if max_replicas else ''} replicas of ChatGLM-6B on "
              f"http://{host}:{port}", flush=True)
        stop.wait()
        print("shutting down Ray Serve", flush=True)
        serve.shutdown()
    finally:
        ray.shutdown()
