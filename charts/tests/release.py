"""Runs one Helm release action with real Helm (helm-python-sdk) against a kubeconfig, for the
chart's install test (controller/tests/chart.rs):

    release.py install|upgrade|uninstall|render KUBECONFIG NAMESPACE RELEASE [VALUES_JSON]

Prints one JSON object: the release's name, status and manifest (install, upgrade), or the
rendered templates (render: cluster-aware, so Capabilities are the API server's). Exits 1 with
Helm's message on stderr when Helm refuses."""

import json
import sys
from pathlib import Path

from helm_python import Chart, Config, HelmError

CHART = Path(__file__).resolve().parents[1] / "opensandbox"


def main(argv):
    action, kubeconfig, namespace, release = argv[1:5]
    values = json.loads(argv[5]) if len(argv) > 5 else {}
    config = Config(kubeconfig_path=kubeconfig, namespace=namespace)
    chart = Chart.load(str(CHART))
    try:
        if action == "install":
            out = config.install(chart, release, values, namespace=namespace,
                                 create_namespace=True, timeout=120)
        elif action == "upgrade":
            out = config.upgrade(chart, release, values, namespace=namespace, timeout=120)
        elif action == "uninstall":
            out = config.uninstall(release, timeout=120)
        elif action == "render":
            out = config.render(chart, values, name=release, namespace=namespace)
        else:
            raise SystemExit(f"unknown action {action}")
    except HelmError as e:
        print(str(e), file=sys.stderr)
        return 1
    print(json.dumps(out, default=lambda o: getattr(o, "__dict__", str(o))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
