#!/usr/bin/env bash
# Benchmark: remapblk against qemu-storage-daemon (QSD), the same libblkio load generator
# (target/release/remapblk-bench, built from bench/) driving both, on fresh copies of the same
# 1 GiB image. B, the headline comparison, is QSD in its best configuration here: aio=io_uring
# on the file node, run both without and with an iothread for the export, the faster of the two
# per load (the table names which); QSD's default configuration (aio=threads, no iothread) is
# the second column, C. docs/benchmark.md explains the method and how to read the table.
#
# Usage: ci/bench.sh [--runs N] [--runtime S] [--ramp S] [--quick] [--only REGEX]
#                    [--engine E] [--poll-us N] [--poll-max-us N] [--self-check] [--help]
#
#   --runs N       measured runs per backend and load (default 5); the table shows medians
#   --runtime S    seconds measured per run (default 5), after --ramp S seconds (default 1)
#   --quick        smoke run: 1 run of 2 s after a 0.5 s ramp (overrides the three above)
#   --only REGEX   only the loads whose name, or one of whose rows' (poll0-...), matches (a bash
#                  regex, matched anywhere: anchor it, e.g. --only '^randread-4k-qd1$')
#   --engine E     pass `--engine E` to every remapblk serve except the null rows (which always
#                  use `--engine null`); also $REMAPBLK_ENGINE. Default: pass nothing
#   --poll-us N    the fixed busy-poll time of the poll-* rows (default 50)
#   --poll-max-us N  pass `--poll-max-us N` to every remapblk serve that polls adaptively (all
#                  but the poll-* and poll0-* rows): the cap to compare. Default: remapblk's own
#   --self-check   remapblk against remapblk on a few loads: the ratios should read about 1.0x
#   --base PATH    this build against the remapblk binary at PATH (another build: the last
#                  release, a commit before a change), both without polling (--poll-us 0 here,
#                  PATH with its own flags' defaults) on 4 KiB random reads and writes at QD 1
#                  and 32: what a change costs when none of its features is on
#
# Loads (name: what; remapblk runs with its defaults, so --poll-us auto, unless named):
#   randread-4k-qd{1,32,128}, randwrite-4k-qd{1,32,128}   4 KiB random, 1 queue
#   randread-4k-qd32-2q                                    4 KiB random read, 2 queues x QD 32
#   read-1M-qd8, write-1M-qd8                              1 MiB sequential, QD 8 (MB/s)
#   poll0-rand{read,write}-4k-qd{1,32}                     remapblk --poll-us 0 (no polling), a
#                                                          row of the load without poll0- (the
#                                                          same runs of QSD): the cost of
#                                                          polling in CPU time per request
#   poll-randread-4k-qd{1,32}, poll-randwrite-4k-qd32,     remapblk --poll-us N (a fixed window)
#   poll-randread-4k-qd32-2q                               vs QSD
#   null-randread-4k-qd32, null-randwrite-4k-qd32          remapblk --engine null vs QSD null-co
#                                                          (read-zeroes=off: QSD leaves read
#                                                          buffers as they are, remapblk zeroes
#                                                          them), QSD with and without an
#                                                          iothread; interleaved, see below;
#                                                          skipped when serve has no --engine
#   poll-null-randread-4k-qd32, poll-null-randwrite-...    the same with remapblk --poll-us N
#   remap10k-randread-4k-qd32                              remapblk with 10,000 scattered remaps
#                                                          vs remapblk with an empty table
#                                                          (interleaved, see below)
#   volatile-rand{write,read}-4k-qd32                      remapblk --cache-model volatile vs
#                                                          remapblk (A is the lab's mode)
#   writelog-rand{write,read}-4k-qd32                      remapblk --write-log vs remapblk
#   delay-randread-4k-qd32                                 remapblk with a 500 ms delay fault on
#                                                          one 4 KiB block (--faults) vs
#                                                          remapblk without (interleaved): a
#                                                          delay must stall only the request it
#                                                          hits (target: at least 0.9x)
#   log-replay                                             not a comparison: `remapblk log check
#                                                          --each flush -- true {}` of a log of
#                                                          2 s of 1 MiB writes (QD 8), in MB/s
#                                                          of log replayed (--runs times)
#   --self-check: selfcheck-{randread-4k-qd1,randread-4k-qd32,randwrite-4k-qd32,read-1M-qd8},
#   selfcheck-interleaved-randread-4k-qd32, selfcheck-null-{randread,randwrite}-4k-qd32
#
# Each run starts a fresh server (core 1) on fresh copies of a cached seed image
# (target/bench/seed.img), the load generator on core 0, every backend of the load once per
# run, the order reversed on every other run. Interleaved loads (remap10k, null-*,
# poll-null-*, selfcheck-interleaved-*, selfcheck-null-*) instead keep all their servers up and
# alternate 6 x --runs runs of 1 s between them. Output: a markdown table on stdout (medians,
# ratio A/B, the median and range of the per-run ratios, QSD's default configuration and A/C,
# server CPU time per request, server CPU, remapblk's peak RSS), every raw run in
# target/bench/results.json, progress on stderr. The machine is noisy: trust medians of several
# runs, not one.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "ci/bench.sh: $*" >&2; exit 1; }
bad_usage() { echo "ci/bench.sh: $*" >&2; echo "try ci/bench.sh --help" >&2; exit 2; }
log() { echo "[bench $(date +%T)] $*" >&2; }

