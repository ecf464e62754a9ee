"""Runtime: one local Ray cluster per driver even when stages start at the same time from threads."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_concurrent_init_ray_starts_one_cluster(tmp_path):
    # In a fresh process (the suite's own Ray must not be up): three threads call init_ray at once, as the
    # quickstart's concurrent trainings and `bench replicate` do. Without the lock each could start a cluster.
    script = textwrap.dedent(f"""
        import threading, ray
        from discl_ray.config import load_config
        from discl_ray.runtime import init_ray
        cfg = load_config(data={{"experiment": "t", "run_root": {str(tmp_path / "r")!r},
                                 "ray": {{"num_cpus": 1, "include_dashboard": False}}}})
        barrier = threading.Barrier(3)
        def go():
            barrier.wait()
            init_ray(cfg)
        threads = [threading.Thread(target=go) for _ in range(3)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        print("UP", ray.is_initialized())
        ray.shutdown()
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "UP True" in out.stdout, out.stdout
    assert (out.stdout + out.stderr).count("Started a local Ray instance") == 1, out.stderr[-3000:]
