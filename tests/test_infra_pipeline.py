"""`discl pipeline` (the RayJobs' one-command entrypoint) and the RayJob wait script.

The pipeline runs on the toy world with cheap stages: prompts and mine succeed, score fails at once when no
spectrum exists (exit 2), which is enough to see order, shared arguments and stop-at-first-failure.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

from discl_ray.cli import COMMANDS
from discl_ray.cli import main as discl

REPO = Path(__file__).resolve().parent.parent
WAIT = REPO / "infra" / "kuberay" / "wait-rayjob.sh"


def test_pipeline_runs_stages_in_order_with_the_same_config(tmp_path, capsys):
    rc = discl(["pipeline", "prompts", "mine", "--config", str(REPO / "configs/toy/digits_lt.yaml"),
                f"run_root={tmp_path}", "experiment=pipe_exp"])
    out = capsys.readouterr().out
    assert rc == 0, out
    # Both stages saw the overrides: their outputs are under the overridden run_root/experiment.
    assert any((tmp_path / "pipe_exp" / "prompts").glob("*.parquet"))
    assert any((tmp_path / "pipe_exp" / "mine").glob("*.parquet"))
    lines = [ln for ln in out.splitlines() if ln.startswith("discl pipeline:")]
    assert lines[0] == "discl pipeline: [1/2] prompts" and lines[2] == "discl pipeline: [2/2] mine"
    assert out.index("prompts for 10 classes") < out.index("[2/2] mine") < out.index("hard samples:")
    assert lines[-1].startswith("discl pipeline: 2 stage(s) done")


def test_pipeline_stops_at_the_first_failure(tmp_path, capsys):
    rc = discl(["pipeline", "prompts", "score", "mine", f"run_root={tmp_path}"])
    cap = capsys.readouterr()
    assert rc == 2  # score's own exit code (no spectrum yet)
    assert "discl pipeline: stage 'score' (2/3) exited with code 2; not run: mine" in cap.err
    assert (tmp_path / "toy_lt" / "prompts").is_dir()
    assert not (tmp_path / "toy_lt" / "mine").exists()  # never started
    assert "[3/3]" not in cap.out


def test_pipeline_rejects_bad_input_before_any_stage(tmp_path, capsys):
    for argv, msg in ((["prompts", "frobnicate"], "unknown stage 'frobnicate'"),
                      (["submit", "mine"], "unknown stage 'submit'"),
                      ([f"run_root={tmp_path}"], "name at least one stage"),
                      (["prompts", "--bogus"], "unknown option '--bogus'"),
                      (["prompts", "mine", "training.strategy=nope"], "training.strategy"),
                      (["prompts", "--config", str(tmp_path / "missing.yaml")], "config file not found")):
        assert discl(["pipeline", *argv, f"run_root={tmp_path}"]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("discl pipeline: ") and msg in err, (argv, err)
    assert not (tmp_path / "toy_lt").exists()


def test_pipeline_is_a_registered_command():
    assert COMMANDS["pipeline"][0] == "jobs.pipeline"
    out = subprocess.run([sys.executable, "-m", "discl_ray.cli", "pipeline", "--help"], capture_output=True,
                         text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0 and "STAGE [STAGE ...]" in out.stdout


def _fake_kubectl(tmp_path: Path, statuses: list[str]) -> dict:
    """A kubectl on PATH that answers `get rayjob` with the next status of ``statuses`` (the last repeats)."""
    (tmp_path / "statuses").write_text("\n".join(statuses) + "\n")
    script = tmp_path / "bin" / "kubectl"
    script.parent.mkdir()
    script.write_text(f"""#!/usr/bin/env bash
n=$(cat {tmp_path}/n 2>/dev/null || echo 0)
echo $((n + 1)) > {tmp_path}/n
printf "%s\\n" "$*" >> {tmp_path}/calls
total=$(wc -l < {tmp_path}/statuses)
line=$(( n < total ? n + 1 : total ))
sed -n "${{line}}p" {tmp_path}/statuses | tr -d '\\n'
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return {**os.environ, "PATH": f"{script.parent}:{os.environ['PATH']}", "WAIT_INTERVAL": "0"}


def _wait(tmp_path, statuses, *args):
    env = _fake_kubectl(tmp_path, statuses)
    return subprocess.run(["bash", str(WAIT), "discl-iwildcam", *args], capture_output=True, text=True,
                          env=env, timeout=60)


def test_wait_script_succeeds_only_on_succeeded(tmp_path):
    out = _wait(tmp_path, ["//", "Initializing//", "Running/RUNNING/", "Complete/SUCCEEDED/"])
    assert out.returncode == 0, out.stderr
    assert "deployment=Running job=RUNNING" in out.stdout and "job=SUCCEEDED" in out.stdout
    assert "-n discl get rayjob discl-iwildcam" in (tmp_path / "calls").read_text()