RUNS=5 RUNTIME=5 RAMP=1 ONLY="" ENGINE="${REMAPBLK_ENGINE:-}" SELF_CHECK=0 POLL_US=50 BASE=""
POLL_MAX_US=""
while (($#)); do
    case "$1" in
        --runs) RUNS="${2:?--runs needs N}"; shift 2 ;;
        --runtime) RUNTIME="${2:?--runtime needs seconds}"; shift 2 ;;
        --ramp) RAMP="${2:?--ramp needs seconds}"; shift 2 ;;
        --quick) RUNS=1 RUNTIME=2 RAMP=0.5; shift ;;
        --only) ONLY="${2:?--only needs a pattern}"; shift 2 ;;
        --engine) ENGINE="${2:?--engine needs a name}"; shift 2 ;;
        --self-check) SELF_CHECK=1; shift ;;
        --base) BASE="${2:?--base needs the path of a remapblk binary}"; shift 2 ;;
        --poll-us) POLL_US="${2:?--poll-us needs microseconds}"; shift 2 ;;
        --poll-max-us) POLL_MAX_US="${2:?--poll-max-us needs microseconds}"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) bad_usage "unknown argument '$1'" ;;
    esac
done
[[ -z "$BASE" || -x "$BASE" ]] || bad_usage "--base $BASE is not an executable remapblk binary"
[[ "$RUNS" =~ ^[1-9][0-9]*$ ]] || bad_usage "--runs must be a positive integer, got '$RUNS'"
[[ "$POLL_US" =~ ^[0-9]+$ ]] || bad_usage "--poll-us must be a number of microseconds, got '$POLL_US'"
[[ -z "$POLL_MAX_US" || "$POLL_MAX_US" =~ ^[1-9][0-9]*$ ]] ||
    bad_usage "--poll-max-us must be a positive number of microseconds, got '$POLL_MAX_US'"

OUT=target/bench
RUN_DIR=$OUT/run
SEED=$OUT/seed.img
SEED_SIZE=$((1 << 30))
REMAPS=10000
REMAPBLK=target/release/remapblk
BENCH=target/release/remapblk-bench
RAW=$OUT/runs.jsonl
SERVER_PID=""
# Interleaved loads: runs per side (times --runs), and each run's length and ramp in seconds.
PAIRS_PER_RUN=6 PAIR_RUNTIME=1 PAIR_RAMP=0.2
# The servers of an interleaved load, by side, while it runs.
declare -A PAIR_PID=() PAIR_SOCK=() PAIR_DIR=()

log "building release binaries"
# Two builds: the daemon alone is built as `cargo build --release` builds it (without the load
# generator's dependencies in its feature set); the load generator, a workspace member, lands
# in the same target/release/.
cargo build --release -p remapblk >&2
cargo build --release -p remapblk-bench >&2
mkdir -p "$OUT"
rm -rf "$RUN_DIR"
: >"$RAW"

HAVE_ENGINE=0
"$REMAPBLK" serve --help | grep -q -- '--engine' && HAVE_ENGINE=1
if [[ -n "$ENGINE" && $HAVE_ENGINE == 0 ]]; then
    bad_usage "--engine $ENGINE given, but 'remapblk serve --help' has no --engine option"
fi

# name | rw | bs | iodepth | queues | A backend(s) | B backend | mode
# A: one backend, or several joined by '+': each after the first is a row of its own (named
# by ROW_PREFIX) measured in the same runs against the same B. B: qsd-best (QSD aio=io_uring
# without and with an iothread, the faster per row, plus QSD's default aio=threads as C),
# qsd-null-best (null-co without and with an iothread), or one backend.
if ((SELF_CHECK)); then
    LOADS=(
        "selfcheck-randread-4k-qd1|randread|4k|1|1|remapblk|remapblk"
        "selfcheck-randread-4k-qd32|randread|4k|32|1|remapblk|remapblk"
        "selfcheck-randwrite-4k-qd32|randwrite|4k|32|1|remapblk|remapblk"
        "selfcheck-read-1M-qd8|read|1M|8|1|remapblk|remapblk"
        "selfcheck-interleaved-randread-4k-qd32|randread|4k|32|1|remapblk|remapblk|interleaved"
        "selfcheck-null-randread-4k-qd32|randread|4k|32|1|remapblk-null|remapblk-null|interleaved"
        "selfcheck-null-randwrite-4k-qd32|randwrite|4k|32|1|remapblk-null|remapblk-null|interleaved"
    )
elif [[ -n "$BASE" ]]; then
    LOADS=(
        "base-randread-4k-qd1|randread|4k|1|1|remapblk-nopoll|remapblk-base"
        "base-randread-4k-qd32|randread|4k|32|1|remapblk-nopoll|remapblk-base"
        "base-randwrite-4k-qd1|randwrite|4k|1|1|remapblk-nopoll|remapblk-base"
        "base-randwrite-4k-qd32|randwrite|4k|32|1|remapblk-nopoll|remapblk-base"
    )
