#!/usr/bin/env bash
# Starts the ranks of one gtopk job, locally or over ssh, with torchrun's environment variables.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/launch.sh [-n N] [-H HOSTFILE] [-a ADDR] [-p PORT] [--grace S] -- COMMAND [ARGS...]

Starts the ranks of one gtopk job. Each gets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT (torchrun's variables, which gtopk reads); local ranks also get RAYON_NUM_THREADS
(cores / ranks on this host) unless it is already set.

  -n N             number of ranks (default: every slot of HOSTFILE, else 1)
  -H HOSTFILE      run across hosts over ssh: one host per line, optionally "slots=K" (default 1);
                   ranks fill the slots in file order; "localhost" runs without ssh; '#' comments
  -a ADDR          MASTER_ADDR, the host of rank 0 (default: 127.0.0.1, or HOSTFILE's first host)
  -p PORT          MASTER_PORT (default: $MASTER_PORT, else 29500)
  --grace S        seconds the ranks get between SIGTERM and SIGKILL when stopped (default 5)
  -h, --help       this text

Every output line is prefixed with "[rank R] ". When a rank exits non-zero the others are stopped
and the script exits with that rank's status. SIGINT, SIGTERM and SIGHUP are passed to every rank.
Remote ranks start in the same directory as here, so the binary and configs must be at the same
paths on every host (a shared file system, or a copy).

Examples:
  scripts/launch.sh -n 4 -- target/release/gtopk train configs/quickstart.toml --set dist.backend=tcp
  scripts/launch.sh -H hosts.txt -p 29511 -- target/release/gtopk train configs/resnet20.toml --set dist.backend=tcp
EOF
}

die() {
    echo "launch.sh: $*" >&2
    exit 2
}
exec 3>&2

nranks=""
hostfile=""
master_addr=""
master_port="${MASTER_PORT:-29500}"
grace=5
while (($# > 0)); do
    case "$1" in
        -n) nranks="${2:-}"; shift 2 || die "-n needs a number" ;;
        -H) hostfile="${2:-}"; shift 2 || die "-H needs a file" ;;
        -a) master_addr="${2:-}"; shift 2 || die "-a needs an address" ;;
        -p) master_port="${2:-}"; shift 2 || die "-p needs a port" ;;
        --grace) grace="${2:-}"; shift 2 || die "--grace needs seconds" ;;
        -h | --help) usage; exit 0 ;;
        --) shift; break ;;
        *) die "unknown option '$1' (see --help; the command goes after --)" ;;
    esac
