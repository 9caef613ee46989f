#!/usr/bin/env bash
# Starts the real servers the tests talk to, on 127.0.0.1 with ports picked at run time:
#   k8s         etcd, kube-apiserver (TLS, token auth, RBAC), kube-controller-manager,
#               kube-scheduler and kwok with one fake node
#   kafka       one Apache Kafka broker (KRaft, combined broker + controller)
#   prometheus  Debian's Prometheus, scraping the targets tests drop into a file_sd directory
#   opensearch  one OpenSearch 2.19 node with the k-NN plugin (lucene engine; no native libraries)
#   node        a real kubelet with containerd, running the project's images (after k8s; opt-in)
# usage: up.sh [component ...]   (no argument: all but node)
# Writes $VP_RUN/env (source it) and logs to $VP_RUN/log. Stop everything with down.sh.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/common.sh"

components=("$@")
[ ${#components[@]} -gt 0 ] || components=(k8s kafka prometheus opensearch)

mkdir -p "$VP_RUN/log" "$VP_RUN/pid"
envfile="$VP_RUN/env"
touch "$envfile"

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
put_env() {
  sed -i "/^export $1=/d" "$envfile"
  echo "export $1=$(printf '%q' "$2")" >>"$envfile"
  export "$1=$2"
}
start() {
  local name=$1
  shift
  nohup "$@" >"$VP_RUN/log/$name.log" 2>&1 &
  echo $! >"$VP_RUN/pid/$name"
}
# wait_for NAME SECONDS COMMAND...: polls COMMAND until it succeeds; fails with the log's tail.
wait_for() {
  local name=$1 limit=$2
  shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    if [ -f "$VP_RUN/pid/$name" ] && ! kill -0 "$(cat "$VP_RUN/pid/$name")" 2>/dev/null; then
      log "$name exited; last lines of $VP_RUN/log/$name.log:"
      tail -30 "$VP_RUN/log/$name.log" >&2
      return 1
    fi
    if [ $SECONDS -ge $deadline ]; then
      log "$name not ready after ${limit}s; last lines of $VP_RUN/log/$name.log:"
      tail -30 "$VP_RUN/log/$name.log" >&2
      return 1
    fi
    sleep 0.5
  done
}
tcp_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# sign_cert DIR NAME SUBJECT EXTENSION...: a key and a certificate signed by DIR's CA.
sign_cert() {
  local dir=$1 name=$2 subject=$3
  shift 3
  openssl req -newkey rsa:2048 -nodes -subj "$subject" \
    -keyout "$dir/$name.key" -out "$dir/$name.csr" 2>/dev/null
  printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" "$@" \
    >"$dir/$name.ext"
  openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 30 -extfile "$dir/$name.ext" -out "$dir/$name.crt" 2>/dev/null
}

up_k8s() {
  "$here/build-k8s.sh"
  "$here/build-kubectl.sh"
  local bins="$VP_CACHE/k8s/v${K8S_VERSION:-1.37.2}"
  local dir="$VP_RUN/k8s" pki="$VP_RUN/k8s/pki"
  mkdir -p "$pki"
  local etcd_port etcd_peer api_port kcm_port sched_port kwok_port
  etcd_port=$(free_port)
  etcd_peer=$(free_port)
  api_port=$(free_port)
  kcm_port=$(free_port)
  sched_port=$(free_port)
  kwok_port=$(free_port)

  log "k8s: generating a CA, the apiserver certificate and service-account keys"
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=vectorpipe-test-ca" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
    -keyout "$pki/apiserver.key" -out "$pki/apiserver.csr" 2>/dev/null
  printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth" \
    "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes.default.svc" >"$pki/apiserver.ext"
  openssl x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 30 -extfile "$pki/apiserver.ext" -out "$pki/apiserver.crt" 2>/dev/null
  # The real node's kubelet (user system:node:127.0.0.1 for the Node authorizer), its serving
  # certificate, and the apiserver's identity towards it (logs, exec).
  sign_cert "$pki" kubelet-client "/O=system:nodes/CN=system:node:127.0.0.1" "extendedKeyUsage=clientAuth"
  sign_cert "$pki" kubelet-serving "/CN=127.0.0.1" "extendedKeyUsage=serverAuth" \
    "subjectAltName=IP:127.0.0.1,DNS:localhost"
  sign_cert "$pki" apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" \
    "extendedKeyUsage=clientAuth"
  openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
  local token
  token=$(openssl rand -hex 24)
  # A static admin token; the operator's own identity is tested by impersonating its ServiceAccount.
  echo "$token,vectorpipe-test-admin,vectorpipe-test-admin,system:masters" >"$pki/tokens.csv"

  cat >"$dir/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: harness
  cluster:
    server: https://127.0.0.1:$api_port
    certificate-authority: $pki/ca.crt
users:
- name: admin
  user:
    token: $token
contexts:
- name: harness
  context: {cluster: harness, user: admin, namespace: default}
current-context: harness
KC

  log "k8s: starting etcd on :$etcd_port"
  start etcd "$bins/etcd" --name harness --data-dir "$dir/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-cluster "harness=http://127.0.0.1:$etcd_peer" \
    --unsafe-no-fsync --quota-backend-bytes=2147483648 --log-level=warn
  wait_for etcd 60 curl -sf "http://127.0.0.1:$etcd_port/health"

  log "k8s: starting kube-apiserver on :$api_port"
  start kube-apiserver "$bins/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$etcd_port" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$api_port" \
    --cert-dir="$dir/certs" --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
    --client-ca-file="$pki/ca.crt" --token-auth-file="$pki/tokens.csv" \
    --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
    --kubelet-client-certificate="$pki/apiserver-kubelet-client.crt" \
    --kubelet-client-key="$pki/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority="$pki/ca.crt" --kubelet-preferred-address-types=InternalIP \
    --service-account-issuer=https://kubernetes.default.svc \
    --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
    --service-cluster-ip-range=10.96.0.0/16 \
    --endpoint-reconciler-type=none \
    --enable-priority-and-fairness=false --profiling=false --v=0
  wait_for kube-apiserver 180 curl -sf --cacert "$pki/ca.crt" -H "Authorization: Bearer $token" \
    "https://127.0.0.1:$api_port/readyz"

  log "k8s: starting kube-controller-manager, kube-scheduler and kwok"
  # kwok's fake node sends heartbeats only now and then; with the default grace period a loaded
  # machine let the node lifecycle controller take the node for NotReady and flip every pod on it
  # to not ready (kwok never sets them ready again), so Deployments stopped being available. The
  # controller stays on (it removes the node's initial not-ready taint) with a long grace period.
  start kube-controller-manager "$bins/kube-controller-manager" \
    --kubeconfig="$dir/kubeconfig" --authentication-kubeconfig="$dir/kubeconfig" \
    --authorization-kubeconfig="$dir/kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="$kcm_port" --leader-elect=false \
    --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
    --use-service-account-credentials=false \
    --controllers='*,-node-ipam-controller' --node-monitor-grace-period=1h \
    --concurrent-deployment-syncs=10 --v=0
  start kube-scheduler "$bins/kube-scheduler" --kubeconfig="$dir/kubeconfig" \
    --authentication-kubeconfig="$dir/kubeconfig" --authorization-kubeconfig="$dir/kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="$sched_port" --leader-elect=false --v=0
  start kwok "$bins/kwok" --kubeconfig="$dir/kubeconfig" \
    --manage-all-nodes=false --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
    --cidr=10.244.0.0/16 --node-ip=10.244.0.1 --node-port="$kwok_port" --server-address="127.0.0.1:$kwok_port"

  local kubectl="$VP_CACHE/bin/kubectl --kubeconfig=$dir/kubeconfig"
  $kubectl apply -f - >/dev/null <<'NODE'
apiVersion: v1
kind: Node
metadata:
  name: kwok-node-0
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    kubernetes.io/hostname: kwok-node-0
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    type: kwok
status:
  allocatable: {cpu: "1000", memory: 4Ti, pods: "5000"}
  capacity: {cpu: "1000", memory: 4Ti, pods: "5000"}
NODE
  wait_for kwok 60 sh -c "$kubectl get node kwok-node-0 -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}' | grep -qx True"
  # The default ServiceAccount shows that the controller manager is working.
  wait_for kube-controller-manager 60 $kubectl -n default get serviceaccount default

  put_env VP_KUBECONFIG "$dir/kubeconfig"
  put_env VP_KUBECTL "$VP_CACHE/bin/kubectl"
  put_env VP_HELM "$VP_CACHE/bin/helm"
  put_env VP_APISERVER "https://127.0.0.1:$api_port"
  put_env VP_ETCD "http://127.0.0.1:$etcd_port"
  log "k8s: ready ($("$bins/kube-apiserver" --version | awk '{print $2}'), KUBECONFIG=$dir/kubeconfig)"
}

up_kafka() {
  local libs version
  libs=$("$here/build-kafka.sh")
  local version
  version=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$here/kafka/pom.xml")
  local dir="$VP_RUN/kafka" port controller scram
  mkdir -p "$dir"
  port=$(free_port)
  controller=$(free_port)
  # A second listener with SASL/SCRAM-SHA-512 (no TLS), for the SCRAM paths of the worker and the
  # operator's lag reader. Its one user is created when the storage is formatted.
  scram=$(free_port)
  cat >"$dir/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$controller
listeners=PLAINTEXT://127.0.0.1:$port,SASL_PLAINTEXT://127.0.0.1:$scram,CONTROLLER://127.0.0.1:$controller
advertised.listeners=PLAINTEXT://127.0.0.1:$port,SASL_PLAINTEXT://127.0.0.1:$scram
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_plaintext.sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
log.dirs=$dir/data
num.partitions=3
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=3
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=3
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
num.network.threads=2
num.io.threads=2
log.flush.interval.messages=9223372036854775807
PROPS
  local java_opts=(-Xms256m -Xmx768m -XX:+UseSerialGC -XX:TieredStopAtLevel=1
    -Djava.awt.headless=true "-Dlog4j2.configurationFile=$here/kafka/log4j2.properties")
  local cp="$libs/*"
  log "kafka: formatting storage and starting the broker on :$port"
  java "${java_opts[@]}" -cp "$cp" kafka.tools.StorageTool format --ignore-formatted \
    -t "$(java "${java_opts[@]}" -cp "$cp" kafka.tools.StorageTool random-uuid)" \
    --add-scram 'SCRAM-SHA-512=[name=vectorpipe,password=vectorpipe-secret]' \
    -c "$dir/server.properties" >"$VP_RUN/log/kafka-format.log" 2>&1
  start kafka java "${java_opts[@]}" -cp "$cp" kafka.Kafka "$dir/server.properties"
  wait_for kafka 120 tcp_open "$port"
  wait_for kafka 60 tcp_open "$scram"
  put_env VP_KAFKA_BOOTSTRAP "127.0.0.1:$port"
  put_env VP_KAFKA_SCRAM_BOOTSTRAP "127.0.0.1:$scram"
  put_env VP_KAFKA_SCRAM_USERNAME vectorpipe
  put_env VP_KAFKA_SCRAM_PASSWORD vectorpipe-secret
  log "kafka: ready ($version, bootstrap 127.0.0.1:$port)"
}

up_prometheus() {
  if ! command -v prometheus >/dev/null; then
    log "prometheus: not installed; install Debian's package: apt-get install -y prometheus"
    return 1
  fi
  local dir="$VP_RUN/prometheus" port
  mkdir -p "$dir/targets"
  port=$(free_port)
  cat >"$dir/prometheus.yml" <<YML
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: prometheus
    static_configs:
      - targets: ["127.0.0.1:$port"]
  # Tests drop <name>.json files here ([{"targets": ["127.0.0.1:PORT"], "labels": {...}}]).
  - job_name: harness
    file_sd_configs:
      - files: ["$dir/targets/*.json"]
        refresh_interval: 1s
YML
  log "prometheus: starting on :$port"
  start prometheus prometheus --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/data" \
    --storage.tsdb.retention.time=2h --web.listen-address="127.0.0.1:$port" --log.level=warn
  wait_for prometheus 60 curl -sf "http://127.0.0.1:$port/-/ready"
  put_env VP_PROMETHEUS_URL "http://127.0.0.1:$port"
  put_env VP_PROMETHEUS_TARGETS "$dir/targets"
  log "prometheus: ready ($(prometheus --version 2>&1 | sed -n 1p | awk '{print $3}'))"
}

up_opensearch() {
  local node dir="$VP_RUN/opensearch" port transport
  node=$("$here/build-opensearch.sh")
  mkdir -p "$dir/config"
  cp "$here/opensearch/log4j2.properties" "$dir/config/log4j2.properties"
  port=$(free_port)
  transport=$(free_port)
  log "opensearch: starting on :$port"
  start opensearch java -Xms512m -Xmx1g -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    -Djava.awt.headless=true -Dlog4j2.configurationFile="$dir/config/log4j2.properties" \
    -cp "$node/classes:$node/libs/*:$node/knn/*" VectorpipeTestNode "$dir" "$port" "$transport"
  wait_for opensearch 180 curl -sf "http://127.0.0.1:$port/_cluster/health?wait_for_status=yellow&timeout=1s"
  put_env VP_OPENSEARCH_URL "http://127.0.0.1:$port"
  log "opensearch: ready ($(curl -s "http://127.0.0.1:$port" | python3 -c 'import json,sys; print(json.load(sys.stdin)["version"]["number"])'), k-NN plugin loaded)"
}

# A real node next to kwok's fake one: Debian's containerd and runc, the kubelet built with the
# control plane, the pause image built from the Kubernetes source, the project's images imported
# from binaries cargo built (images.sh). Two settings are essential on these machines: containerd
# must not lower a sandbox's oom_score_adj (root lacks CAP_SYS_RESOURCE), and the node is named
# 127.0.0.1 (its InternalIP, so probes, host-network pod IPs and the apiserver's calls to the
# kubelet stay on loopback). Pods reach it only when they ask: the node carries the taint
# vectorpipe.io/real-node=true:NoSchedule, and pods labelled vectorpipe.io/real-node=true are
# put on the host network by an admission policy (servers here may listen on 127.0.0.0/8 only).
up_node() {
  if [ -z "${VP_KUBECONFIG:-}" ]; then
    log "node: needs the k8s component first (up.sh k8s ... node)"
    return 1
  fi
  local tool
  for tool in containerd containerd-shim-runc-v2 runc ctr; do
    if ! command -v "$tool" >/dev/null || [ ! -x /usr/lib/cni/loopback ]; then
      log "node: install Debian's containerd, runc and CNI plugins: apt-get install -y containerd runc containernetworking-plugins"
      return 1
    fi
  done
  "$here/build-k8s.sh"
  local k8s_version="${K8S_VERSION:-1.37.2}"
  local bins="$VP_CACHE/k8s/v$k8s_version" dir="$VP_RUN/node" pki="$VP_RUN/k8s/pki"
  local kubectl="$VP_CACHE/bin/kubectl --kubeconfig=$VP_KUBECONFIG"
  mkdir -p "$dir/cni" "$dir/images" "$dir/kubelet" "$dir/pod-logs"

  # The sandbox image the kubelet of this version expects, built as upstream builds it.
  local pause="$VP_CACHE/images/pause-3.10.2.tar"
  if [ ! -f "$pause" ]; then
    local src
    src="$(go env GOMODCACHE)/k8s.io/kubernetes@v$k8s_version/build/pause/linux/pause.c"
    [ -f "$src" ] || (cd "$VP_CACHE/k8s/src-v$k8s_version" && GOFLAGS=-mod=mod go mod download "k8s.io/kubernetes@v$k8s_version")
    mkdir -p "$VP_CACHE/images" "$dir/pause-rootfs"
    gcc -Os -Wall -Werror -static -DVERSION=v3.10.2-0 -o "$dir/pause-rootfs/pause" "$src"
    strip "$dir/pause-rootfs/pause"
    python3 "$here/mkimage.py" "$dir/pause-rootfs" "$pause.tmp" registry.k8s.io/pause:3.10.2 \
      --entrypoint '["/pause"]' --user 65535:65535 >&2
    mv "$pause.tmp" "$pause"
  fi

  printf '{"cniVersion": "1.0.0", "name": "host-network-only", "plugins": [{"type": "loopback"}]}\n' \
    >"$dir/cni/10-loopback.conflist"
  cat >"$dir/containerd.toml" <<TOML
version = 2
root = "$dir/containerd/root"
state = "$dir/containerd/state"
oom_score = 0
[grpc]
  address = "$dir/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.10.2"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_tcp_service = true
  disable_apparmor = true
  # No CAP_SYS_RESOURCE here: runc cannot give a sandbox the -998 containerd asks for.
  restrict_oom_score_adj = true
  tolerate_missing_hugetlb_controller = true
  disable_hugetlb_controller = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$dir/containerd/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$dir/cni"
[plugins."io.containerd.internal.v1.opt"]
  path = "$dir/containerd/opt"
TOML
  log "node: starting containerd"
  start containerd containerd --config "$dir/containerd.toml"
  local ctr="ctr --address $dir/containerd.sock -n k8s.io"
  wait_for containerd 30 $ctr version
  $ctr images import "$pause" >/dev/null
  CONTAINERD_ADDRESS="$dir/containerd.sock" "$here/images.sh" \
    "${VP_IMAGE_BINARIES:-${CARGO_TARGET_DIR:-$VP_CACHE/target}/debug}" "$dir/images" --import

  local port healthz api
  port=$(free_port)
  healthz=$(free_port)
  api=$(sed -n 's/^ *server: *//p' "$VP_KUBECONFIG")
  cat >"$dir/kubelet.kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: harness
  cluster: {server: "$api", certificate-authority: "$pki/ca.crt"}
users:
- name: kubelet
  user: {client-certificate: "$pki/kubelet-client.crt", client-key: "$pki/kubelet-client.key"}
contexts:
- name: harness
  context: {cluster: harness, user: kubelet}
current-context: harness
KC
  cat >"$dir/kubelet.yaml" <<CFG
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: $port
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $healthz
tlsCertFile: $pki/kubelet-serving.crt
tlsPrivateKeyFile: $pki/kubelet-serving.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: Webhook}
containerRuntimeEndpoint: unix://$dir/containerd.sock
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
podLogsDir: $dir/pod-logs
maxPods: 30
serializeImagePulls: false
# The imported images are all there is: never collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
rotateCertificates: false
registerWithTaints:
- {key: vectorpipe.io/real-node, value: "true", effect: NoSchedule}
CFG
  log "node: starting the kubelet on :$port"
  start kubelet "$bins/kubelet" --config="$dir/kubelet.yaml" --kubeconfig="$dir/kubelet.kubeconfig" \
    --root-dir="$dir/kubelet" --hostname-override=127.0.0.1 --v=1
  wait_for kubelet 120 curl -sf "http://127.0.0.1:$healthz/healthz"
  wait_for kubelet 120 sh -c "$kubectl get node 127.0.0.1 -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}' | grep -qx True"

  local api_host=${api#https://} 
  $kubectl apply -f - >/dev/null <<POLICY
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingAdmissionPolicy
metadata: {name: vectorpipe-real-node}
spec:
  matchConstraints:
    resourceRules:
    - {apiGroups: [""], apiVersions: [v1], operations: [CREATE], resources: [pods]}
  failurePolicy: Fail
  reinvocationPolicy: Never
  variables:
  - name: worker
    expression: >
      has(object.metadata.labels) && object.metadata.labels[?"app.kubernetes.io/name"].orValue("") == "vectorpipe-worker"
  mutations:
  # Host network; servers bound to all addresses (the operator's metrics, a query server) move
  # to 127.0.0.1; the API is reached on
  # 127.0.0.1 (no kube-proxy here for the kubernetes Service). Worker pods share the host's
  # ports, so two of them (a scale-out, a rollout's surge pod) would collide on the metrics port:
  # each serves its metrics on a port of its own (127.0.0.1:0) and the admin socket, which the
  # exec probes use, and declares no container port (a hostNetwork pod's container ports become
  # host ports, and the scheduler would keep the second pod Pending).
  - patchType: ApplyConfiguration
    applyConfiguration:
      expression: >
        Object{spec: Object.spec{hostNetwork: true, dnsPolicy: "ClusterFirstWithHostNet",
          containers: object.spec.containers.map(c, Object.spec.containers{name: c.name,
            env: (has(c.env) ? c.env : []).filter(e, (e.name == "VECTORPIPE_METRICS_ADDRESS" || e.name == "VECTORPIPE_QUERY_ADDRESS") && has(e.value)).map(e,
              Object.spec.containers.env{name: e.name, value: variables.worker && e.name == "VECTORPIPE_METRICS_ADDRESS" ? "127.0.0.1:0" : e.value.replace("0.0.0.0:", "127.0.0.1:")})
              + [Object.spec.containers.env{name: "KUBERNETES_SERVICE_HOST", value: "${api_host%:*}"},
                 Object.spec.containers.env{name: "KUBERNETES_SERVICE_PORT", value: "${api_host##*:}"}]})}}
  - patchType: JSONPatch
    jsonPatch:
      expression: >
        variables.worker ? object.spec.containers.filter(c, has(c.ports)).map(c,
          JSONPatch{op: "remove", path: "/spec/containers/" + string(object.spec.containers.indexOf(c)) + "/ports"}) : []
---
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingAdmissionPolicyBinding
metadata: {name: vectorpipe-real-node}
spec:
  policyName: vectorpipe-real-node
  matchResources:
    objectSelector:
      matchLabels: {vectorpipe.io/real-node: "true"}
POLICY
  put_env VP_REAL_NODE 127.0.0.1
  put_env VP_CONTAINERD_ADDRESS "$dir/containerd.sock"
  log "node: ready ($("$bins/kubelet" --version | awk '{print $2}'), containerd $(containerd --version | awk '{print $3}'))"
}

put_env VP_RUN "$VP_RUN"
for c in "${components[@]}"; do
  case "$c" in
    k8s) up_k8s ;;
    kafka) up_kafka ;;
    prometheus) up_prometheus ;;
    opensearch) up_opensearch ;;
    node) up_node ;;
    *) log "unknown component $c (known: k8s kafka prometheus opensearch node)"; exit 2 ;;
  esac
done
log "harness up; environment in $envfile"
