#!/usr/bin/env bash
# Where the gateway's CPU goes under the throughput load, per frame sent.
#
#   bench/profile.sh                 # 1,000 clients x 50, 100k ticks/s, JSON frames
#   bench/profile.sh fastfeed_bin    # the same with the binary subprotocol
#
# Runs the throughput scenario with a long measured phase, samples the
# server process with `perf record` in the middle of it, and
# prints the share of samples by shared object (kernel, libpython, the core,
# picows, uvloop) and the top symbols. Needs `perf` (Debian: linux-perf) and
# root or kernel.perf_event_paranoid <= 1. Output: bench/results/profile-*/.
set -euo pipefail
cd "$(dirname "$0")/.."
server="${1:-fastfeed}"
py="${PYTHON:-python}"
out="bench/results/profile-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out"
"$py" -m bench --servers "$server" --scenarios throughput --set throughput.measure=25 \
      --out "$out" > "$out/bench.md" 2> "$out/bench.log" &
bench=$!
# seed, connect 1,000 clients, 2 s warm-up: then sample 10 s of the measured phase
for _ in $(seq 120); do
    grep -q "throughput $server: 1000/1000 connected" "$out/bench.log" 2>/dev/null && break
    sleep 1
done
sleep 6
pid=$(pgrep -n -f "serve --host 127.0.0.1 --port")
perf record -p "$pid" -F 2000 -o "$out/perf.data" -- sleep 10 2> "$out/perf.log"
wait "$bench"
{
    echo "## samples by shared object (the server process, 10 s)"
    perf report -i "$out/perf.data" --sort dso --stdio 2>/dev/null | grep -v '^#' | grep -v '^$' | head -15
    echo
    echo "## top symbols"
    perf report -i "$out/perf.data" --sort dso,sym --stdio 2>/dev/null | grep -v '^#' | grep -v '^$' | head -40
} | tee "$out/profile.txt"
cat "$out/bench.md" | grep -A4 "^| server"
echo "results in $out"
