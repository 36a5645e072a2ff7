#!/usr/bin/env bash
# Fill benchmarks/gpu/wheels/ (gitignored) with the exact pure-Python wheels run.sh installs on a GPU machine that has
# no network. Run it where PyPI is reachable, before the copy of the repository travels:
#     bash benchmarks/gpu/fetch_wheels.sh            # WHEELS=dir to fill another folder, PYTHON=... for pip
# What and why (the GPU image has torch, transformers, accelerate, pyarrow, pandas, xxhash, fsspec, ... but not these):
#   klrl:  hydra-core 1.3.8, omegaconf 2.3.1, antlr4-python3-runtime 4.9.3 (an sdist on PyPI: built into a wheel here);
#          hydra-submitit-launcher 1.2.0 + submitit 1.5.4 + cloudpickle 3.1.3 (klrl's hydra_plugins import the
#          launcher; without it Hydra's plugin scan warns)
#   TRL:   trl 1.16.0, datasets 5.2.0, dill 0.4.1, multiprocess 0.70.19 (one wheel per Python: py312 for the GPU
#          machine's python3, py311 for this repository's development machines; PYVERS="3.12 3.11" chooses)
# Every download is --no-deps and checked against the sha256 below (pip --require-hashes); the antlr4 wheel is built
# from its sdist, whose hash is checked the same way.
set -euo pipefail
KIT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DEST=${WHEELS:-$KIT/wheels}
PY=${PYTHON:-python3}
PYVERS=${PYVERS:-3.12 3.11}
mkdir -p "$DEST"
REQ=$(mktemp -d)
trap 'rm -rf "$REQ"' EXIT

cat > "$REQ/pure.txt" <<'EOF'
hydra-core==1.3.8 --hash=sha256:d5f184c291691cba835c7f04bc4e36270ad88b1d7e394a3712f5af084c30b394
omegaconf==2.3.1 --hash=sha256:3d701d14e9a8828f1edd28bb70b725908b34277cdd72cf7d6a83f94dadc6b6a0
hydra-submitit-launcher==1.2.0 --hash=sha256:51ce468fbc91211c3a46677eefde94bbb9f721c9545af0be6dd0a95658515613
submitit==1.5.4 --hash=sha256:c26f3a7c8d4150eaf70b1da71e2023e9e9936c93e8342ed7db910f29158561c5
cloudpickle==3.1.3 --hash=sha256:1654f4f18e416447210a63c5c25a135d65a292156aa5fa519dfa4baf7726dddb
trl==1.16.0 --hash=sha256:c4726e139dd40e1a41661511c639c8a68416782b2e3e8c0befebd77bb7ba0396
datasets==5.2.0 --hash=sha256:4be9e2882caaf5db13eadc39e93f3da2a995187b99acebac1595bf6c58dfa927
dill==0.4.1 --hash=sha256:1e1ce33e978ae97fcfcff5638477032b801c46c7c65cf717f95fbc2248f79a9d
EOF
cat > "$REQ/per_python.txt" <<'EOF'
multiprocess==0.70.19 --hash=sha256:3a56c0e85dd5025161bac5ce138dcac1e49174c7d8e74596537e729fd5c53c28 --hash=sha256:928851ae7973aea4ce0eaf330bbdafb2e01398a91518d5c8818802845564f45c
EOF
# the sdist: wheel built locally (its own hash then depends on the build; the sdist's is checked)
cat > "$REQ/sdist.txt" <<'EOF'
antlr4-python3-runtime==4.9.3 --hash=sha256:f224469b4168294902bb1efa80a8bf7855f24c99aef99cbefc1bcd3cce77881b
EOF

echo "== pure-Python wheels -> $DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --require-hashes -d "$DEST" -r "$REQ/pure.txt"
for v in $PYVERS; do
    echo "== multiprocess for Python $v"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --require-hashes --python-version "$v" -d "$DEST" \
        -r "$REQ/per_python.txt"
done
echo "== antlr4-python3-runtime 4.9.3 (sdist -> wheel)"
"$PY" -m pip download -q --no-deps --no-binary=:all: --require-hashes -d "$REQ/sdist" -r "$REQ/sdist.txt"
"$PY" -m pip wheel -q --no-deps -w "$DEST" "$REQ"/sdist/antlr4*-4.9.3.tar.gz

echo "== $DEST:"
ls -l "$DEST"
missing=0
for f in antlr4_python3_runtime-4.9.3-py3-none-any cloudpickle-3.1.3-py3-none-any datasets-5.2.0-py3-none-any \
         dill-0.4.1-py3-none-any hydra_core-1.3.8-py3-none-any hydra_submitit_launcher-1.2.0-py3-none-any \
         omegaconf-2.3.1-py3-none-any submitit-1.5.4-py3-none-any trl-1.16.0-py3-none-any; do
    [ -f "$DEST/$f.whl" ] || { echo "!! missing $f.whl"; missing=1; }
done
ls "$DEST"/multiprocess-0.70.19-py3*-none-any.whl >/dev/null 2>&1 || { echo "!! missing multiprocess wheels"; missing=1; }
exit $missing
