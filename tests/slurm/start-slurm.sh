#!/usr/bin/env bash
# Start a one-node SLURM "cluster" on this machine, for tests/python/test_slurm.py and for
# trying examples/slurm/ by hand.
#
#   sudo bash tests/slurm/start-slurm.sh
#
# What it does (every step is skipped when already done, so it can be run any number of
# times, also while the daemons are up):
#   1. installs the Debian packages slurm-wlm and munge (apt-get, no recommends) unless
#      sbatch and slurmctld are already installed;
#   2. writes a munge key /etc/munge/munge.key (owner munge, mode 0400) if there is none;
#   3. writes /etc/slurm/slurm.conf for one node (this host: CPUs from nproc, RealMemory
#      from `slurmd -C`) and one default partition `debug`. A slurm.conf that this script
#      did not write is never touched; ours is rewritten (and the daemons restarted) only
#      when its content would change (e.g. another host name or CPU count);
#   4. starts munged (as the munge user), slurmctld and slurmd directly (no systemd needed),
#      each only if it is not running;
#   5. waits (at most SLURM_WAIT_SECONDS, default 60) until `sinfo` shows the node idle.
#
# Exit status: 0 when the node is idle and takes jobs; 77 when not run as root and no
# passwordless sudo is available (nothing was changed); 1 on any other failure, after
# printing the tails of the daemons' logs.
#
# Logs: /var/log/slurm/slurmctld.log, /var/log/slurm/slurmd.log, /var/log/munge/munged.log.
# Stop: kill "$(cat /run/slurmd.pid)" "$(cat /run/slurmctld.pid)".
set -euo pipefail

EXIT_NOT_ROOT=77
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
MARKER="# Written by sensorium-ingest tests/slurm/start-slurm.sh"
LOG_DIR=/var/log/slurm
STATE_DIR=/var/lib/slurm/slurmctld
SPOOL_DIR=/var/lib/slurm/slurmd
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_KEY=/etc/munge/munge.key
MUNGE_RUN=/run/munge
WAIT_SECONDS="${SLURM_WAIT_SECONDS:-60}"

say() { printf '[start-slurm] %s\n' "$*"; }
warn() { printf '[start-slurm] %s\n' "$*" >&2; }

diagnostics() {
    warn "---- diagnostics ----"
    for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" /var/log/munge/munged.log; do
        if [ -f "$f" ]; then
            warn "---- last 25 lines of $f"
            tail -n 25 "$f" >&2 || true
        else
            warn "---- $f: not there"
        fi
    done
    if command -v sinfo >/dev/null 2>&1; then
        warn "---- sinfo -N -l"
        sinfo -N -l >&2 2>&1 || true
        warn "---- scontrol show node"
        scontrol show node >&2 2>&1 || true
    fi
    warn "---- processes"
    ps -C munged,slurmctld,slurmd -o pid=,user=,args= >&2 || warn "(none)"
}

fail() {
    warn "FAILED: $*"
    diagnostics
    exit 1
}

# ------------------------------------------------------------------ root
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
        say "not root: re-running with sudo"
        exec sudo -n env "SLURM_WAIT_SECONDS=$WAIT_SECONDS" bash "$0" "$@"
    fi
    warn "****************************************************************"
    warn "* start-slurm.sh needs root (it installs packages and starts   *"
    warn "* system daemons) and there is no passwordless sudo.           *"
    warn "* Nothing was changed. Exit status $EXIT_NOT_ROOT (skip).                  *"
    warn "****************************************************************"
    exit "$EXIT_NOT_ROOT"
fi

# ------------------------------------------------------------------ packages
if command -v sbatch >/dev/null 2>&1 && command -v slurmctld >/dev/null 2>&1 \
        && command -v slurmd >/dev/null 2>&1 && command -v munged >/dev/null 2>&1; then
    say "slurm and munge already installed (slurm $(dpkg-query -W -f '${Version}' slurmctld 2>/dev/null || echo '?'))"
else
    say "installing slurm-wlm and munge with apt-get (about a minute)"
    export DEBIAN_FRONTEND=noninteractive
    t0=$SECONDS
    apt-get update -qq || fail "apt-get update failed"
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null \
        || fail "apt-get install slurm-wlm munge failed"
    say "installed in $((SECONDS - t0)) s"
fi
PATH="/usr/sbin:/sbin:$PATH"

# ------------------------------------------------------------------ munge
if [ ! -s "$MUNGE_KEY" ]; then
    say "writing a new munge key $MUNGE_KEY"
    install -d -o munge -g munge -m 0700 /etc/munge
    if command -v mungekey >/dev/null 2>&1; then
        rm -f "$MUNGE_KEY"
        mungekey --create --keyfile="$MUNGE_KEY" || fail "mungekey --create failed"
    else
        dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
    fi
fi
chown munge:munge "$MUNGE_KEY"
chmod 0400 "$MUNGE_KEY"
install -d -o munge -g munge -m 0755 "$MUNGE_RUN"
install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if munge_ok; then
    say "munged already running"
else
    say "starting munged"
    runuser -u munge -- munged </dev/null >/dev/null 2>&1 || fail "munged did not start"
    for _ in $(seq 1 50); do munge_ok && break; sleep 0.2; done
    munge_ok || fail "munged started but 'munge -n | unmunge' fails"