else
    LOADS=(
        "randread-4k-qd1|randread|4k|1|1|remapblk+remapblk-nopoll|qsd-best"
        "randread-4k-qd32|randread|4k|32|1|remapblk+remapblk-nopoll|qsd-best"
        "randread-4k-qd128|randread|4k|128|1|remapblk|qsd-best"
        "randwrite-4k-qd1|randwrite|4k|1|1|remapblk+remapblk-nopoll|qsd-best"
        "randwrite-4k-qd32|randwrite|4k|32|1|remapblk+remapblk-nopoll|qsd-best"
        "randwrite-4k-qd128|randwrite|4k|128|1|remapblk|qsd-best"
        "randread-4k-qd32-2q|randread|4k|32|2|remapblk|qsd-best"
        "read-1M-qd8|read|1M|8|1|remapblk|qsd-best"
        "write-1M-qd8|write|1M|8|1|remapblk|qsd-best"
        "poll-randread-4k-qd1|randread|4k|1|1|remapblk-poll|qsd-best"
        "poll-randread-4k-qd32|randread|4k|32|1|remapblk-poll|qsd-best"
        "poll-randwrite-4k-qd32|randwrite|4k|32|1|remapblk-poll|qsd-best"
        "poll-randread-4k-qd32-2q|randread|4k|32|2|remapblk-poll|qsd-best"
        "null-randread-4k-qd32|randread|4k|32|1|remapblk-null|qsd-null-best|interleaved"
        "null-randwrite-4k-qd32|randwrite|4k|32|1|remapblk-null|qsd-null-best|interleaved"
        "poll-null-randread-4k-qd32|randread|4k|32|1|remapblk-null-poll|qsd-null-best|interleaved"
        "poll-null-randwrite-4k-qd32|randwrite|4k|32|1|remapblk-null-poll|qsd-null-best|interleaved"
        "remap10k-randread-4k-qd32|randread|4k|32|1|remapblk-remap|remapblk-empty|interleaved"
        "volatile-randwrite-4k-qd32|randwrite|4k|32|1|remapblk-volatile|remapblk"
        "volatile-randread-4k-qd32|randread|4k|32|1|remapblk-volatile|remapblk"
        "writelog-randwrite-4k-qd32|randwrite|4k|32|1|remapblk-writelog|remapblk"
        "writelog-randread-4k-qd32|randread|4k|32|1|remapblk-writelog|remapblk"
        "delay-randread-4k-qd32|randread|4k|32|1|remapblk-delay|remapblk|interleaved"
        "log-replay|write|1M|8|1|remapblk-writelog|none|replay"
    )
fi
# The table row a backend of A after the first makes, by that backend's name prefix.
declare -A ROW_PREFIX=([remapblk-nopoll]=poll0-)

# row_names LOAD: the rows of LOAD's table (its name, then one per extra A backend).
row_names() {
    local name rw bs qd queues a _rest kind
    IFS='|' read -r name rw bs qd queues a _rest <<<"$1"
    echo "$name"
    IFS='+' read -ra kinds <<<"$a"
    for kind in "${kinds[@]:1}"; do echo "${ROW_PREFIX[$kind]:-$kind-}$name"; done
}

# sides LOAD: one line 'SIDE KIND' per backend the load runs: A (A2, A3, ... for extra A
# backends), B1, B2, ... for the candidates of B, C for QSD's default configuration.
sides() {
    local name rw bs qd queues a b _rest i=1 kind
    IFS='|' read -r name rw bs qd queues a b _rest <<<"$1"
    IFS='+' read -ra kinds <<<"$a"
    for kind in "${kinds[@]}"; do
        if ((i == 1)); then echo "A $kind"; else echo "A$i $kind"; fi
        i=$((i + 1))
    done
    case "$b" in
        qsd-best) echo "B1 qsd-uring"; echo "B2 qsd-uring-iot"; echo "C qsd" ;;
        qsd-null-best) echo "B1 qsd-null"; echo "B2 qsd-null-iot" ;;
        none) ;;
        *) echo "B $b" ;;
    esac
}

SELECTED=()
SKIPPED=()
for l in "${LOADS[@]}"; do
    name=${l%%|*}
    if [[ -n "$ONLY" && ! "$name" =~ $ONLY ]]; then
        # A load whose extra rows (poll0-...) match runs too, with those rows.
        matched=0
        for row in $(row_names "$l"); do [[ "$row" =~ $ONLY ]] && matched=1; done
        ((matched)) || continue
    fi
    if [[ "$l" == *remapblk-null* && $HAVE_ENGINE == 0 ]]; then
        SKIPPED+=("$name: skipped, 'remapblk serve --help' has no --engine (null engine not built in)")
        continue
    fi
    SELECTED+=("$l")
