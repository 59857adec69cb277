#!/usr/bin/env bash
# Install what is missing, then annotate a few example texts with the embedded model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m spacy_cllmfs demo "$@"