def test_wait_script_fails_on_failed_job_and_times_out(tmp_path):
    (tmp_path / "a").mkdir()
    out = _wait(tmp_path / "a", ["Running/RUNNING/", "Failed/FAILED/AppFailed"])
    assert out.returncode == 1 and "did not succeed (job status FAILED)" in out.stderr
    assert "reason=AppFailed" in out.stdout
    (tmp_path / "b").mkdir()
    out = _wait(tmp_path / "b", ["Suspended/STOPPED/", "Running/RUNNING/"], "discl", "0")
    assert out.returncode == 124 and "kubectl -n discl patch rayjob discl-iwildcam" in out.stderr
    out = subprocess.run(["bash", str(WAIT)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "usage:" in out.stderr


def _rule_kubectl(tmp_path: Path, rules: list[tuple[str, int, str]]) -> dict:
    """A kubectl on PATH answering by rules ``(glob over its arguments, exit code, output)``: each call takes
    the first unused rule that matches, or repeats the last matching one. Output goes to stdout on success
    and to stderr on failure, like kubectl's."""
    import json

    (tmp_path / "rules.json").write_text(json.dumps(rules))
    script = tmp_path / "bin" / "kubectl"
    script.parent.mkdir()
    script.write_text(f"""#!{sys.executable}
import fnmatch, json, pathlib, sys
d = pathlib.Path({str(tmp_path)!r})
args = " ".join(sys.argv[1:])
with open(d / "calls", "a") as f:
    f.write(args + "\\n")
rules = json.loads((d / "rules.json").read_text())
used = set(json.loads((d / "used.json").read_text())) if (d / "used.json").exists() else set()
match = [i for i, r in enumerate(rules) if fnmatch.fnmatch(args, r[0])]
if not match:
    sys.exit("fake kubectl: no rule for " + args)
fresh = [i for i in match if i not in used]
i = fresh[0] if fresh else match[-1]
used.add(i)
(d / "used.json").write_text(json.dumps(sorted(used)))
_, rc, out = rules[i]
(sys.stdout if rc == 0 else sys.stderr).write(out)
sys.exit(rc)
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return {**os.environ, "PATH": f"{script.parent}:{os.environ['PATH']}", "WAIT_INTERVAL": "0"}


def _script(tmp_path, name, rules, *args, **extra_env):
    env = {**_rule_kubectl(tmp_path, rules), **extra_env}
    return subprocess.run(["bash", str(REPO / "infra" / "kuberay" / name), *args], capture_output=True,
                          text=True, env=env, timeout=60)


REFUSED = "The connection to the server 10.0.0.1:443 was refused - did you specify the right host or port?\n"


def test_wait_script_retries_a_transient_kubectl_error(tmp_path):
    """Review 3: one failed kubectl call (API server restart, token refresh) exited 1, the code of a failed
    job. It is retried; only a run of failures gives up, with its own code 3."""
    get = "-n discl get rayjob discl-iwildcam *"
    out = _script(tmp_path, "wait-rayjob.sh", [(get, 0, "Running/RUNNING/"), (get, 1, REFUSED),
                                                (get, 1, REFUSED), (get, 0, "Complete/SUCCEEDED/")],
                  "discl-iwildcam")
    assert out.returncode == 0, out.stderr
    assert "kubectl failed (2/10 in a row, retrying)" in out.stderr and "refused" in out.stderr
    (tmp_path / "b").mkdir()
    out = _script(tmp_path / "b", "wait-rayjob.sh", [(get, 1, REFUSED)], "discl-iwildcam",
                  WAIT_KUBECTL_RETRIES="3")
    assert out.returncode == 3 and "state is unknown" in out.stderr
    assert (tmp_path / "b" / "calls").read_text().count("get rayjob") == 3


def test_wait_job_returns_at_once_on_a_failed_job(tmp_path):
    """Review 3: `kubectl wait --for=condition=complete --timeout=4h` waited 4 h on a failed dataset Job."""
    get = "-n discl get job discl-dataset-iwildcam *"
    logs = "-n discl logs job/discl-dataset-iwildcam --tail=20"
    out = _script(tmp_path, "wait-job.sh", [(get, 0, ""), (get, 1, REFUSED), (get, 0, "FailureTarget Failed "),
                                            (logs, 0, "urllib.error.URLError: no route to host\n")],
                  "discl-dataset-iwildcam")
    assert out.returncode == 1 and "no route to host" in out.stderr, out.stderr
    (tmp_path / "b").mkdir()
    out = _script(tmp_path / "b", "wait-job.sh", [(get, 0, ""), (get, 0, "SuccessCriteriaMet Complete ")],
                  "discl-dataset-iwildcam")
    assert out.returncode == 0 and "Complete" in out.stdout
    assert (tmp_path / "b" / "calls").read_text().count("get job") == 2
    (tmp_path / "c").mkdir()
    out = _script(tmp_path / "c", "wait-job.sh", [(get, 0, "")], "discl-dataset-iwildcam", "discl", "0")
    assert out.returncode == 124
    readme = (REPO / "infra" / "README.md").read_text()
    assert "kubectl -n discl wait --for=condition=complete" not in readme
    assert "infra/kuberay/wait-job.sh discl-dataset-iwildcam" in readme


def test_logs_script_waits_for_the_submitter_job(tmp_path):
    """Review 3: `kubectl logs -f job/NAME` right after apply printed NotFound (KubeRay creates the submitter
    Job once the cluster is ready). The script waits for the Job and its pod, then follows."""
    notfound = 'Error from server (NotFound): jobs.batch "discl-iwildcam" not found\n'
    rules = [("-n discl logs job/discl-iwildcam --tail=1", 1, notfound),
             ("-n discl get job discl-iwildcam -o name", 1, notfound),
             ("-n discl get rayjob discl-iwildcam *", 0, "Initializing"),
             ("-n discl logs job/discl-iwildcam --tail=1", 1, notfound),
             ("-n discl get job discl-iwildcam -o name", 0, "job.batch/discl-iwildcam"),
             ("-n discl logs job/discl-iwildcam --tail=1", 1, "container is waiting to start\n"),
             ("-n discl logs job/discl-iwildcam --tail=1", 0, "x"),
             ("-n discl logs -f job/discl-iwildcam", 0, "discl pipeline: [1/6] mine\n")]
    out = _script(tmp_path, "logs-rayjob.sh", rules, "discl-iwildcam")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "discl pipeline: [1/6] mine\n"
    assert "deployment Initializing" in out.stderr and "waiting for its pod" in out.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[-1] == "-n discl logs -f job/discl-iwildcam" and calls.count(calls[-1]) == 1
    (tmp_path / "b").mkdir()
    out = _script(tmp_path / "b", "logs-rayjob.sh",
                  [("*--tail=1", 1, notfound), ("*get job*", 1, notfound), ("*get rayjob*", 0, "ValidationFailed")],
                  "discl-iwildcam")
    assert out.returncode == 1 and "ValidationFailed" in out.stderr


def _readme_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (REPO / "infra" / "README.md").read_text(), re.S)


def test_readme_commands_name_real_files_and_stages():
    text = "\n".join(_readme_blocks())
    for path in set(re.findall(r"\binfra/[\w./-]+\.(?:yaml|sh)\b", text)):
        if "*" not in path:
            assert (REPO / path).is_file(), path
    stages = re.findall(r"(?m)^\s*(?:\w+=\S+\s+)*discl (?:submit )?(\w+)", text)  # commands, not `-n discl`
    stages += [s for loop in re.findall(r"for stage in ([\w ]+);", text) for s in loop.split()]
    assert "report" in stages and "sweep" in stages
    for stage in stages:
        assert stage in COMMANDS, stage


def test_readme_step_2_fills_every_placeholder(tmp_path):
    """The README's sed lines, run on a copy of infra/, leave no image / storage-class / bucket placeholder."""
    import shutil

    import yaml

    (block,) = [b for b in _readme_blocks() if "sed -i" in b and "storageClassName" in b]
    shutil.copytree(REPO / "infra", tmp_path / "infra", ignore=shutil.ignore_patterns("schemas"))
    ref = "registry.example.com/team/discl-ray@sha256:" + "ab" * 32
    env = {**os.environ, "IMAGE_REF": ref, "RWX_CLASS": "efs-sc", "ARTIFACTS": "s3://bucket/mlflow"}
    out = subprocess.run(["bash", "-euc", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    images, classes, destinations = set(), set(), set()
    for path in (tmp_path / "infra").rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            text = yaml.safe_dump(doc)
            images |= set(re.findall(r"image: (\S+)", text))
            classes |= set(re.findall(r"storageClassName: (\S+)", text))
            destinations |= set(re.findall(r"MLFLOW_DEFAULT_ARTIFACT_ROOT: (\S+)", text))
    # Review 3: a mutable tag with IfNotPresent let head and workers run different pushes of it; every pod
    # now names the one image by digest (the launcher too).
    assert images == {ref} and classes == {"efs-sc"} and destinations == {"s3://bucket/mlflow"}
    launcher = yaml.safe_load((tmp_path / "infra/cluster-launcher/aws-gpu.yaml").read_text())
    assert launcher["docker"]["image"] == ref


def test_readme_resolves_the_pushed_image_to_its_digest(tmp_path):
    """Step 1 turns the pushed tag into $REGISTRY/discl-ray@sha256:..., read from the registry (a fake docker
    here that answers `buildx imagetools inspect` like the real one)."""
    (block,) = [b for b in _readme_blocks() if "docker push" in b]
    (line,) = [ln for ln in block.splitlines() if ln.startswith("export IMAGE_REF=")]
    fake = tmp_path / "bin" / "docker"
    fake.parent.mkdir()
    fake.write_text('#!/usr/bin/env bash\n[[ "$1 $2 $3" == "buildx imagetools inspect" && "$*" == *"{{.Manifest.Digest}}"* ]]'
                    ' && echo sha256:' + "cd" * 32 + '\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "REGISTRY": "registry.example.com/t",
           "IMAGE": "registry.example.com/t/discl-ray:0.1.0-ray2.60.0-cu128"}
    out = subprocess.run(["bash", "-euc", f"{line}\necho $IMAGE_REF"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "registry.example.com/t/discl-ray@sha256:" + "cd" * 32