done
for s in ${SKIPPED[@]+"${SKIPPED[@]}"}; do log "$s"; done
((${#SELECTED[@]})) || die "no load left to run (--only '$ONLY')"

# --- servers ------------------------------------------------------------------------------

stop_server() {
    [[ -n "$SERVER_PID" ]] || return 0
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    local rc=0
    wait "$SERVER_PID" || rc=$?
    SERVER_PID=""
    ((rc == 0)) || log "warning: server exited with status $rc (log: $RUN_DIR/server.log)"
}

cleanup() {
    stop_server
    rm -rf "$RUN_DIR"
    stop_pair
}
trap cleanup EXIT

# wait_for PATH: polls until PATH is a socket, the server dies, or 30 s pass.
wait_for() {
    local path=$1 deadline=$((SECONDS + 30))
    until [[ -S "$path" ]]; do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            tail -n 30 "$RUN_DIR/server.log" >&2 || true
            die "server exited before $path appeared"
        fi
        ((SECONDS < deadline)) || die "timed out waiting for $path"
        sleep 0.02
    done
}

# fresh_copy SRC DST: a new copy of SRC, written back to disk so the copy's writeback does not
# run during the measurement.
fresh_copy() {
    cp "$1" "$2"
    sync "$2"
}

# image_for PATH: the image a remapblk server gets: a fresh copy of the seed, or with
# $SHARE_IMAGE set, a hard link to that file (the same page cache).
image_for() {
    if [[ -n "${SHARE_IMAGE:-}" ]]; then
        ln "$SHARE_IMAGE" "$1"
    else
        fresh_copy "$SEED" "$1"
    fi
}

# start_server KIND QUEUES: starts one backend on core 1 in a fresh $RUN_DIR; sets SERVER_PID
# and SOCK.
start_server() {
    local kind=$1 queues=$2
    rm -rf "$RUN_DIR"
    mkdir -p "$RUN_DIR"
    SOCK=$RUN_DIR/disk.sock
    local img=$RUN_DIR/disk.img
    local cmd engine=()
    [[ -n "$ENGINE" ]] && engine=(--engine "$ENGINE")
    case "$kind" in
        remapblk|remapblk-poll|remapblk-nopoll|remapblk-remap|remapblk-empty|remapblk-null|\
        remapblk-null-poll|remapblk-volatile|remapblk-writelog|remapblk-delay|remapblk-base)
            local bin=$REMAPBLK
            [[ $kind == remapblk-base ]] && bin=$BASE
            cmd=(taskset -c 1 "$bin" serve --image "$img" --socket "$SOCK"
                 --num-queues "$queues" --queue-size 1024)
            case "$kind" in
                remapblk|remapblk-base) image_for "$img" ;;
                remapblk-poll)
                    fresh_copy "$SEED" "$img"
                    cmd+=(--poll-us "$POLL_US") ;;
                remapblk-nopoll)
                    fresh_copy "$SEED" "$img"
                    cmd+=(--poll-us 0) ;;
                remapblk-volatile)
                    fresh_copy "$SEED" "$img"
                    cmd+=(--cache-model volatile) ;;
                remapblk-writelog)
                    fresh_copy "$SEED" "$img"
                    cmd+=(--write-log "$RUN_DIR/writes.log") ;;
                remapblk-delay)
                    # One 4 KiB block (8 sectors) in the middle of the disk answers reads
                    # 500 ms late; a random read hits it about once in 262,144.
                    image_for "$img"
                    printf '[{"op": "read", "lba": %d, "count": 8, "mode": "delay", "delay_ms": 500}]\n' \
                        $((SEED_SIZE / 512 / 2)) >"$RUN_DIR/faults.json"
                    cmd+=(--faults "$RUN_DIR/faults.json") ;;
                remapblk-remap|remapblk-empty)
                    image_for "$img"
                    fresh_copy "$OUT/${kind#remapblk-}.spare" "$RUN_DIR/disk.spare"
                    cmd+=(--spare "$RUN_DIR/disk.spare") ;;
                remapblk-null|remapblk-null-poll)
                    truncate -s "$SEED_SIZE" "$img"
                    engine=(--engine null)
                    if [[ $kind == *-poll ]]; then cmd+=(--poll-us "$POLL_US"); fi ;;
            esac
            cmd+=(${engine[@]+"${engine[@]}"})
            if [[ -n "$POLL_MAX_US" && $kind != *-poll && $kind != remapblk-nopoll &&
                  $kind != remapblk-base ]]; then
                cmd+=(--poll-max-us "$POLL_MAX_US")
            fi ;;
        qsd|qsd-uring|qsd-uring-iot|qsd-null|qsd-null-iot)
            # qsd: QSD's default (aio=threads, the export in the main loop); -uring: the file
            # node with aio=io_uring; -iot: the export in an iothread of its own.
            local node iothread=() export_iot=""
            case "$kind" in
                qsd|qsd-uring*)
                    fresh_copy "$SEED" "$img"
                    node="driver=file,node-name=disk,filename=$img,cache.direct=off"
                    [[ $kind == qsd-uring* ]] && node+=",aio=io_uring" ;;
                *) node="driver=null-co,node-name=disk,size=$SEED_SIZE,read-zeroes=off" ;;
            esac
            if [[ $kind == *-iot ]]; then
                iothread=(--object iothread,id=iot0)
                export_iot=",iothread=iot0"
            fi
            cmd=(taskset -c 1 qemu-storage-daemon ${iothread[@]+"${iothread[@]}"}
                 --blockdev "$node"
                 --export "type=vhost-user-blk,id=exp0,node-name=disk,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=$queues$export_iot") ;;
        *) die "unknown backend $kind" ;;
    esac
    "${cmd[@]}" >"$RUN_DIR/server.log" 2>&1 &
    SERVER_PID=$!
    wait_for "$SOCK"
}

peak_rss_kb() {
    awk '/^VmHWM:/ {print $2}' "/proc/$SERVER_PID/status"
}

# Busy CPU time of the whole machine (user, nice, system, irq, softirq) and of the server, in
# clock ticks: with the load generator's own CPU time they tell how much other processes ran.
machine_busy_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8}' /proc/stat; }
server_ticks() { awk '{print $14 + $15}' "/proc/$SERVER_PID/stat"; }
CLK_TCK=$(getconf CLK_TCK)

