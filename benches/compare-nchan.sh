#!/usr/bin/env bash
# progressd side by side with Nchan (nginx's pub/sub module, memory store), in one run.
#
#   benches/compare-nchan.sh [--quick] [--out FILE]
#
# Installs Debian's nginx and libnginx-mod-nchan if missing, builds progressd (release),
# starts Nchan with a 1,000-message buffer and progressd with its defaults (`sync`
# durability), runs the same `progressd bench` scenarios against both, and writes a Markdown
# table of each figure with the ratio progressd/Nchan (default benches/results/nchan-DATE.md).
# The load generator shares the machine with the servers: compare the ratios of one run,
# never absolute figures across runs. --quick shrinks every scenario (a smoke of the script).
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
out=""
while (($#)); do
    case "$1" in
        --quick) quick=1 ;;
        --out) out="$2"; shift ;;
        *) echo "usage: $0 [--quick] [--out FILE]" >&2; exit 2 ;;
    esac
    shift
done
date_tag=$(date -u +%Y-%m-%d)
out=${out:-benches/results/nchan-$date_tag.md}
mkdir -p "$(dirname "$out")"

if ! [ -e /usr/lib/nginx/modules/ngx_nchan_module.so ] || ! command -v nginx >/dev/null; then
    echo "== installing nginx and libnginx-mod-nchan"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx libnginx-mod-nchan >/dev/null
fi
echo "== cargo build --release"
cargo build --release --quiet
bin=$PWD/target/release/progressd

# Both servers and the generator get the whole (hard) descriptor limit: 10,000 connections
# are one descriptor each on either side.
ulimit -n "$(ulimit -Hn)"

