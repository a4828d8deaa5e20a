#!/usr/bin/env bash
# Deploy the wbc-maskrcnn CVAT detector into the local Nuclio that CVAT's serverless compose file starts.
# Like CVAT's serverless/deploy_cpu.sh and deploy_gpu.sh, for this one function. See serverless/README.md.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: ./serverless/deploy.sh [cpu|gpu] [BUNDLE_DIR] [--mount | --registry]

Builds and deploys the Nuclio function "wbc-maskrcnn" (CVAT detector, project "cvat", platform local).

  cpu|gpu     which function file to deploy: function.yaml (default) or function-gpu.yaml
  BUNDLE_DIR  model bundle folder (bundle.yaml + model.pt), e.g. runs/seg1/bundle written by
              'python -m trainer train-segmenter'; default: models/starter, the starter bundle shipped
              with the project (finds and outlines WBCs on day one; names them among 9 RV-PBS types)
  --mount     do not copy the bundle into the image: bind-mount BUNDLE_DIR (host path) at
              /models/current instead, so a new bundle is rolled out by replacing the folder's
              contents (or re-pointing a symlink) and restarting the container, without a rebuild
  --registry  BUNDLE_DIR is a model registry (python -m trainer retrain / registry --root DIR): mount
              it at /models and serve /models/current; every version the retrain job promotes is
              picked up by the running function within WBC_RELOAD_SECONDS (no rebuild, no restart)

What gets built: a staging folder that Nuclio copies to /opt/nuclio in the image:
  main.py                      (serverless/main.py; handler main:handler)
  wbc_core/, serverless/       (the serving core and the function; nothing of trainer/ or cvat_sync/)
  pyproject.toml, README.md    (the image installs ".[serve]" under serverless/constraints-serve.txt)
  function.yaml | function-gpu.yaml, its label spec written from the bundle's classes and attributes
                               (python -m serverless spec), so CVAT is told exactly the labels it returns
  bundle/                      (copy of BUNDLE_DIR; WBC_BUNDLE_DIR=/opt/nuclio/bundle) unless --mount

Environment: PYTHON (a Python with this project installed, default python3; writes the spec),
NUCTL (nuctl binary, default 'nuctl'), CVAT_NETWORK (default cvat_cvat),
NUCLIO_PROJECT (default cvat; CVAT sends x-nuclio-project-name: cvat).
The nuctl version must match the Nuclio dashboard image of docker-compose.serverless.yml.
EOF
}

die() { echo "deploy.sh: error: $*" >&2; exit 1; }

DEVICE=cpu
BUNDLE=""
MOUNT=0
REGISTRY=0
for arg in "$@"; do
    case "$arg" in
        -h|--help) usage; exit 0 ;;
        cpu|gpu) DEVICE="$arg" ;;
        --mount) MOUNT=1 ;;
        --registry) REGISTRY=1 ;;
        -*) usage >&2; die "unknown option $arg" ;;
        *) [[ -z "$BUNDLE" ]] || { usage >&2; die "more than one BUNDLE_DIR given"; }
           BUNDLE="$arg" ;;
    esac
done
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
if [[ -z "$BUNDLE" ]]; then
    [[ "$REGISTRY" == 0 ]] || die "--registry needs the registry folder as BUNDLE_DIR"
    BUNDLE="$REPO/models/starter"
    echo "no BUNDLE_DIR given: deploying the starter bundle $BUNDLE"
fi
NUCTL="${NUCTL:-nuctl}"
PYTHON="${PYTHON:-python3}"
NETWORK="${CVAT_NETWORK:-cvat_cvat}"
PROJECT="${NUCLIO_PROJECT:-cvat}"
FUNCTION=wbc-maskrcnn
if [[ "$DEVICE" == gpu ]]; then YAML=function-gpu.yaml; else YAML=function.yaml; fi

# --- checks ---------------------------------------------------------------------------------------
[[ -d "$BUNDLE" ]] || die "bundle folder $BUNDLE does not exist"
BUNDLE="$(cd "$BUNDLE" && pwd)"
[[ "$MOUNT$REGISTRY" != 11 ]] || die "--mount and --registry exclude each other"
if [[ "$REGISTRY" == 1 ]]; then
    [[ -L "$BUNDLE/current" ]] || die "$BUNDLE/current is missing: not a model registry with a promoted version (run 'python -m trainer retrain' or 'python -m trainer registry list --root $BUNDLE')"
    REGISTRY_ROOT="$BUNDLE"
    BUNDLE="$REGISTRY_ROOT/current"