# side_backend LOAD SIDE: the backend kind of SIDE (A, A2, B1, C, ...) of LOAD.
side_backend() {
    sides "$1" | awk -v side="$2" '$1 == side {print $2}'
}

# side_order LOAD RUN: the load's sides, in reverse on every other run so that a drift of the
# machine hits them all alike.
side_order() {
    if (($2 % 2)); then sides "$1" | cut -d' ' -f1; else sides "$1" | cut -d' ' -f1 | tac; fi
}

# run_one LOAD SIDE RUN: one measured run on a server of its own; appends a JSON line to $RAW.
run_one() {
    local load=$1 side=$2 run=$3 name rw bs qd queues kind
    IFS='|' read -r name rw bs qd queues _ <<<"$load"
    kind=$(side_backend "$load" "$side")
    start_server "$kind" "$queues"
    measure "$load" "$side" "$run" "$kind" "$RUNTIME" "$RAMP" restart
    stop_server
    rm -rf "$RUN_DIR"
}

# start_pair LOAD: starts every side's server of an interleaved load, each in its own
# directory. Under a read load they read one fresh copy of the seed (two copies can differ by
# more than what is measured: how the page cache holds each), except a remapblk after the
# first: two remapblk processes may not open one image (it is locked), so they get a copy each.
start_pair() {
    local name rw bs qd queues side kind share=""
    IFS='|' read -r name rw bs qd queues _ <<<"$1"
    while read -r side kind; do
        local s=""
        [[ $kind != remapblk* ]] && s=$share
        RUN_DIR=$OUT/run-$side SHARE_IMAGE=$s start_server "$kind" "$queues"
        if [[ $rw == *read && -z "$share" && -f $OUT/run-$side/disk.img ]]; then
            share=$OUT/run-$side/disk.img
        fi
        PAIR_PID[$side]=$SERVER_PID PAIR_SOCK[$side]=$SOCK PAIR_DIR[$side]=$OUT/run-$side
        SERVER_PID=""
    done < <(sides "$1")
}

stop_pair() {
    local side
    for side in "${!PAIR_PID[@]}"; do
        SERVER_PID=${PAIR_PID[$side]} RUN_DIR=${PAIR_DIR[$side]} stop_server
        rm -rf "${PAIR_DIR[$side]}"
    done
    PAIR_PID=() PAIR_SOCK=() PAIR_DIR=()
}

# run_interleaved LOAD: every server up, the load generator alternating short runs.
run_interleaved() {
    local load=$1 run side kind
    start_pair "$load"
    for ((run = 1; run <= RUNS * PAIRS_PER_RUN; run++)); do
        for side in $(side_order "$load" "$run"); do
            kind=$(side_backend "$load" "$side")
            SERVER_PID=${PAIR_PID[$side]} SOCK=${PAIR_SOCK[$side]} RUN_DIR=${PAIR_DIR[$side]} \
                measure "$load" "$side" "$run" "$kind" "$PAIR_RUNTIME" "$PAIR_RAMP" interleaved
        done
    done
    stop_pair
}

# measure LOAD SIDE RUN KIND RUNTIME RAMP MODE: one run of the load generator against the
# server $SERVER_PID at $SOCK; appends a JSON line to $RAW. MODE: restart (a server per run)
# or interleaved.
measure() {
    local load=$1 side=$2 run=$3 kind=$4 runtime=$5 ramp=$6 mode=$7 name rw bs qd queues
    IFS='|' read -r name rw bs qd queues _ <<<"$load"
    local out rss busy0 busy1 srv0 srv1 t0 t1
    busy0=$(machine_busy_ticks) srv0=$(server_ticks) t0=$(date +%s.%N)
    if ! out=$(taskset -c 0 "$BENCH" --socket "$SOCK" --rw "$rw" --bs "$bs" --iodepth "$qd" \
        --queues "$queues" --runtime "$runtime" --ramp "$ramp" --seed "$run" --json); then
        tail -n 30 "$RUN_DIR/server.log" >&2 || true
        die "load generator failed: $name on $kind (run $run)"
    fi
    busy1=$(machine_busy_ticks) srv1=$(server_ticks) t1=$(date +%s.%N)
    rss=$(peak_rss_kb)
    python3 -c 'import json, sys
r = json.loads(sys.argv[1])
r.update(load=sys.argv[2], side=sys.argv[3], backend=sys.argv[4], run=int(sys.argv[5]),
         peak_rss_kb=int(sys.argv[6]), runtime_s=float(sys.argv[11]),
         ramp_s=float(sys.argv[12]), mode=sys.argv[13])
busy, srv, wall, tck = (float(sys.argv[7]), float(sys.argv[8]), float(sys.argv[9]),
                        float(sys.argv[10]))
r["server_cpu_s"] = round(srv / tck, 3)
# Server CPU time per request, in us: over the whole connection (ramp and drain included) and
# every request it completed. Clock ticks make it coarse: a 5 s run is timed to 10 ms.
r["server_cpu_us_per_io"] = round(srv / tck / r["ios_total"] * 1e6, 3) if r.get("ios_total") else None
# What neither the server nor the load generator used while the load ran, in % of one core.
r["others_cpu_pct"] = round(max(0.0, busy / tck - srv / tck - r["cpu_s"]) / wall * 100, 1)
print(json.dumps(r))
print("%s run %s %s %s: %.0f IOPS, %.1f MB/s, p50 %s us, p99 %s us, server CPU %s us/req, VmHWM %s kB, others %s%%"
      % (r["load"], r["run"], r["side"], r["backend"], r["iops"], r["mb_per_s"],
         r["lat_us"]["p50"], r["lat_us"]["p99"], r["server_cpu_us_per_io"], r["peak_rss_kb"],
         r["others_cpu_pct"]),
      file=sys.stderr)
' "$out" "$name" "$side" "$kind" "$run" "$rss" "$((busy1 - busy0))" "$((srv1 - srv0))" \
        "$(python3 -c "print($t1 - $t0)")" "$CLK_TCK" "$runtime" "$ramp" "$mode" >>"$RAW"
}

