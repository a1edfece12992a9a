#!/usr/bin/env bash
# TorchRec's own tests against real TorchRec and against jaggedrec (through shim.py), and the
# counts. Usage:
#   tests/torchrec_suite/run.sh [TORCHREC_CHECKOUT]
# TORCHREC_CHECKOUT is a TorchRec source tree at tag v1.8.0-rc1 (a clone or `git archive`);
# without it the tag is cloned from GitHub into a temporary folder. The Python on PATH (or
# $PYTHON) must have torch, torchrec (and fbgemm-gpu), jaggedrec, pytest, hypothesis,
# parameterized and tensordict installed. TorchRec's files are only read, never copied into
# this repository.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
TAG="v1.8.0-rc1"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
CHECKOUT="${1:-}"
if [[ -z "$CHECKOUT" ]]; then
    CHECKOUT="$WORK/torchrec"
    git clone -q --depth 1 --branch "$TAG" https://github.com/meta-pytorch/torchrec "$CHECKOUT"
fi
CHECKOUT="$(cd "$CHECKOUT" && pwd)"
FILES=(
    torchrec/sparse/tests/test_jagged_tensor.py
    torchrec/sparse/tests/test_keyed_jagged_tensor.py
    torchrec/sparse/tests/test_keyed_tensor.py
    torchrec/sparse/tests/test_jagged_tensor_validator.py
    torchrec/sparse/tests/test_tensor_dict.py
    torchrec/modules/tests/test_embedding_modules.py
    torchrec/modules/tests/test_feature_processor_.py
    torchrec/modules/tests/test_fp_embedding_modules.py
    torchrec/modules/tests/test_mc_modules.py
    torchrec/modules/tests/test_mc_embedding_modules.py
    torchrec/modules/tests/test_hash_mc_modules.py
    torchrec/modules/tests/test_hash_mc_evictions.py
    torchrec/modules/tests/test_mlp.py
    torchrec/modules/tests/test_crossnet.py
    torchrec/modules/tests/test_activation.py
    torchrec/models/tests/test_dlrm.py
    torchrec/models/tests/test_deepfm.py
    torchrec/modules/tests/test_deepfm.py
    torchrec/modules/tests/test_regroup.py
    torchrec/modules/tests/test_feature_processor.py
    torchrec/modules/tests/test_lazy_extension.py
)
# the test files run from a flat folder of their own, so that `import torchrec` finds the
# installed package and not the checkout's sources
mkdir -p "$WORK/cases"
# (the models' tests as test_models_*.py: test_deepfm.py is in both folders)
for f in "${FILES[@]}"; do
    n="$(basename "$f")"
    case "$f" in */models/tests/*) n="test_models_${n#test_}" ;; esac
    cp "$CHECKOUT/$f" "$WORK/cases/$n"
done
printf '[pytest]\nmarkers =\n    torchscript: uses torch.jit\n' > "$WORK/pytest.ini"
for side in torchrec jaggedrec; do
    echo "running TorchRec's tests on $side ..."
    (cd "$WORK" && JAGGEDREC_SUITE="$side" TORCHREC_CHECKOUT="$CHECKOUT" PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" \
        "$PYTHON" -m pytest -q -c "$WORK/pytest.ini" --rootdir "$WORK" -p shim -p no:cacheprovider \
        -x --maxfail=100000 --junitxml "$WORK/$side.xml" cases > "$WORK/$side.log" 2>&1 || true)
    tail -n 1 "$WORK/$side.log"
done
"$PYTHON" "$HERE/report.py" "$WORK/torchrec.xml" "$WORK/jaggedrec.xml"
