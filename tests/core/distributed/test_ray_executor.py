"""The Ray executor: a split model on Ray actors gives the unsplit model's output.

The two-node test starts a head and a second raylet on this host (``ray
start``, each with one core and its own custom resource), connects with
RAY_ADDRESS and checks that the placement group put rank 0 and rank 1 on
different nodes. Then one TP=2 engine on a local Ray cluster (which the
executor starts and stops) serves the parity test and the death test (an actor
killed mid-generation ends the engine with `WorkerDiedError`). Skipped when
Ray is not installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from backplane import LLM, SamplingParams  # noqa: E402
from backplane.core.distributed.parallel_state import get_world_group  # noqa: E402
from backplane.core.executor import WorkerDiedError  # noqa: E402
from tests.core.distributed.test_model_parallel import (  # noqa: E402
    ARGS,
    PARAMS,
    PROMPTS,
    assert_same_outputs,
)
from tests.fixtures.tiny_models import make_tiny_model  # noqa: E402

RAY_BIN = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("ray_models") / "llama_gqa", "llama")


@pytest.fixture(scope="module")
def reference(model_dir):
    llm = LLM(model_dir, **ARGS)
    try:
        return llm.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS)
    finally:
        llm.llm_engine.shutdown()


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie is dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pids, timeout_s: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (left := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


# ---------------------------------------------------------------- two nodes on this host
def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _ray_processes(marker: str) -> set[int]:
    """Processes whose command line names ``marker`` (the cluster's temp dir), their
    descendants and the members of their process groups (``ray start``'s agents)."""
    procs = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            procs[int(entry)] = (int(fields[1]), int(fields[2]), cmd)
    me = os.getpid()
    found = {p for p, (_, _, cmd) in procs.items() if marker in cmd and p != me}
    groups = {procs[p][1] for p in found} - {os.getpgrp()}
    found |= {p for p, (_, pgid, _) in procs.items() if pgid in groups and p != me}
    grown = True
    while grown:
        children = {p for p, (ppid, _, _) in procs.items() if ppid in found} - found - {me}
        found |= children
        grown = bool(children)
    return found


@pytest.fixture
def two_node_cluster():
    """A head (``node_a``) and a second raylet (``node_b``) on this host, one core each."""
    temp = tempfile.mkdtemp(prefix="bpray", dir="/tmp")  # short: unix socket paths
    gcs, agent_a, agent_b, grpc_a, grpc_b, env_a, env_b, m_a, m_b = _free_ports(9)
    # Without token authentication: a token file another Ray run left in ~/.ray would
    # otherwise be read by some of the processes only.
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    common = ["--temp-dir", temp, "--disable-usage-stats", "--object-store-memory",
              str(100 * 1024 * 1024)]
    try:
        head = subprocess.run(
            [RAY_BIN, "start", "--head", "--port", str(gcs), "--num-cpus", "1",
             "--resources", json.dumps({"node_a": 1}), "--include-dashboard", "false",
             "--dashboard-agent-listen-port", str(agent_a),
             "--dashboard-agent-grpc-port", str(grpc_a), "--runtime-env-agent-port", str(env_a),
             "--metrics-export-port", str(m_a), *common],
            env=env, timeout=60, capture_output=True, text=True)
        assert head.returncode == 0, f"ray start --head failed:\n{head.stdout}\n{head.stderr}"
        node_b = subprocess.run(
            [RAY_BIN, "start", "--address", f"127.0.0.1:{gcs}", "--num-cpus", "1",
             "--resources", json.dumps({"node_b": 1}),
             "--dashboard-agent-listen-port", str(agent_b),
             "--dashboard-agent-grpc-port", str(grpc_b), "--runtime-env-agent-port", str(env_b),
             "--metrics-export-port", str(m_b), *common],
            env=env, timeout=60, capture_output=True, text=True)
        assert node_b.returncode == 0, f"ray start failed:\n{node_b.stdout}\n{node_b.stderr}"
        yield f"127.0.0.1:{gcs}"
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        # Not `ray stop`: it ends every Ray process of this user on the host. Stop what
        # these two `ray start`s began, gently first.
        pids = _ray_processes(temp)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        _wait_gone(pids, 1.0)
        for pid in _ray_processes(temp) | {p for p in pids if _alive(p)}:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        survivors = _wait_gone(pids | _ray_processes(temp), 5.0)
        subprocess.run(["rm", "-rf", temp], check=False)
        assert not survivors, f"Ray processes survived the teardown: {survivors}"


def test_two_nodes_one_rank_each(reference, two_node_cluster, model_dir, monkeypatch):
    assert not ray.is_initialized()
    monkeypatch.setenv("RAY_ADDRESS", two_node_cluster)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("BACKPLANE_RAY_PLACEMENT_STRATEGY", "STRICT_SPREAD")
    llm = LLM(model_dir, tensor_parallel_size=2, distributed_executor_backend="ray", **ARGS)
    try:
        executor = llm.llm_engine.engine_core.executor
        nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
        driver_node = ray.get_runtime_context().get_node_id()
        actor_node = executor.actor_info[0]["node_id"]
        assert executor.rank_nodes == [driver_node, actor_node]
        assert driver_node != actor_node
        assert [{"node_a", "node_b"} & set(nodes[n]) for n in (driver_node, actor_node)] == [
            {"node_a"}, {"node_b"}]
        bundle_nodes = ray.util.placement_group_table(
            executor.placement_group)["bundles_to_node_id"]
        assert set(bundle_nodes.values()) == {driver_node, actor_node}
        got = llm.generate([{"prompt_token_ids": p} for p in PROMPTS[:2]], PARAMS)
        assert_same_outputs(reference[:2], got)
        pid = executor.actor_info[0]["pid"]
    finally:
        llm.llm_engine.shutdown()
    # The cluster was already running: the executor leaves it up, without its actor.
    assert ray.is_initialized()
    assert not _wait_gone([pid])
    assert ray.util.placement_group_table(executor.placement_group)["state"] == "REMOVED"


# ---------------------------------------------------------------- a local cluster
# After the two-node test: this module-scoped engine (and its Ray connection) lives until
# the module's end.
@pytest.fixture(scope="module")
def ray_llm(model_dir, reference):
    """TP=2 on a local Ray cluster the executor starts (RAY_ADDRESS=local: never another
    cluster of this host). After ``reference``: an unsplit engine cannot be built in a
    process that is rank 0 of a split one."""
    assert not ray.is_initialized()
    affinity = os.sched_getaffinity(0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_ADDRESS", "local")
        mp.setenv("RAY_AUTH_MODE", "disabled")  # no token file written to ~/.ray
        llm = LLM(model_dir, tensor_parallel_size=2, distributed_executor_backend="ray", **ARGS)
    executor = llm.llm_engine.engine_core.executor
    pids = [info["pid"] for info in executor.actor_info]
    yield llm
    llm.llm_engine.shutdown()
    # The executor started Ray, so it stopped it; no actor process is left.
    assert not ray.is_initialized()
    assert not _wait_gone(pids), "a worker actor outlived the executor"
    assert get_world_group().size == 1
    assert os.sched_getaffinity(0) == affinity  # rank 0's pinning is undone


def test_tp2_on_ray_matches_unsplit(ray_llm, reference):
    executor = ray_llm.llm_engine.engine_core.executor
    assert type(executor).__name__ == "RayExecutor"
    assert len(executor.actors) == 1 and executor.cpus_per_rank >= 1
    assert get_world_group().size == 2
    got = ray_llm.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS)
    assert_same_outputs(reference, got)
    stats = ray_llm.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks, "KV blocks leaked"


def test_killed_actor_ends_the_engine(ray_llm):
    """Runs after the parity test on the same engine: it leaves the engine dead.

    The actor is killed between two steps of a generation. (Killed inside a step, the
    driver would wait for it in the cpu platform's shared-memory all-reduce, which has
    no way out when a peer dies; gloo's collectives fail at once instead.)
    """
    engine = ray_llm.llm_engine
    executor = engine.engine_core.executor
    params = SamplingParams(max_tokens=60, temperature=0.0)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"long-{i}", {"prompt_token_ids": prompt}, params)
    engine.step()
    engine.step()
    assert engine.has_unfinished_requests()
    ray.kill(executor.actors[0], no_restart=True)
    start = time.monotonic()
    while time.monotonic() - start < 10:
        try:
            executor.check_health()
        except WorkerDiedError:
            break
        time.sleep(0.05)
    noticed = time.monotonic() - start
    assert noticed < 5, f"the death was noticed after {noticed:.1f} s"
    with pytest.raises(WorkerDiedError, match=r"worker rank 1 \(Ray actor pid \d+, .*\) "
                       r"died: (ActorDiedError|RayActorError): .*killed by `ray.kill`"):
        engine.step()