# --- inputs -------------------------------------------------------------------------------

START=$SECONDS
if [[ ! -f "$SEED" || $(stat -c %s "$SEED") != "$SEED_SIZE" ]]; then
    log "making the seed image $SEED (1 GiB of random data, cached for later runs)"
    head -c "$SEED_SIZE" /dev/urandom >"$SEED.tmp"
    mv "$SEED.tmp" "$SEED"
fi

REMAP_SECONDS=""
if printf '%s\n' "${SELECTED[@]}" | grep -q 'remapblk-remap'; then
    # One spare file with an empty table and one with $REMAPS remaps, made once per invocation
    # and copied for every run. The remaps are spread evenly over the disk.
    log "making the spare files: $REMAPS remaps through one 'remapblk ctl remap-add ... stride=N'"
    rm -rf "$RUN_DIR" && mkdir -p "$RUN_DIR"
    rm -f "$OUT/empty.spare" "$OUT/remap.spare"
    fresh_copy "$SEED" "$RUN_DIR/disk.img"
    SOCK=$RUN_DIR/disk.sock
    "$REMAPBLK" serve --image "$RUN_DIR/disk.img" --socket "$SOCK" \
        --spare "$RUN_DIR/disk.spare" >"$RUN_DIR/server.log" 2>&1 &
    SERVER_PID=$!
    wait_for "$SOCK.ctl"
    cp "$RUN_DIR/disk.spare" "$OUT/empty.spare"
    blocks=$((SEED_SIZE / 512))
    t0=$(date +%s.%N)
    "$REMAPBLK" ctl --control "$SOCK.ctl" remap-add lba=7 count="$REMAPS" \
        stride=$((blocks / REMAPS)) >/dev/null || die "remap-add of $REMAPS blocks failed"
    t1=$(date +%s.%N)
    REMAP_SECONDS=$(python3 -c "print(round($t1 - $t0, 2))")
    n=$("$REMAPBLK" ctl --control "$SOCK.ctl" query-status | python3 -c 'import json,sys; print(json.load(sys.stdin)["remaps"])')
    [[ $n == "$REMAPS" ]] || die "expected $REMAPS remaps, the server reports $n"
    stop_server
    cp "$RUN_DIR/disk.spare" "$OUT/remap.spare"
    rm -rf "$RUN_DIR"
    log "created $REMAPS remaps in $REMAP_SECONDS s"
fi

# run_replay LOAD: logs 2 s of the load with --write-log, then times `log check` replaying the
# whole log onto a fresh copy of the seed (its one point: the server's exit flush), --runs
# times; appends {"load", "run", "log_bytes", "seconds", "mb_per_s"} lines to $REPLAY_RAW.
run_replay() {
    local load=$1 name rw bs qd queues run out entries bytes t0 t1
    IFS='|' read -r name rw bs qd queues _ <<<"$load"
    for ((run = 1; run <= RUNS; run++)); do
        start_server remapblk-writelog "$queues"
        taskset -c 0 "$BENCH" --socket "$SOCK" --rw "$rw" --bs "$bs" --iodepth "$qd" \
            --queues "$queues" --runtime 2 --ramp 0 --seed "$run" --json >/dev/null ||
            die "load generator failed: $name (run $run)"
        stop_server
        fresh_copy "$SEED" "$RUN_DIR/base.img"
        bytes=$(stat -c %s "$RUN_DIR/writes.log")
        sync "$RUN_DIR/writes.log"
        t0=$(date +%s.%N)
        "$REMAPBLK" log check "$RUN_DIR/writes.log" --base "$RUN_DIR/base.img" --each flush \
            -- true {} >/dev/null || die "log check of the benchmark's log failed (run $run)"
        t1=$(date +%s.%N)
        python3 -c 'import json, sys
b, t = int(sys.argv[3]), float(sys.argv[5]) - float(sys.argv[4])
print(json.dumps({"load": sys.argv[1], "run": int(sys.argv[2]), "log_bytes": b,
                  "seconds": round(t, 3), "mb_per_s": round(b / t / 1e6, 1)}))
print(f"{sys.argv[1]} run {sys.argv[2]}: {b / 1e6:.0f} MB of log replayed in {t:.2f} s,"
      f" {b / t / 1e6:.0f} MB/s", file=sys.stderr)' "$name" "$run" "$bytes" "$t0" "$t1" >>"$REPLAY_RAW"
        rm -rf "$RUN_DIR"
    done
}

# --- runs ---------------------------------------------------------------------------------

REPLAY_RAW=$OUT/replay.jsonl
: >"$REPLAY_RAW"
for load in "${SELECTED[@]}"; do
    if [[ $load == *"|replay" ]]; then
        run_replay "$load"
        continue
    fi
    if [[ $load == *"|interleaved" ]]; then
        run_interleaved "$load"
        continue
    fi
    for ((run = 1; run <= RUNS; run++)); do
        for side in $(side_order "$load" "$run"); do
            run_one "$load" "$side" "$run"
        done
    done
