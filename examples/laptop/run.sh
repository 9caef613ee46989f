#!/usr/bin/env bash
# The laptop mode in one command, with no Kafka, AWS account or OpenSearch: installs the local
# model once (examples/laptop/install-model.sh), builds the worker, indexes the sample posts
# (examples/laptop/posts.jsonl) into the embedded store .vectorpipe/store, and searches them.
#
#   examples/laptop/run.sh                      # index, then three example questions
#   examples/laptop/run.sh "your question" ...  # index, then your questions
#
# Afterwards: cargo run -q -p vectorpipe-worker -- search "another question" (or ask, or serve
# for the web page; the script prints how).
set -euo pipefail
cd "$(dirname "$0")/../.."

VECTORPIPE_MODEL_DIR="$(examples/laptop/install-model.sh)"
export VECTORPIPE_MODEL_DIR
echo "building vectorpipe-worker (the first build takes a while)" >&2
cargo build -q -p vectorpipe-worker
worker() { cargo run -q -p vectorpipe-worker -- "$@"; }

worker local --input examples/laptop/posts.jsonl
if [ $# -eq 0 ]; then
  set -- "my bread dough stays dense and does not rise" \
    "how should we alert when consumers fall behind" \
    "which eyepiece shows Jupiter best"
fi
for question in "$@"; do
  echo
  echo "search: $question"
  worker search "$question" -k 3
done
cat <<EOF

More from the same store:
  cargo run -q -p vectorpipe-worker -- search "a question" --mode hybrid --term topic=baking --since 2026-06-01
  cargo run -q -p vectorpipe-worker -- ask "a question"   # a written answer from Bedrock when AWS credentials are set
Search and ask in a browser:
  cargo run -q -p vectorpipe-worker -- serve              # then open http://127.0.0.1:8080/
EOF
