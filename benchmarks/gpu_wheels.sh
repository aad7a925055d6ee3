#!/usr/bin/env bash
# Fill .wheels/ (git-ignored) with what benchmarks/gpu_check.sh needs on the device machine,
# which has no network and lacks torchattacks and foolbox:
#   * the attack backends and foolbox's pure-Python dependencies that machine lacks
#     (eagerpy, GitPython, gitdb, smmap; numpy, scipy, requests, typing-extensions, torchvision
#     and tqdm are there), as py3-none-any wheels, no dependencies resolved; and `wheel`, which
#     the offline `pip install --no-build-isolation -e .` needs where setuptools is older than
#     70.1 (checked here in a bare venv: without it, "invalid command 'bdist_wheel'");
#   * when ../shared is here (LIPVERIFY_SHARED overrides): the CIFAR-10 test split of the JPEG
#     mirror as a gzipped tar (test/<class>/*.jpg, about 3 MiB) and the reference
#     checkpoint soc-lipconvnet5-hh1-lln-c10.pt, so the 10k certification runs on real images
#     with a trained LipConvNet-5 (without them gpu_check.sh falls back to synthetic images
#     and an untrained network, and says so).
# Refuses to finish above 60 MiB (the device tool carries 64 MiB with the working tree).
#
#   benchmarks/gpu_wheels.sh [DEST]        # DEST defaults to .wheels
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-.wheels}"
SHARED="${LIPVERIFY_SHARED:-../shared}"
mkdir -p "$DEST"

python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$DEST" \
    torchattacks==3.5.1 foolbox==3.3.4 eagerpy==0.30.0 GitPython==3.2.1 gitdb==4.0.12 \
    smmap==5.0.3 wheel==0.45.1

archive="$SHARED/datasets/cifar10-jpg.tar.gz"
if [[ -f "$archive" && ! -f "$DEST/cifar10-test.tar.gz" ]]; then
    python3 - "$archive" "$DEST/cifar10-test.tar.gz" <<'EOF'
import sys, tarfile
src, dst = sys.argv[1], sys.argv[2]
n = 0
with tarfile.open(src, "r:gz") as tin, tarfile.open(dst + ".tmp", "w:gz") as tout:
    for member in tin:  # the mirror stores test/ first: stop at the first train/ entry
        top = member.name.split("/")[0]
        if top == "train":
            break
        if top == "test" and member.isfile():
            tout.addfile(member, tin.extractfile(member))
            n += 1
import os
os.replace(dst + ".tmp", dst)
print(f"{dst}: {n} test images")
EOF
fi
ckpt="$SHARED/compat/soc-lipconvnet5-hh1-lln-c10.pt"
if [[ -f "$ckpt" ]]; then
    cp "$ckpt" "$DEST/"
fi

ls -l "$DEST"
total=$(du -sm "$DEST" | cut -f1)
echo "$DEST: ${total} MiB"
if (( total > 60 )); then
    echo "$DEST is over 60 MiB: the device tool could not carry it with the working tree" >&2
    exit 1
fi
