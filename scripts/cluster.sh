#!/usr/bin/env bash
# A three-node RabbitMQ cluster on this one machine, beside (not instead of) the
# single node scripts/services.sh starts. Every node has its own name, ports and
# data directory; all listen on loopback only. Node 3 also has an amqps
# listener with the certificates services.sh makes. Quorum queues declared on
# it get a member on each node.
#
#   scripts/cluster.sh start [N…]   start the nodes (all by default) and join them
#   scripts/cluster.sh stop [N…]    stop them cleanly
#   scripts/cluster.sh kill N       kill -9 node N's Erlang VM (a crash)
#   scripts/cluster.sh pid N        node N's Erlang VM's process id
#   scripts/cluster.sh leader Q     the node (N) holding quorum queue Q's leader
#   scripts/cluster.sh members Q    how many nodes hold a member of quorum queue Q
#   scripts/cluster.sh urls USER PASSWORD   AMQP_URL for all three nodes
#   scripts/cluster.sh reset        stop every node and remove its data
#
# Node N is pwN@localhost, AMQP on 127.0.0.1:$((PW_CLUSTER_PORT + N)) (5681-5683
# by default), Erlang distribution on 25681-25683, amqps on node 3 at
# PW_CLUSTER_AMQPS_PORT (5691). Data: $PW_CLUSTER_DIR/pwN.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/services.sh"

PW_CLUSTER_PORT="${PW_CLUSTER_PORT:-5680}"
PW_CLUSTER_AMQPS_PORT="${PW_CLUSTER_AMQPS_PORT:-5691}"
PW_CLUSTER_DIR="${PW_CLUSTER_DIR:-/var/lib/rabbitmq/profile-worker-cluster}"
PW_CLUSTER_NODES=(1 2 3)

node_name() { echo "pw$1@localhost"; }
node_port() { echo $((PW_CLUSTER_PORT + $1)); }
node_dir() { echo "$PW_CLUSTER_DIR/pw$1"; }
ctl() { local n="$1"; shift; as_root rabbitmqctl -n "$(node_name "$n")" "$@"; }

write_node_conf() { # N
  local n="$1" dir; dir="$(node_dir "$n")"
  as_root install -d -o rabbitmq -g rabbitmq "$dir" "$dir/log"
  {
    echo "listeners.tcp.default = 127.0.0.1:$(node_port "$n")"
    echo "loopback_users.guest = true"
    if [ "$n" = 3 ]; then
      echo "listeners.ssl.default = 127.0.0.1:$PW_CLUSTER_AMQPS_PORT"
      echo "ssl_options.cacertfile = $PW_TLS_DIR/ca.pem"
      echo "ssl_options.certfile = $PW_TLS_DIR/server.pem"
      echo "ssl_options.keyfile = $PW_TLS_DIR/server.key"
      echo "ssl_options.verify = verify_none"
      echo "ssl_options.fail_if_no_peer_cert = false"
    fi
  } | as_root tee "$dir/rabbitmq.conf" >/dev/null
  # No plugins: the single node's management port must not collide.
  echo "[]." | as_root tee "$dir/enabled_plugins" >/dev/null
  as_root chown rabbitmq:rabbitmq "$dir/rabbitmq.conf" "$dir/enabled_plugins"
}

start_node() { # N
  local n="$1" dir; dir="$(node_dir "$n")"
  if port_open "$(node_port "$n")"; then
    log "cluster node $n already listening on $(node_port "$n")"
    return
  fi
  write_node_conf "$n"
  log "starting cluster node $n ($(node_name "$n"), port $(node_port "$n"))"
  # Busy-waiting schedulers off: four idle Erlang VMs on two cores must not
  # take CPU from the one under test.
  as_root env ERL_EPMD_ADDRESS=127.0.0.1 \
    RABBITMQ_NODENAME="$(node_name "$n")" \
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_NODE_PORT="$(node_port "$n")" \
    RABBITMQ_DIST_PORT=$((20000 + $(node_port "$n"))) \
    RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
    RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
    RABBITMQ_MNESIA_BASE="$dir/mnesia" \
    RABBITMQ_LOG_BASE="$dir/log" \
    RABBITMQ_PID_FILE="$dir/pid" \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1} +sbwt none +sbwtdcpu none +sbwtdio none" \
    rabbitmq-server -detached
}

await_node() { # N
  local n="$1"
  wait_port "$(node_port "$n")" 120 "cluster node $n"
  ctl "$n" -q await_startup --timeout 120 >/dev/null
}

running_nodes() { # N: the nodes node N sees running
  ctl "$1" -q cluster_status --formatter json 2>/dev/null |
    python3 -c 'import json,sys; print(" ".join(json.load(sys.stdin).get("running_nodes", [])))'
}

