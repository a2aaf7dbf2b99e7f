"""CI: the alert rules pass promtool (syntax and unit tests), and every dashboard query is valid PromQL.

Grafana panels are checked by writing their queries as recording rules and asking promtool about them.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import orjson
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def promtool(*args: str) -> None:
    print("+ promtool", " ".join(args), flush=True)
    subprocess.run(["promtool", *args], check=True)


def main() -> int:
    promtool("check", "rules", str(DEPLOY / "prometheus" / "alerts.yml"))
    promtool("test", "rules", str(DEPLOY / "prometheus" / "alerts_test.yml"))
    dashboard = orjson.loads((DEPLOY / "grafana" / "dashboards" / "dipc.json").read_bytes())
    rules = [
        {"record": f"dashboard:panel{panel['id']}_{target['refId'].lower()}",
         "expr": target["expr"].replace("$__rate_interval", "5m")}
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])  # a row panel has none
    ]  # fmt: skip
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as handle:
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, handle)
    promtool("check", "rules", handle.name)
    Path(handle.name).unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