done
ELAPSED=$((SECONDS - START))

# --- summary ------------------------------------------------------------------------------

META=$(python3 -c 'import json,sys; print(json.dumps(dict(zip(sys.argv[1::2], sys.argv[2::2]))))' \
    runs "$RUNS" runtime_s "$RUNTIME" ramp_s "$RAMP" engine "${ENGINE:-default}" \
    poll_max_us "${POLL_MAX_US:-default}" \
    self_check "$SELF_CHECK" remaps "$REMAPS" remap_create_s "$REMAP_SECONDS" \
    pair_runtime_s "$PAIR_RUNTIME" pair_ramp_s "$PAIR_RAMP" \
    elapsed_s "$ELAPSED" commit "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    kernel "$(uname -r)" qsd "$(qemu-storage-daemon --version | head -n1)" \
    date "$(date -Is)")
SKIPPED_JSON=$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1:]))' ${SKIPPED[@]+"${SKIPPED[@]}"})
# The table's rows, in order: row name, load, and the side of A it shows.
ROWS=$(for l in "${SELECTED[@]}"; do
    [[ $l == *"|replay" ]] && continue
    paste -d' ' <(row_names "$l") <(sides "$l" | awk '$1 ~ /^A/ {print $1}') |
        awk -v load="${l%%|*}" '{print $1, load, $2}'
done | python3 -c 'import json,sys; print(json.dumps([l.split() for l in sys.stdin.read().splitlines()]))')

python3 - "$RAW" "$OUT/results.json" "$META" "$SKIPPED_JSON" "$ROWS" "$REPLAY_RAW" <<'EOF'
import json, statistics, sys

raw_path, out_path, meta, skipped, rows, replay_path = sys.argv[1:]
runs = [json.loads(l) for l in open(raw_path) if l.strip()]
replays = [json.loads(l) for l in open(replay_path) if l.strip()]
meta, skipped, rows = json.loads(meta), json.loads(skipped), json.loads(rows)
label = {"remapblk": "remapblk", "qsd": "qsd aio=threads (default)",
         "qsd-uring": "qsd aio=io_uring", "qsd-uring-iot": "qsd aio=io_uring + iothread",
         "remapblk-null": "remapblk null", "qsd-null": "qsd null-co",
         "qsd-null-iot": "qsd null-co + iothread", "remapblk-remap": "remapblk 10k remaps",
         "remapblk-empty": "remapblk empty table", "remapblk-poll": "remapblk --poll-us",
         "remapblk-nopoll": "remapblk --poll-us 0", "remapblk-base": "remapblk --base",
         "remapblk-null-poll": "remapblk null --poll-us",
         "remapblk-volatile": "remapblk --cache-model volatile",
         "remapblk-writelog": "remapblk --write-log",
         "remapblk-delay": "remapblk, a 500 ms delay on one 4 KiB block"}
# QSD's default configuration, where B is QSD: the file node's aio=threads, null-co as is.
DEFAULTS = ("qsd", "qsd-null")

summary = []
for row, load, a_side in rows:
    rs = [r for r in runs if r["load"] == load]
    a = [r for r in rs if r["side"] == a_side]
    # Large sequential requests are about bandwidth, the rest about requests per second.
    metric = "mb_per_s" if a[0]["bs"] >= (1 << 20) else "iops"
    med = lambda side, key: statistics.median(r[key] for r in side)
    of_side = lambda side: [r for r in rs if r["side"] == side]
    # B: the faster of its candidates (B1, B2: QSD without and with an iothread), by median.
    cands = sorted({r["side"] for r in rs if r["side"].startswith("B")})
    b_side = max(cands, key=lambda c: med(of_side(c), metric))
    b = of_side(b_side)
    c = next(([r for r in rs if r["backend"] == d] for d in DEFAULTS
              if any(r["backend"] == d for r in rs)), [])
    cpu = lambda side: (statistics.median(r["server_cpu_us_per_io"] for r in side
                                          if r.get("server_cpu_us_per_io") is not None)
                        if any(r.get("server_cpu_us_per_io") is not None for r in side)
                        else None)
    ma, mb = med(a, metric), med(b, metric)
    mc = med(c, metric) if c else None
    b_of_run = {r["run"]: r[metric] for r in b}
    paired = [r[metric] / b_of_run[r["run"]] for r in a if b_of_run.get(r["run"])]
    summary.append({
        "load": row, "metric": metric, "a_side": a_side, "b_side": b_side,
        "b_candidates": {of_side(x)[0]["backend"]: med(of_side(x), metric) for x in cands},
        "c": c[0]["backend"] if c else None, "c_median": mc,
        "ratio_c": ma / mc if mc else None,
        "c_runs": [r[metric] for r in c],
        "a_cpu_us_per_io": cpu(a), "b_cpu_us_per_io": cpu(b),
        "c_cpu_us_per_io": cpu(c) if c else None,
        "a": a[0]["backend"], "b": b[0]["backend"],
        "a_median": ma, "b_median": mb, "ratio": ma / mb if mb else None,
        "a_p99_us_median": statistics.median(r["lat_us"]["p99"] for r in a),
        "b_p99_us_median": statistics.median(r["lat_us"]["p99"] for r in b),
        "a_peak_rss_kb_max": max(r["peak_rss_kb"] for r in a),
        # Server CPU time per measured second, in % of one core (ramp included in both).
        "a_server_cpu_pct": statistics.median(r["server_cpu_s"] / (r["runtime_s"] + r["ramp_s"])
                                              for r in a) * 100,
        "b_server_cpu_pct": statistics.median(r["server_cpu_s"] / (r["runtime_s"] + r["ramp_s"])
                                              for r in b) * 100,
        "interleaved": a[0]["mode"] == "interleaved",
        "b_peak_rss_kb_max": max(r["peak_rss_kb"] for r in b),
        "a_runs": [r[metric] for r in a], "b_runs": [r[metric] for r in b],
        # A and B of the same run number ran back to back, so their ratio is spared most of
        # the machine's drift between runs.
        "paired_ratios": paired,
        "paired_ratio_median": statistics.median(paired) if paired else None,
    })