join_node() { # N: into node 1's cluster, unless it is in it already
  local n="$1"
  if ctl "$n" -q cluster_status --formatter json 2>/dev/null |
    python3 -c 'import json,sys; d=json.load(sys.stdin); sys.exit(0 if "pw1@localhost" in d.get("disk_nodes", []) else 1)'; then
    return
  fi
  log "joining node $n to $(node_name 1)"
  # The CLI reports the join's transient warnings on stderr; failures still stop the script.
  ctl "$n" -q stop_app >/dev/null 2>&1
  ctl "$n" -q reset >/dev/null 2>&1
  ctl "$n" -q join_cluster "$(node_name 1)" >/dev/null 2>&1
  ctl "$n" -q start_app >/dev/null 2>&1
}

cmd_start() {
  command -v rabbitmq-server >/dev/null 2>&1 || apt_install rabbitmq-server
  command -v python3 >/dev/null 2>&1 || apt_install python3
  make_tls_certs
  # Only the first use needs epmd on loopback; services.sh may not have run.
  pgrep -x epmd >/dev/null || as_root env ERL_EPMD_ADDRESS=127.0.0.1 epmd -daemon
  local nodes=("$@"); [ ${#nodes[@]} -gt 0 ] || nodes=("${PW_CLUSTER_NODES[@]}")
  for n in "${nodes[@]}"; do start_node "$n"; done
  for n in "${nodes[@]}"; do await_node "$n"; done
  for n in "${nodes[@]}"; do [ "$n" = 1 ] || join_node "$n"; done
  wait_port "$PW_CLUSTER_AMQPS_PORT" 30 "cluster node 3 (amqps)" || true
  log "cluster running: $(running_nodes "${nodes[0]}")"
}

cmd_stop() {
  local nodes=("$@"); [ ${#nodes[@]} -gt 0 ] || nodes=(3 2 1)
  for n in "${nodes[@]}"; do
    port_open "$(node_port "$n")" || [ -s "$(node_dir "$n")/pid" ] || continue
    log "stopping cluster node $n"
    ctl "$n" -q stop >/dev/null 2>&1 || true
  done
}

cmd_pid() { # N
  local n="$1"
  ctl "$n" -q eval 'os:getpid().' | tr -d '"'
}

cmd_kill() { # N
  local n="$1" pid; pid="$(cmd_pid "$n")"
  [ -n "$pid" ] || { log "node $n is not running"; return 1; }
  log "kill -9 $pid (cluster node $n)"
  as_root kill -9 "$pid"
  # Until its port closes the node is not yet gone.
  local i; for ((i = 0; i < 100; i++)); do port_open "$(node_port "$n")" || return 0; sleep 0.05; done
}

cmd_leader() { # QUEUE
  local q="$1" n
  for n in "${PW_CLUSTER_NODES[@]}"; do
    port_open "$(node_port "$n")" || continue
    ctl "$n" -q list_queues name leader --formatter json 2>/dev/null |
      python3 -c 'import json,sys; q=sys.argv[1]; print(next((r["leader"] for r in json.load(sys.stdin) if r["name"]==q), ""))' "$q" |
      sed -n 's/^pw\([0-9]\)@.*/\1/p'
    return
  done
  return 1
}

cmd_members() { # QUEUE: how many nodes hold a member of quorum queue Q
  local q="$1" n
  for n in "${PW_CLUSTER_NODES[@]}"; do
    port_open "$(node_port "$n")" || continue
    ctl "$n" -q list_queues name members --formatter json 2>/dev/null |
      python3 -c 'import json,sys; q=sys.argv[1]; print(next((len(r["members"]) for r in json.load(sys.stdin) if r["name"]==q), 0))' "$q"
    return
  done
  return 1
}

cmd_urls() { # USER PASSWORD
  local out=() n
  for n in "${PW_CLUSTER_NODES[@]}"; do out+=("amqp://$1:$2@127.0.0.1:$(node_port "$n")/%2f"); done
  (IFS=,; echo "${out[*]}")
}

cmd_reset() {
  cmd_stop
  for n in "${PW_CLUSTER_NODES[@]}"; do
    local pidfile; pidfile="$(node_dir "$n")/pid"
    [ -s "$pidfile" ] && as_root kill -9 "$(cat "$pidfile")" 2>/dev/null || true
  done
  as_root rm -rf "$PW_CLUSTER_DIR"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  what="${1:-start}"; shift || true
  case "$what" in
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    kill) cmd_kill "$@" ;;
    pid) cmd_pid "$@" ;;
    leader) cmd_leader "$@" ;;
    members) cmd_members "$@" ;;
    urls) cmd_urls "$@" ;;
    reset) cmd_reset ;;
    *) echo "usage: $0 start|stop [N…] | kill|pid N | leader|members QUEUE | urls USER PASSWORD | reset" >&2; exit 2 ;;
  esac
fi