fi
[[ -f "$BUNDLE/bundle.yaml" ]] || die "$BUNDLE/bundle.yaml is missing: not a model bundle (train one with 'python -m trainer train-segmenter ... --out runs/seg1' and pass runs/seg1/bundle)"
[[ -f "$BUNDLE/model.pt" ]] || die "$BUNDLE/model.pt is missing: the bundle is incomplete, copy it again"
[[ -f "$REPO/$YAML" ]] || die "$REPO/$YAML is missing"
command -v "$NUCTL" >/dev/null 2>&1 || die "'$NUCTL' not found: install the nuctl release that matches the Nuclio dashboard (e.g. https://github.com/nuclio/nuclio/releases/tag/1.13.0) or set NUCTL=/path/to/nuctl"
echo "nuctl: $("$NUCTL" version 2>/dev/null | head -n 1 || echo unknown)"
if command -v docker >/dev/null 2>&1; then
    dashboard="$(docker ps --filter name=nuclio --format '{{.Image}}' 2>/dev/null | grep -m1 dashboard || true)"
    [[ -z "$dashboard" ]] || echo "nuclio dashboard image: $dashboard (nuctl must be the same version)"
fi

# --- stage the build context (what Nuclio copies to /opt/nuclio) -----------------------------------
STAGE="$(mktemp -d "${TMPDIR:-/tmp}/wbc-maskrcnn.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT
tar -C "$REPO" --exclude='__pycache__' --exclude='*.pyc' -cf - wbc_core serverless pyproject.toml README.md \
    | tar -C "$STAGE" -xf -
cp "$REPO/serverless/main.py" "$STAGE/main.py"
cp "$REPO/$YAML" "$STAGE/$YAML"
# the label spec CVAT reads, from the bundle being deployed (its classes, and its classifier's attributes)
(cd "$REPO" && "$PYTHON" -m serverless spec --bundle "$BUNDLE" --write "$STAGE/$YAML") \
    || die "cannot write the label spec from $BUNDLE (is the project installed for $PYTHON? set PYTHON=...)"
VOLUME_ARGS=()
if [[ "$REGISTRY" == 1 ]]; then
    BUNDLE_IN_IMAGE=/models/current
    # the function file's `models` volume is pointed at the registry (hostPath), served from /models/current
    sed -i "s#path: /opt/wbc/models#path: $REGISTRY_ROOT#; s#value: /opt/nuclio/bundle#value: $BUNDLE_IN_IMAGE#" "$STAGE/$YAML"
    echo "registry: $REGISTRY_ROOT mounted at /models; serving $BUNDLE_IN_IMAGE -> $(readlink "$REGISTRY_ROOT/current")"
elif [[ "$MOUNT" == 1 ]]; then
    BUNDLE_IN_IMAGE=/models/current
    VOLUME_ARGS=(--volume "$BUNDLE:$BUNDLE_IN_IMAGE")
    sed -i "s#value: /opt/nuclio/bundle#value: $BUNDLE_IN_IMAGE#" "$STAGE/$YAML"
    echo "bundle: $BUNDLE mounted at $BUNDLE_IN_IMAGE"
else
    BUNDLE_IN_IMAGE=/opt/nuclio/bundle
    mkdir "$STAGE/bundle"
    cp -RL "$BUNDLE"/. "$STAGE/bundle/"
    echo "bundle: $BUNDLE copied into the image at $BUNDLE_IN_IMAGE"
fi

# --- deploy -------------------------------------------------------------------------------------------
if ! "$NUCTL" get project "$PROJECT" --platform local >/dev/null 2>&1; then
    "$NUCTL" create project "$PROJECT" --platform local
fi
echo "Deploying $FUNCTION from $YAML ..."
"$NUCTL" deploy --project-name "$PROJECT" \
    --path "$STAGE" \
    --file "$STAGE/$YAML" \
    --platform local \
    --env "WBC_BUNDLE_DIR=$BUNDLE_IN_IMAGE" \
    ${VOLUME_ARGS[@]+"${VOLUME_ARGS[@]}"} \
    --platform-config "{\"attributes\": {\"network\": \"$NETWORK\"}}"

"$NUCTL" get function "$FUNCTION" --platform local
