#!/usr/bin/env bash
# Assembles a runnable OpenSearch node with the k-NN plugin from Maven Central: the server and its
# modules (pom.xml), the opensearch-knn plugin zip (its jars; it ships no native faiss/nmslib
# libraries, so tests use the lucene engine), and the small launcher in src/. Prints the
# directory holding classes/, libs/ and knn/.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/common.sh"

src="$here/opensearch"
knn_version=$(sed -n 's:.*<knn.version>\(.*\)</knn.version>.*:\1:p' "$src/pom.xml")
key=$(cat "$src/pom.xml" "$src/src/VectorpipeTestNode.java" | sha256sum | cut -c1-12)
out="$VP_CACHE/opensearch/$key"
if [ -f "$out/.complete" ]; then
  log "opensearch node cached in $out"
  echo "$out"
  exit 0
fi
rm -rf "$out"
mkdir -p "$out/knn" "$out/classes"
log "resolving OpenSearch and the k-NN plugin $knn_version from Maven Central"
mvn -q -B -f "$src/pom.xml" dependency:copy-dependencies \
  -DincludeScope=runtime -DoutputDirectory="$out/libs" >&2
mvn -q -B -f "$src/pom.xml" dependency:copy \
  -Dartifact="org.opensearch.plugin:opensearch-knn:$knn_version:zip" -DoutputDirectory="$out" >&2
unzip -q -o -j "$out/opensearch-knn-$knn_version.zip" '*.jar' -d "$out/knn"
javac -nowarn -cp "$out/libs/*:$out/knn/*" -d "$out/classes" "$src/src/VectorpipeTestNode.java" >&2
touch "$out/.complete"
log "opensearch node assembled in $out"
echo "$out"
