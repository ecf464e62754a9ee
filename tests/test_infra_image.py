"""The image's user setup, run for real with this machine's shadow-utils in a private mount namespace.

Ubuntu 24.04 images (the CUDA ones too) ship user and group `ubuntu` with uid/gid 1000, so the first image's
`groupadd --gid 1000 ray` stopped the build. Without a Docker daemon the image cannot be built here, so this
runs the Dockerfile's own user commands (read from infra/Dockerfile) against a copy of /etc, /home,
/var/mail and /var/log bind-mounted over the real ones inside `unshare -m`: the machine's accounts are
never touched. Needs root and unshare; skipped (with the reason) elsewhere.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("useradd"),
                                reason="needs root, unshare and shadow-utils")

UBUNTU_2404 = "useradd --uid 1000 --user-group --create-home --shell /bin/bash ubuntu"
FREE_1000 = ('if getent passwd 1000 >/dev/null; then userdel "$(getent passwd 1000 | cut -d: -f1)"; fi; '
             'if getent group 1000 >/dev/null; then groupdel "$(getent group 1000 | cut -d: -f1)"; fi')
OLD_LINE = "groupadd --gid 1000 ray && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash ray"


def dockerfile_user_commands() -> str:
    """The Dockerfile's commands that free uid/gid 1000 and create `ray`, as one shell line."""
    text = re.sub(r"\\\n", " ", (REPO / "infra" / "Dockerfile").read_text())
    (block,) = [ln for ln in text.splitlines() if ln.startswith("RUN ") and "groupadd" in ln]
    keep = [c.strip() for c in block[4:].split(" && ")
            if re.search(r"getent (passwd|group) 1000|groupadd|useradd", c)]
    assert len(keep) == 4, keep
    return " && ".join(keep)


def _in_namespace(tmp_path: Path, setup: str, commands: str) -> subprocess.CompletedProcess:
    root = tmp_path / "root"
    for d in ("home", "mail", "log"):
        (root / d).mkdir(parents=True)
    # cp -a, not copytree: it copies special files as such instead of reading them
    subprocess.run(["cp", "-a", "/etc", str(root / "etc")], check=True, capture_output=True, timeout=60)
    script = (f"set -eo pipefail\n"
              f"mount --bind {root}/etc /etc && mount --bind {root}/home /home\n"
              f"mount --bind {root}/mail /var/mail && mount --bind {root}/log /var/log\n"
              f"{setup}\n"
              f"{commands} || exit $?\n"  # set -e ignores a failure inside an && list
              "echo \"uid1000=$(getent passwd 1000)\"; echo \"gid1000=$(getent group 1000)\"\n"
              "stat -c 'home=%u:%g %n' /home/ray\n")
    out = subprocess.run(["unshare", "-m", "--propagation", "private", "bash", "-c", script],
                         capture_output=True, text=True, timeout=120)
    if "unshare failed" in out.stderr or "Operation not permitted" in out.stderr:
        pytest.skip(f"no mount namespace here: {out.stderr.strip()}")
    return out


@pytest.mark.parametrize("base", ["ubuntu-24.04", "no-uid-1000"])
def test_dockerfile_creates_ray_with_uid_1000(tmp_path, base):
    setup = FREE_1000 + ("; " + UBUNTU_2404 if base == "ubuntu-24.04" else "")
    out = _in_namespace(tmp_path, setup, dockerfile_user_commands())
    assert out.returncode == 0, out.stderr
    assert "uid1000=ray:x:1000:1000::/home/ray:/bin/bash" in out.stdout
    assert "gid1000=ray:x:1000:" in out.stdout
    assert "home=1000:1000 /home/ray" in out.stdout


def test_the_old_line_fails_on_ubuntu_24_04(tmp_path):
    """The regression this guards: a blind groupadd of gid 1000 exits 4 ("GID '1000' already exists")."""
    out = _in_namespace(tmp_path, FREE_1000 + "; " + UBUNTU_2404, OLD_LINE)
    assert out.returncode == 4 and "1000" in out.stderr, (out.returncode, out.stderr)
