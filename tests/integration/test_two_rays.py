"""cadist's local Ray beside another Ray on the same machine (a second user, a test runner, a
`ray start` left over): Ray Train's actors ask the State API about each other, and without an
address Ray looks for GCS processes on the machine — with two there, it fails (or asks the other
one). cadist's local Ray hands its actors their own dashboard's address."""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

PROBE = textwrap.dedent(
    """
    import ray
    from ray.util.state import get_actor

    from cadist.cluster.ray import connect_ray

    @ray.remote(num_cpus=0)
    class Probe:  # as Ray Train's placement-group cleaner asks about its controller
        def state(self, actor_id):
            return get_actor(actor_id, timeout=30).state

    @ray.remote(num_cpus=0)
    class Parent:  # as Ray Train's controller creates its cleaner: an actor's actor
        def ask(self):
            me = ray.get_runtime_context().get_actor_id()
            return ray.get(Probe.remote().state.remote(me))

    connect_ray(None, False, "probe")
    print("STATE", ray.get(Parent.remote().ask.remote()))
    """
)


def test_local_ray_actors_find_their_own_cluster_beside_another_ray(tmp_path):
    # (as a user's shell: no Ray address from an earlier test in this process)
    env = {
        k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
    }
    other = subprocess.Popen(  # another Ray on this machine, alive until its stdin closes
        [sys.executable, "-c", "import ray, sys; ray.init(num_cpus=0, include_dashboard=False); "
         "print('UP', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(tmp_path / "other.log", "w"),
        text=True,
        cwd=tmp_path, env=env,
    )  # fmt: skip
    try:
        said = other.stdout.readline().strip()
        assert said == "UP", (tmp_path / "other.log").read_text()[-3000:]
        probe = subprocess.run(
            [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=180,
            cwd=tmp_path, env=env,
        )  # fmt: skip
    finally:
        other.stdin.close()
        other.wait(timeout=60)
    assert "STATE ALIVE" in probe.stdout, probe.stdout[-2000:] + probe.stderr[-4000:]
