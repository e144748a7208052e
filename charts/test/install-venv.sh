#!/usr/bin/env bash
# Creates the Python virtual environment of the chart's offline validation
# (charts/test/validate.py), from PyPI:
#   helm-python-sdk      Helm 4's own Go library behind a C ABI: render, lint, values.schema.json
#   kubernetes-validate  the Kubernetes OpenAPI schemas (1.25-1.37) for --strict validation
# (PyYAML comes with kubernetes-validate.) Idempotent: does nothing when the venv already has
# the pinned versions. The venv is $WEFT_CHART_VENV, default <repo>/target/chart-venv.
# Exit 0 when the venv is ready; non-zero (saying why) when the packages cannot be installed.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
venv=${WEFT_CHART_VENV:-$repo/target/chart-venv}
PACKAGES=(helm-python-sdk==0.2.2 kubernetes-validate==1.37.0)

ready() {
  [[ -x $venv/bin/python ]] && "$venv/bin/python" - "${PACKAGES[@]}" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
import helm_python, kubernetes_validate, yaml  # noqa: F401 (they import)
for spec in sys.argv[1:]:
    name, want = spec.split("==")
    if version(name) != want:
        sys.exit(1)
PY
}

if ready; then
  echo "install-venv: $venv has ${PACKAGES[*]}"
  exit 0
fi
echo "install-venv: creating $venv with ${PACKAGES[*]}"
rm -rf "$venv"
mkdir -p "$(dirname "$venv")"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${PACKAGES[@]}"
if ! ready; then
  echo "install-venv: $venv still lacks ${PACKAGES[*]} after pip install" >&2
  exit 1
fi
echo "install-venv: installed ${PACKAGES[*]} into $venv"