work=$(mktemp -d /tmp/compare-nchan.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# --- Nchan: two workers (the machine's cores), memory store, 1,000 messages per channel.
mkdir -p "$work/nginx/logs"
cat >"$work/nginx/nginx.conf" <<EOF
load_module /usr/lib/nginx/modules/ngx_nchan_module.so;
daemon off;
worker_processes auto;
worker_rlimit_nofile $(ulimit -Hn);
pid $work/nginx/nginx.pid;
error_log $work/nginx/logs/error.log warn;
events { worker_connections 20000; multi_accept on; }
http {
    access_log off;
    keepalive_requests 1000000;
    nchan_message_buffer_length 1000;
    nchan_message_timeout 1h;
    server {
        listen 127.0.0.1:7800 backlog=4096;
        location ~ ^/pub/(.+)\$ { nchan_publisher; nchan_channel_id \$1; }
        location ~ ^/sub/(.+)\$ { nchan_subscriber eventsource; nchan_channel_id \$1; }
    }
}
EOF
nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" &
pids+=($!)
nginx_master=$!

# --- progressd: defaults (sync), and a second one in relaxed durability.
"$bin" serve --listen 127.0.0.1:7700 --data-dir "$work/progressd-sync" 2>"$work/sync.log" &
pids+=($!)
sync_pid=$!
"$bin" serve --listen 127.0.0.1:7701 --data-dir "$work/progressd-relaxed" --durability relaxed \
    2>"$work/relaxed.log" &
pids+=($!)
relaxed_pid=$!

# wait_ready CURL-ARGS…: until the request succeeds (connections are refused until bound).
wait_ready() {
    for _ in $(seq 1 200); do
        curl -sf -o /dev/null -m 1 "$@" && return 0
        sleep 0.05
    done
    echo "not ready: $*" >&2
    exit 1
}
wait_ready -X POST -d ready http://127.0.0.1:7800/pub/ready-probe
wait_ready http://127.0.0.1:7700/readyz
wait_ready http://127.0.0.1:7701/readyz
nginx_pids=$(pgrep -d, -P "$nginx_master" || true)
nginx_pids="$nginx_master${nginx_pids:+,$nginx_pids}"

progressd_args=(--url http://127.0.0.1:7700)
relaxed_args=(--url http://127.0.0.1:7701 --pid "$relaxed_pid")
nchan_args=(--url http://127.0.0.1:7800 --publish-url '{url}/pub/{job}' --subscribe-url '{url}/sub/{job}'
    --body raw --pid "$nginx_pids")

if ((quick)); then
    D=2s; S1=100; S10=500; SI=500; SR=500; JR=5; E=20000; J=200
else
    D=10s; S1=1000; S10=10000; SI=10000; SR=10000; JR=100; E=1000000; J=10000
fi

results=$work/results.jsonl
: >"$results"
# bench LABEL SERVER ARGS…: one scenario against one server, its JSON report kept.
bench() {
    local label=$1 server=$2
    shift 2
    echo "== $label: $server" >&2
    local report
    report=$("$bin" bench "$@" --json) || true
    [ -n "$report" ] || report='{"results":{},"correct":false}'
    echo "$report" | python3 -c 'import json,sys; r=json.load(sys.stdin); r["label"]=sys.argv[1]; r["server"]=sys.argv[2]; print(json.dumps(r))' "$label" "$server" >>"$results"
    echo "$report" >&2
}

# Idle first, on fresh servers: after the other scenarios a daemon reuses memory they freed,
# and the growth per connection would read far too low.
bench "idle, $SI SSE conns" progressd idle -s $SI -t 3s "${progressd_args[@]}" --pid $sync_pid
bench "idle, $SI SSE conns" nchan idle -s $SI -t 3s "${nchan_args[@]}"
bench "publish, 16 conns, single, sync" progressd publish -c 16 -d $D "${progressd_args[@]}" --pid $sync_pid
bench "publish, 16 conns, single, sync" nchan publish -c 16 -d $D "${nchan_args[@]}"
bench "publish, 16 conns, single, relaxed" progressd publish -c 16 -d $D "${relaxed_args[@]}"
bench "publish, 16 conns, single, relaxed" nchan publish -c 16 -d $D "${nchan_args[@]}"
bench "publish, 16 conns, batches of 100, sync" progressd publish -c 16 -b 100 -d $D "${progressd_args[@]}" --pid $sync_pid
bench "fanout, $S1 SSE subs, 1 job, 50/s" progressd fanout -s $S1 -r 50 -d $D "${progressd_args[@]}" --pid $sync_pid
bench "fanout, $S1 SSE subs, 1 job, 50/s" nchan fanout -s $S1 -r 50 -d $D "${nchan_args[@]}"
bench "fanout, $S10 SSE subs, 1 job, 10/s" progressd fanout -s $S10 -r 10 -d $D --grace 20s "${progressd_args[@]}" --pid $sync_pid
bench "fanout, $S10 SSE subs, 1 job, 10/s" nchan fanout -s $S10 -r 10 -d $D --grace 20s "${nchan_args[@]}"
# With one parsing thread the generator is the bottleneck at 100,000 deliveries/s (our frames
# carry the whole event, about five times Nchan's raw payload): the same with two. The resume
# storm too (a million replayed events to parse).
bench "fanout, $S10 SSE subs, 1 job, 10/s, 2 generator threads" progressd fanout -s $S10 -r 10 -d $D --grace 20s --threads 2 "${progressd_args[@]}" --pid $sync_pid
bench "fanout, $S10 SSE subs, 1 job, 10/s, 2 generator threads" nchan fanout -s $S10 -r 10 -d $D --grace 20s --threads 2 "${nchan_args[@]}"
bench "resume storm, $SR subs, 100 behind" progressd resume-storm -s $SR -j $JR -n 100 "${progressd_args[@]}" --pid $sync_pid
bench "resume storm, $SR subs, 100 behind" nchan resume-storm -s $SR -j $JR -n 100 "${nchan_args[@]}"
bench "resume storm, $SR subs, 100 behind, 2 generator threads" progressd resume-storm -s $SR -j $JR -n 100 --threads 2 "${progressd_args[@]}" --pid $sync_pid
bench "resume storm, $SR subs, 100 behind, 2 generator threads" nchan resume-storm -s $SR -j $JR -n 100 --threads 2 "${nchan_args[@]}"
bench "startup, $E events over $J jobs" progressd startup -e $E -j $J --data-dir "$work/startup"

python3 - "$results" "$out" "$date_tag" "$quick" <<'EOF'
import json, sys, platform, os
path, out, date, quick = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
rows = [json.loads(l) for l in open(path)]
# The figures each scenario is judged by, and whether higher is better.
wanted = {
    "publish": [("events_per_s", "events/s", True), ("post_p99_ms", "POST p99 ms", False)],
    "fanout": [("latency_p99_ms", "delivery p99 ms", False), ("latency_max_ms", "delivery max ms", False),
               ("delivered", "delivered", True), ("expected", "expected", True),
               ("post_p99_ms", "POST p99 ms", False), ("publish_rate", "publish rate/s", True),
               ("server_cpu_ms_per_1000_deliveries", "server CPU ms / 1000 deliveries", False)],
    "idle": [("server_rss_per_connection_kib", "server RSS KiB / connection", False), ("open", "open", True)],
    "resume-storm": [("all_caught_up_ms", "all caught up ms", False), ("gaps", "gaps", False),
                     ("duplicates", "duplicates", False), ("resets", "resets", False),
                     ("server_cpu_s", "server CPU s during the storm", False)],
    "startup": [("ready_ms", "ready ms", False), ("rss_at_ready_kib", "RSS at ready KiB", False),
                ("disk_bytes", "disk bytes", False)],
}
by = {}
for r in rows:
    by.setdefault(r["label"], {})[r["server"]] = r
def fmt(v):
    if v is None: return "–"
    if isinstance(v, float): return f"{v:,.2f}" if v < 100 else f"{v:,.0f}"
    return f"{v:,}"
cpu = os.cpu_count()
lines = [f"Measured {date} on {platform.node()} ({cpu} cores), progressd and Nchan "
         f"(nginx {os.popen('nginx -v 2>&1').read().strip().split('/')[-1]}, libnginx-mod-nchan) on loopback, "
         f"load generator `progressd bench` on the same cores{' (--quick)' if quick else ''}. "
         "Command: `benches/compare-nchan.sh`.", "",
         "| scenario | figure | progressd | Nchan | progressd/Nchan | correct (p / n) |", "|---|---|---|---|---|---|"]
for label, servers in by.items():
    p, n = servers.get("progressd"), servers.get("nchan")
    scenario = (p or n)["scenario"] if (p or n) and "scenario" in (p or n) else label.split(",")[0]
    for key, name, _ in wanted.get(scenario, []):
        pv = p["results"].get(key) if p else None
        nv = n["results"].get(key) if n else None
        ratio = f"{pv / nv:.2f}" if isinstance(pv, (int, float)) and isinstance(nv, (int, float)) and nv else "–"
        ok = f"{'yes' if p and p.get('correct') else 'no' if p else '–'} / {'yes' if n and n.get('correct') else 'no' if n else '–'}"
        lines.append(f"| {label} | {name} | {fmt(pv)} | {fmt(nv)} | {ratio} | {ok} |")
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
echo "== written to $out"