done
(($# > 0)) || die "no command given (see --help)"
[[ -z $nranks || $nranks =~ ^[1-9][0-9]*$ ]] || die "-n $nranks: expected a positive number"
[[ $master_port =~ ^[0-9]+$ ]] && ((master_port >= 1 && master_port <= 65535)) \
    || die "port '$master_port' is not a port number (1-65535)"
[[ $grace =~ ^[0-9]+$ ]] || die "--grace $grace: expected whole seconds"

is_local() { [[ $1 == localhost || $1 == 127.0.0.1 || $1 == ::1 ]]; }

# One entry per rank: the host it runs on and its index among that host's ranks.
hosts=()
local_ranks=()
if [[ -n $hostfile ]]; then
    [[ -r $hostfile ]] || die "cannot read host file '$hostfile'"
    lineno=0
    declare -A next_local=()
    while IFS= read -r line || [[ -n $line ]]; do
        lineno=$((lineno + 1))
        line="${line%%#*}"
        read -r host rest <<<"$line" || true
        [[ -n ${host:-} ]] || continue
        slots=1
        if [[ -n ${rest:-} ]]; then
            [[ $rest =~ ^slots=([1-9][0-9]*)$ ]] \
                || die "$hostfile:$lineno: expected 'HOST' or 'HOST slots=K', got '$line'"
            slots="${BASH_REMATCH[1]}"
        fi
        for ((k = 0; k < slots; k++)); do
            hosts+=("$host")
            local_ranks+=("${next_local[$host]:-0}")
            next_local[$host]=$((${next_local[$host]:-0} + 1))
        done
    done <"$hostfile"
    ((${#hosts[@]} > 0)) || die "host file '$hostfile' names no host"
    if [[ -n $nranks ]]; then
        ((nranks <= ${#hosts[@]})) || die "-n $nranks but '$hostfile' has only ${#hosts[@]} slots"
        hosts=("${hosts[@]:0:nranks}")
        local_ranks=("${local_ranks[@]:0:nranks}")
    fi
    master_addr="${master_addr:-${hosts[0]}}"
    if is_local "$master_addr"; then
        for h in "${hosts[@]}"; do
            is_local "$h" || die "MASTER_ADDR $master_addr is not reachable from $h: pass -a with rank 0's address"
        done
    fi
else
    for ((r = 0; r < ${nranks:-1}; r++)); do
        hosts+=(localhost)
        local_ranks+=("$r")
    done
    master_addr="${master_addr:-127.0.0.1}"
fi
world=${#hosts[@]}

declare -A per_host=()
for h in "${hosts[@]}"; do
    per_host[$h]=$((${per_host[$h]:-0} + 1))
done
cores=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)

pids=() # one per rank: a subshell leading the rank's own process group (set -m below)

# True while any process of rank group $1 is left (the subshell may be gone before its command).
group_alive() { kill -0 -- "-$1" 2>/dev/null; }

# Sends $1 to every rank, then SIGKILL to whatever is left after the grace time.
stop_ranks() {
    local sig=$1 pid waited=0 any
    for pid in "${pids[@]}"; do
        kill -"$sig" -- "-$pid" 2>/dev/null || true
    done
    while ((waited < grace * 10)); do
        any=0
        for pid in "${pids[@]}"; do
            if group_alive "$pid"; then any=1; fi
        done
        ((any)) || break
        sleep 0.1
        waited=$((waited + 1))
    done
    for pid in "${pids[@]}"; do
        kill -KILL -- "-$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
}

on_signal() {
    echo "launch.sh: got SIG$1, stopping all ranks" >&3
    stop_ranks "$1"
    exit "$2"
}
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM
trap 'on_signal HUP 129' HUP

# Prefixes each line with the rank. It ignores the signals meant for the rank, so whatever the rank
# prints while shutting down still comes through (and it never dies of SIGPIPE for lack of a reader).
prefix() {
    trap '' INT TERM HUP
    exec awk -v p="[rank $1] " '{ sub(/\r$/, ""); print p $0; fflush() }'
}

# Each rank gets its own process group, so stopping a rank also stops what it started, and a
# terminal's Ctrl-C reaches only this script, which passes it on (background jobs of a script
# without job control would ignore SIGINT).
set -m
for ((r = 0; r < world; r++)); do
    host="${hosts[r]}"
    vars=(RANK="$r" WORLD_SIZE="$world" LOCAL_RANK="${local_ranks[r]}"
        MASTER_ADDR="$master_addr" MASTER_PORT="$master_port")
    if is_local "$host"; then
        if [[ -z ${RAYON_NUM_THREADS:-} ]]; then
            threads=$((cores / ${per_host[$host]}))
            vars+=(RAYON_NUM_THREADS="$((threads > 0 ? threads : 1))")
        fi
        launcher=(env "${vars[@]}" "$@")
    else
        remote="cd $(printf '%q' "$PWD") && exec env$(printf ' %q' "${vars[@]}" "$@")"
        # -tt: when this ssh dies, the remote side gets SIGHUP instead of running on orphaned.
        launcher=(ssh -tt -o BatchMode=yes "$host" "$remote")
    fi
    # The subshell outlives its pipeline (a handler, unlike an ignored signal, is not inherited),
    # so its exit status is the rank's, and its output is fully printed when it ends.
    # Its own stderr would only carry bash's "Killed" notices; the rank's goes through the pipe.
    (
        trap : INT TERM HUP
        "${launcher[@]}" </dev/null 2>&1 | prefix "$r"
    ) 2>/dev/null &
    pids+=("$!")
done
# The process groups exist now; without job control bash no longer reports each job's end.
set +m

# Bash reaps finished children on its own, so `kill -0` fails once a rank has exited and `wait`
# then hands back its stored status; polling this way works on any bash 4.
monitor() {
    local running=("${!pids[@]}") still r status
    while ((${#running[@]} > 0)); do
        still=()
        for r in "${running[@]}"; do
            if kill -0 "${pids[r]}" 2>/dev/null; then
                still+=("$r")
                continue
            fi
            status=0
            wait "${pids[r]}" || status=$?
            if ((status != 0)); then
                echo "launch.sh: rank $r exited with status $status; stopping the other ranks" >&3
                stop_ranks TERM
                exit "$status"
            fi
        done
        running=("${still[@]+"${still[@]}"}")
        ((${#running[@]} == 0)) || sleep 0.1
    done
}
# Bash's own notices ("line N: PID Killed ...") would repeat ours, which go to fd 3.
monitor 2>/dev/null
exit 0