fi

# ------------------------------------------------------------------ slurm.conf
node="$(hostname -s)"
cpus="$(nproc)"
# `slurmd -C` prints the node line slurmd itself would report, e.g.
# NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105
hw="$(slurmd -C 2>/dev/null | head -n 1 || true)"
field() { printf '%s\n' "$hw" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
mem="$(field RealMemory)"
if [ -z "$mem" ]; then
    mem="$(awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo)"
fi
topology="CPUs=$cpus"
if [ "$(field CPUs)" = "$cpus" ] && [ -n "$(field CoresPerSocket)" ]; then
    # Same count as the hardware: give its layout too (otherwise slurmd logs that it
    # "reconfigured socket/core boundaries").
    topology="CPUs=$cpus Boards=$(field Boards) SocketsPerBoard=$(field SocketsPerBoard)"
    topology="$topology CoresPerSocket=$(field CoresPerSocket) ThreadsPerCore=$(field ThreadsPerCore)"
fi
addr="$(getent hosts "$node" | awk '{ print $1; exit }' || true)"
addr="${addr:-127.0.0.1}"

wanted="$(cat <<EOF
$MARKER
# One node ($node), one partition. Regenerated by that script when the host changes;
# delete this file (or the first line) to stop it from managing SLURM's configuration.
ClusterName=sensorium
SlurmctldHost=$node($addr)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# An array task that failed makes its afterok dependants fail instead of pending forever.
DependencyParameters=kill_invalid_depend
ReturnToService=2
# Finished jobs stay visible to 'scontrol show job' for 30 minutes (no accounting database).
MinJobAge=1800
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MailProg=/bin/true
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=$node NodeAddr=$addr $topology RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
)"

restart=0
if [ -f "$CONF" ] && ! head -n 1 "$CONF" | grep -qxF "$MARKER"; then
    say "$CONF exists and was not written by this script: leaving it alone"
elif [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$wanted" ]; then
    say "$CONF is up to date"
else
    if [ -f "$CONF" ]; then
        say "rewriting $CONF (the configuration it would write changed)"
        restart=1
    else
        say "writing $CONF (node $node, $cpus CPUs, RealMemory $mem MB)"
    fi
    install -d -m 0755 "$CONF_DIR"
    printf '%s\n' "$wanted" > "$CONF.tmp"
    chmod 0644 "$CONF.tmp"
    mv -f "$CONF.tmp" "$CONF"
fi
install -d -m 0755 "$LOG_DIR" "$STATE_DIR" "$SPOOL_DIR"

# ------------------------------------------------------------------ daemons
running() {    # running NAME PIDFILE: the pid file names a live process called NAME
    local pid
    [ -s "$2" ] || return 1
    pid="$(cat "$2")"
    [ -n "$pid" ] && [ "$(ps -o comm= -p "$pid" 2>/dev/null)" = "$1" ]
}

stop() {       # stop NAME PIDFILE (only the process named in our pid file)
    local pid
    running "$1" "$2" || return 0
    pid="$(cat "$2")"
    say "stopping $1 (pid $pid) to load the new configuration"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do running "$1" "$2" || return 0; sleep 0.1; done
    fail "$1 (pid $pid) did not stop"
}

if [ "$restart" = 1 ]; then
    stop slurmd "$SLURMD_PID"
    stop slurmctld "$CTLD_PID"
fi

if running slurmctld "$CTLD_PID"; then
    say "slurmctld already running (pid $(cat "$CTLD_PID"))"
else
    say "starting slurmctld"
    slurmctld </dev/null >>"$LOG_DIR/slurmctld.stdout" 2>&1 || fail "slurmctld did not start"
fi
ok=0
for _ in $(seq 1 "$((WAIT_SECONDS * 2))"); do
    if scontrol ping 2>/dev/null | grep -q 'is UP'; then ok=1; break; fi
    sleep 0.5
done
[ "$ok" = 1 ] || fail "slurmctld does not answer 'scontrol ping'"

if running slurmd "$SLURMD_PID"; then
    say "slurmd already running (pid $(cat "$SLURMD_PID"))"
else
    say "starting slurmd"
    slurmd -N "$node" </dev/null >>"$LOG_DIR/slurmd.stdout" 2>&1 || fail "slurmd did not start"
fi

# ------------------------------------------------------------------ wait for idle
state=""
resumed=0
deadline=$((SECONDS + WAIT_SECONDS))
while [ "$SECONDS" -lt "$deadline" ]; do
    state="$(sinfo -h -N -n "$node" -o '%T' 2>/dev/null | head -n 1 || true)"
    case "$state" in
        idle|mixed|allocated|completing)
            say "node $node is $state: SLURM is ready"
            sinfo
            exit 0
            ;;
        drain*|down*|fail*)
            # A node left down/drained by an earlier run (or a stopped slurmd) comes back
            # once slurmd has registered; ask once.
            if [ "$resumed" = 0 ] && running slurmd "$SLURMD_PID"; then
                sleep 2
                say "node $node is $state: resuming it"
                scontrol update NodeName="$node" State=RESUME 2>/dev/null || true
                resumed=1
            fi
            ;;
    esac
    sleep 1
done
fail "node $node is not idle after ${WAIT_SECONDS} s (state: ${state:-unknown})"
