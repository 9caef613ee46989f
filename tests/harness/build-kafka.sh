#!/usr/bin/env bash
# Resolves the Apache Kafka broker jars from Maven Central into $VP_CACHE/kafka/<version>-<pom hash>/libs
# and prints that directory.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/common.sh"

version=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$here/kafka/pom.xml")
out="$VP_CACHE/kafka/$version-$(sha256sum "$here/kafka/pom.xml" | cut -c1-12)"
if [ -f "$out/.complete" ]; then
  log "kafka $version jars cached in $out"
  echo "$out/libs"
  exit 0
fi
rm -rf "$out"
mkdir -p "$out"
log "resolving kafka $version from Maven Central"
mvn -q -B -f "$here/kafka/pom.xml" dependency:copy-dependencies \
  -DincludeScope=runtime -DoutputDirectory="$out/libs" >&2
compgen -G "$out/libs/kafka_2.13-*.jar" >/dev/null || { log "kafka jar missing in $out/libs"; exit 1; }
touch "$out/.complete"
log "kafka $version: $(ls "$out/libs" | wc -l) jars"
echo "$out/libs"
