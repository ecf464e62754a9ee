"""Every local Ray cluster the project starts is pinned to 127.0.0.1 (issue 29).

Stages and benchmarks start their cluster through ``discl_ray.runtime.cluster.init_local_ray``; the scan fails on any
other ``ray.init`` in the package or the jobs, and the runtime check fails if that one place stops pinning."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("discl_ray", "jobs")


def _ray_init_uses(path: Path) -> list[tuple[int, str, ast.AST]]:
    """(line, enclosing function, the call or None) of every reference to ``ray.init`` in one module: ``ray.init``,
    ``<alias>.init`` for ``import ray as <alias>``, and ``from ray import init``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    ray_names = {"ray"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            ray_names |= {a.asname or a.name for a in node.names if a.name == "ray"}
    parents: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node

    def enclosing(node: ast.AST) -> str:
        while node in parents:
            node = parents[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return node.name
        return "<module>"

    uses = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr == "init" and isinstance(node.value, ast.Name)
                and node.value.id in ray_names):
            call = parents.get(node)
            uses.append((node.lineno, enclosing(node), call if isinstance(call, ast.Call) else None))
        elif isinstance(node, ast.ImportFrom) and node.module == "ray" and any(a.name == "init" for a in node.names):
            uses.append((node.lineno, enclosing(node), None))
    return uses


def test_scanner_sees_every_form_of_ray_init(tmp_path):
    # The scan itself must not go blind: each spelling below starts a cluster and must be reported.
    src = tmp_path / "m.py"
    src.write_text(textwrap.dedent("""
        import ray
        import ray as r
        from ray import init
        def a():
            ray.init(num_cpus=1)
        def b():
            r.init()
        start = ray.init
    """))
    found = sorted((line, fn) for line, fn, _ in _ray_init_uses(src))
    assert found == [(4, "<module>"), (6, "a"), (8, "b"), (9, "<module>")]


def test_only_runtime_starts_ray():
    offenders = []
    allowed = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for line, fn, call in _ray_init_uses(path):
                if rel == "discl_ray/runtime/cluster.py" and fn == "init_local_ray":
                    allowed.append((rel, line))
                    continue
                # init_ray joining a running cluster by its address: not a cluster this process starts.
                if rel == "discl_ray/runtime/cluster.py" and fn == "_init_ray":
                    kw = {k.arg: k.value for k in call.keywords} if call else {}
                    if isinstance(kw.get("address"), ast.Name) and kw["address"].id == "address":
                        allowed.append((rel, line))
                        continue
                offenders.append(f"{rel}:{line} (in {fn})")
    assert not offenders, ("ray.init outside discl_ray.runtime.cluster.init_local_ray (a cluster not pinned to "
                           f"127.0.0.1): {offenders}")
    # The one place exists and is the one the scan found (a rename must not turn this test into a no-op).
    assert ("discl_ray/runtime/cluster.py" in {r for r, _ in allowed}) and len(allowed) == 2, allowed


def test_benchmarks_and_stages_call_init_local_ray():
    # Each benchmark that starts its own cluster names the one place (the scan above forbids the other way).
    for rel in ("discl_ray/bench/train_memory.py", "discl_ray/bench/train.py", "discl_ray/bench/score.py",
                "discl_ray/bench/scaling.py", "discl_ray/bench/generate.py"):
        assert "init_local_ray(" in (ROOT / rel).read_text(), rel


def test_init_local_ray_node_ip_is_loopback(tmp_path):
    # A fresh process with the loopback switch removed from its environment: the cluster still advertises
    # 127.0.0.1 (raylet, GCS and this driver), and an address other than "local" is refused before any start.
    script = textwrap.dedent("""
        import ray
        from discl_ray.runtime.cluster import init_local_ray
        try:
            init_local_ray(address="auto")
        except ValueError as e:
            print("REFUSED", "init_ray" in str(e))
        init_local_ray(num_cpus=1, include_dashboard=False, log_to_driver=False)
        ctx = ray.get_runtime_context()
        print("NODES", sorted({n["NodeManagerAddress"] for n in ray.nodes()}))
        print("GCS", ctx.gcs_address.rsplit(":", 1)[0])
        print("DRIVER", ray.util.get_node_ip_address())
        ray.shutdown()
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    assert lines.get("REFUSED") == "True", out.stdout
    assert lines.get("NODES") == "['127.0.0.1']", out.stdout
    assert lines.get("GCS") == "127.0.0.1", out.stdout
    assert lines.get("DRIVER") == "127.0.0.1", out.stdout
