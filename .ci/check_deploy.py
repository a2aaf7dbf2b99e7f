"""CI: the deploy files hold up as far as this machine allows, with the real tools.

- Kubernetes: `kubectl kustomize` renders deploy/k8s and deploy/k8s/migrate; every rendered resource and
  example Secret passes `kubernetes-validate --strict` (the API's own schemas, unknown fields rejected).
- Docker: hadolint on deploy/Dockerfile.
- systemd: `systemd-analyze verify` on every unit in a scratch root (any warning fails), and
  `systemd-sysusers --dry-run` on the sysusers file.
- Prometheus: `promtool check config` on both scrape configs (Debian's promtool lacks Kubernetes
  service discovery, so that block is checked for shape here and swapped for a static one).

Tools are looked up on PATH and in the tools virtualenv .ci/run makes (TOOLS env var).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def tool(name: str) -> str:
    tools = os.environ.get("TOOLS")
    found = shutil.which(name, path=f"{tools}/bin:{os.environ['PATH']}" if tools else None)
    if found is None:
        sys.exit(f"check_deploy: {name} is not installed (.ci/run installs it)")
    return found


def run(*args: str, quiet_required: bool = False, **kwargs) -> str:
    print("+", " ".join(Path(args[0]).name if i == 0 else a for i, a in enumerate(args)), flush=True)
    result = subprocess.run(args, capture_output=True, text=True, check=False, **kwargs)
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0 or (quiet_required and output):
        sys.exit(f"check_deploy: failed:\n{output}")
    return result.stdout


def check_kubernetes(scratch: Path) -> None:
    kubectl, validate = tool("kubectl"), tool("kubernetes-validate")
    rendered = []
    for folder in (DEPLOY / "k8s", DEPLOY / "k8s" / "migrate"):
        out = scratch / f"{folder.name}.yaml"
        out.write_text(run(kubectl, "kustomize", str(folder)))
        rendered.append(str(out))
    examples = [str(path) for path in sorted((DEPLOY / "k8s").rglob("secret.example.yaml"))]
    run(validate, "--strict", "--quiet", *rendered, *examples)


def check_systemd(scratch: Path) -> None:
    root = scratch / "root"
    units = root / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    for system_units in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if (system_units / "sysinit.target").exists():
            shutil.copytree(system_units, root / "usr" / "lib" / "systemd" / "system", symlinks=True)
            break
    executable = root / "opt" / "dipc" / "venv" / "bin" / "dipc"  # the path the units name
    executable.parent.mkdir(parents=True)
    executable.write_text("#!/bin/sh\n")
    executable.chmod(0o755)
    names = []
    for unit in sorted((DEPLOY / "systemd").glob("dipc*.[st]*")):
        if unit.suffix in (".service", ".timer"):
            shutil.copy(unit, units / unit.name)
            names.append(unit.name)
    run(tool("systemd-analyze"), "verify", f"--root={root}", "--man=no", *names, quiet_required=True)
    run(tool("systemd-sysusers"), f"--root={root}", "--dry-run", str(DEPLOY / "systemd" / "dipc.sysusers"))


def check_prometheus(scratch: Path) -> None:
    promtool = tool("promtool")
    run(promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus-kubernetes.yml").read_text())
    for job in config["scrape_configs"]:
        sd = job.pop("kubernetes_sd_configs")
        assert [entry["role"] for entry in sd] == ["pod"], sd
        job["static_configs"] = [{"targets": ["dipc:8080"]}]
    assert {job["job_name"] for job in config["scrape_configs"]} == {"dipc"}  # the alerts' job="dipc"
    copy = scratch / "prometheus-kubernetes.yml"
    copy.write_text(yaml.safe_dump(config))
    shutil.copy(DEPLOY / "prometheus" / "alerts.yml", scratch / "alerts.yml")
    run(promtool, "check", "config", str(copy))


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="dipc-deploy-") as directory:
        scratch = Path(directory)
        check_kubernetes(scratch)
        run(tool("hadolint"), str(DEPLOY / "Dockerfile"))
        check_systemd(scratch)
        check_prometheus(scratch)
    print("deploy files: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