json.dump({"meta": meta, "skipped": skipped, "summary": summary, "runs": runs,
           "replays": replays},
          open(out_path, "w"), indent=1)

fmt = lambda s, v: f"{v:,.0f} IOPS" if s["metric"] == "iops" else f"{v:,.1f} MB/s"
print(f"Medians of {meta['runs']} run(s) of {meta['runtime_s']} s each; A = remapblk"
      f" (engine: {meta['engine']}, --poll-max-us: {meta.get('poll_max_us', 'default')}; its"
      f" defaults, so --poll-us auto, unless the row says), B ="
      f" QSD's best configuration here (the faster of aio=io_uring without and with an iothread,"
      f" named), C = QSD's default configuration; ratio = A / B; paired = median of the per-run"
      f" ratios (A and B of one run ran close together), with their range; CPU per request = server"
      f" CPU time over the connection / requests completed, in us; p99 latency in us.\n")
print("| load | remapblk (A) | B | B median | A/B | paired | C median | A/C | CPU us/req A / B / C | p99 A / B | server CPU A / B | remapblk peak RSS |")
print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
num = lambda v, f: "n/a" if v is None else format(v, f)
for s in summary:
    ratio = f"{s['ratio']:.2f}x" if s["ratio"] is not None else "n/a"
    pr = s["paired_ratios"]
    paired = (f"{s['paired_ratio_median']:.2f}x ({min(pr):.2f}-{max(pr):.2f})" if pr else "n/a")
    c_med = fmt(s, s["c_median"]) if s["c_median"] is not None else "n/a"
    ratio_c = f"{s['ratio_c']:.2f}x" if s["ratio_c"] is not None else "n/a"
    cpu = " / ".join(num(s[k], ".2f") for k in ("a_cpu_us_per_io", "b_cpu_us_per_io")) + (
        " / " + num(s["c_cpu_us_per_io"], ".2f") if s["c"] else "")
    print(f"| {s['load']} | {fmt(s, s['a_median'])} | {label.get(s['b'], s['b'])} | "
          f"{fmt(s, s['b_median'])} | {ratio} | {paired} | {c_med} | {ratio_c} | {cpu} | "
          f"{s['a_p99_us_median']:g} / {s['b_p99_us_median']:g} | "
          f"{s['a_server_cpu_pct']:.0f}% / {s['b_server_cpu_pct']:.0f}% | "
          f"{s['a_peak_rss_kb_max'] / 1024:.1f} MiB |")
for s in skipped:
    print(f"| {s.split(':')[0]} | skipped | | | | | | | | | | |")
cands = [s for s in summary if len(s["b_candidates"]) > 1]
if cands:
    print("\nB's candidates (medians): " + "; ".join(
        s["load"] + ": " + ", ".join(f"{label.get(k, k)} {fmt(s, v)}"
                                     for k, v in s["b_candidates"].items())
        for s in cands) + ".")
if skipped:
    print()
    for s in skipped:
        print(f"- {s}")
for s in summary:
    if s["interleaved"]:
        print(f"\n{s['load']}: interleaved, every server of the load up at once, the load"
              f" generator alternating {len(s['a_runs'])} runs each of {meta['pair_runtime_s']} s"
              f" (after a {meta['pair_ramp_s']} s ramp) between them; medians and paired ratios"
              f" of those runs.")
if meta["remap_create_s"]:
    print(f"\nCreating {meta['remaps']} remaps (one remapblk ctl remap-add with stride): "
          f"{meta['remap_create_s']} s.")
if replays:
    rates = [r["mb_per_s"] for r in replays]
    print(f"\nlog-replay: `remapblk log check --each flush` replays a write log (2 s of 1 MiB"
          f" writes, median {statistics.median(r['log_bytes'] for r in replays) / 1e6:,.0f} MB)"
          f" at a median {statistics.median(rates):,.0f} MB/s ({min(rates):,.0f} to"
          f" {max(rates):,.0f}, {len(rates)} runs).")
others = sorted(r["others_cpu_pct"] for r in runs) or [0.0]
print(f"\nCPU busy outside the server and the load generator (other processes, kernel work such"
      f" as writeback) per run: median {statistics.median(others):g}% of a core, max"
      f" {others[-1]:g}% (others_cpu_pct in the JSON; a high value marks a disturbed run).")
print(f"\nTotal time {meta['elapsed_s']} s; raw runs in {out_path}.")
EOF
