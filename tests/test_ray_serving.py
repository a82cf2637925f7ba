"""`python api.py --ray-replicas 2` on a local Ray instance: both replicas serve, a replica killed mid-run is
replaced without losing a request the client retries, and SIGTERM shuts everything down."""
import concurrent.futures
import os
import signal
import time

import psutil
import pytest
import requests

from test_api import API, DEMO_REPLY, HAS_DEMO, post
from tools.local_server import LocalServer

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'ray[serve]')")
pytestmark = pytest.mark.skipif(not HAS_DEMO, reason="demo_model/ has not been trained yet")

HELLO = {"prompt": "你好", "history": [], "temperature": 0}


class RayServer(LocalServer):
    def __init__(self, log_path, cwd):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
        super().__init__(API, ["--ray-replicas", "2", "--ray-num-cpus", "1"], log_path=log_path, cwd=cwd, env=env)

    def ready(self, timeout=300):
        """Until /health is 200 (Ray's proxy answers 503 while the replicas load)."""
        deadline = time.time() + timeout
        while True:
            assert self.process.poll() is None, self.log()
            try:
                if requests.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except (requests.ConnectionError, requests.Timeout):  # the proxy holds requests until a replica is up
                pass
            assert time.time() < deadline, self.log()
            time.sleep(1)

    def both_replicas_up(self, timeout=180):
        """Until answers come from two different replicas (the second can start later than the first)."""
        deadline, seen = time.time() + timeout, set()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            while len(seen) < 2:
                assert time.time() < deadline, (seen, self.log())
                seen |= set(pool.map(lambda _: requests.get(self.url + "/health", timeout=30).headers.get(
                    "x-replica"), range(8)))
                seen.discard(None)

    def replica_processes(self):
        def is_replica(process):
            try:
                return "ServeReplica:chatglm:ChatGLM" in " ".join(process.cmdline())
            except psutil.Error:  # gone, or a zombie (the killed replica until Ray reaps it)
                return False

        return [p for p in psutil.Process(self.process.pid).children(recursive=True) if is_replica(p)]


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray")
    server = RayServer(str(tmp / "server.log"), str(tmp))
    try:
        server.ready()
        server.both_replicas_up()
        yield server
    finally:
        server.stop(timeout=90)


def ask_with_retries(server, attempts=8):
    """What a client of a replicated service does: retry a failed request (connection lost, 5xx)."""
    for attempt in range(attempts):
        try:
            reply = post(server, "/", HELLO)
            if reply.status_code < 500:
                return reply
        except requests.ConnectionError:
            pass
        time.sleep(1)
    raise AssertionError(f"no answer after {attempts} attempts:\n{server.log()}")


def test_two_replicas_answer_16_concurrent_requests(ray_server):
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda _: post(ray_server, "/", HELLO), range(16)))
    assert [reply.status_code for reply in replies] == [200] * 16
    assert {reply.json()["response"] for reply in replies} == {DEMO_REPLY}
    assert len({reply.headers["x-replica"] for reply in replies}) == 2  # both replicas served
    stream = post(ray_server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "你好"}],
                                                      "temperature": 0, "stream": True}, stream=True)
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert [line for line in stream.iter_lines() if line][-1] == b"data: [DONE]"


def test_a_killed_replica_is_replaced_and_retried_requests_are_not_lost(ray_server):
    before = {p.pid for p in ray_server.replica_processes()}
    assert len(before) == 2
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        pending = [pool.submit(ask_with_retries, ray_server) for _ in range(16)]
        time.sleep(0.5)
        os.kill(sorted(before)[0], signal.SIGKILL)
        replies = [future.result() for future in pending]
    assert [reply.status_code for reply in replies] == [200] * 16
    assert {reply.json()["response"] for reply in replies} == {DEMO_REPLY}
    deadline = time.time() + 180
    while len({p.pid for p in ray_server.replica_processes()} - before) < 1 or \
            len(ray_server.replica_processes()) < 2:
        assert time.time() < deadline, ray_server.log()
        time.sleep(1)
    ray_server.ready()
    ray_server.both_replicas_up()  # the replacement serves


def test_sigterm_shuts_ray_down(tmp_path):
    server = RayServer(str(tmp_path / "server.log"), str(tmp_path))
    try:
        server.ready()
        children = psutil.Process(server.process.pid).children(recursive=True)
        assert children
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=90) == 0, server.log()
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, [" ".join(p.cmdline())[:80] for p in alive]
    finally:
        server.stop()
