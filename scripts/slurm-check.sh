#!/usr/bin/env bash
# A real one-node Slurm on 127.0.0.1 runs deploy/slurm/worker.sbatch as a two-task array against a
# coordinator, and one task is preempted mid-heal. Checks: every job of the sweep succeeds exactly
# once; the preempted task checkpointed, requeued itself and the healing job resumed from its
# checkpoint (not from step 0); both array tasks end by themselves when the sweep is done.
#
#   scripts/slurm-check.sh            # needs root (munged, slurmctld and slurmd run as root here)
#
# Installs Debian's slurm-wlm and munge when missing. CPU only: the node advertises two "gpu" GRES
# backed by stand-in device files, so the batch script's `--gres=gpu:1` is scheduled as on a GPU cluster, and the
# workers get PRUNESWEEP_DEVICE=cpu. Private munge socket and key, Slurm state, ports 16817/16818 and
# the coordinator on 127.0.0.1:16851: nothing of the machine's own is touched. Writes its transcript
# and the workers' logs to $PRUNESWEEP_SLURM_OUT (default results/slurm-check/).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
out="${PRUNESWEEP_SLURM_OUT:-$root/results/slurm-check}"
data="${PRUNESWEEP_DATA:-$(cd "$root/.." && pwd)/shared/data}"
c4="$data/c4/c4-en-train.00000-of-01024.first1000.jsonl"
timeout_secs="${PRUNESWEEP_SLURM_TIMEOUT:-900}"
started=$(date +%s)

mkdir -p "$out"
exec > >(tee "$out/transcript.txt") 2>&1
log() { echo "[slurm-check $(( $(date +%s) - started ))s] $*"; }
die() { log "FAIL: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root: munged, slurmctld and slurmd are started here"
[[ -f "$c4" ]] || die "no C4 sample at $c4: set PRUNESWEEP_DATA to the shared data folder"
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  log "installing slurm-wlm and munge (Debian)"
  "$root/scripts/apt-install.sh" slurm-wlm munge >/dev/null ||
    die "slurm-wlm and munge could not be installed (scripts/apt-install.sh)"
fi

log "building the coordinator and the worker (debug profile, as the tests use)"
cargo build -q -p prunesweep-coordinator -p prunesweep-worker --bins
bin="$root/target/debug"

run=$(mktemp -d /tmp/prunesweep-slurm.XXXXXX)
chmod 755 "$run"
pids=()
cleanup() {
  set +e
  [[ -n "${SLURM_CONF:-}" ]] && scancel --full --quiet --user root 2>/dev/null
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  sleep 1
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done
  rm -rf "$run"
}
trap cleanup EXIT
mkdir -p "$run"/{munge,state,spool,logs,work} "$out"
rm -f "$out"/*.log

# munge: a private key and socket.
dd if=/dev/urandom of="$run/munge/munge.key" bs=1024 count=1 status=none
chmod 700 "$run/munge"
chmod 400 "$run/munge/munge.key"
munged --force --key-file="$run/munge/munge.key" --socket="$run/munge/munge.sock" \
  --pid-file="$run/munge/munged.pid" --log-file="$run/munge/munged.log" --seed-file="$run/munge/seed"
pids+=("$(cat "$run/munge/munged.pid")")

host=$(hostname -s)
cpus=$(nproc)
export SLURM_CONF="$run/slurm.conf"
cat > "$SLURM_CONF" <<EOF
ClusterName=prunesweep-check
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=16817
SlurmdPort=16818
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$run/munge/munge.sock
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$run/state
SlurmdSpoolDir=$run/spool
SlurmctldPidFile=$run/slurmctld.pid
SlurmdPidFile=$run/slurmd.pid
SlurmctldLogFile=$run/logs/slurmctld.log
SlurmdLogFile=$run/logs/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu
JobRequeue=1
KillWait=60
ReturnToService=2
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=4000 Gres=gpu:2 State=UNKNOWN
PartitionName=check Nodes=${host} Default=YES MaxTime=INFINITE State=UP
EOF
# Slurm drops GPUs without device files; two stand-ins (character devices like /dev/null) let it
# bind one per task and set CUDA_VISIBLE_DEVICES, as on a GPU node.
mkdir -p "$run/dev"
for i in 0 1; do mknod "$run/dev/nvidia$i" c 1 3; done
echo "NodeName=${host} Name=gpu File=$run/dev/nvidia[0-1]" > "$run/gres.conf"

log "starting slurmctld and slurmd ($(slurmctld -V))"
slurmctld -f "$SLURM_CONF" -i
slurmd -f "$SLURM_CONF"
for _ in $(seq 60); do
  [[ -f "$run/slurmctld.pid" && -f "$run/slurmd.pid" ]] && break
  sleep 0.5
done
pids+=("$(cat "$run/slurmctld.pid")" "$(cat "$run/slurmd.pid")")
for _ in $(seq 60); do
  sinfo -h -o %t 2>/dev/null | grep -q idle && break
  sleep 1
done
sinfo -h -o '%P %t %D %c %G' | grep -q idle || die "the node never became idle: $(tail -5 "$run/logs/slurmd.log" "$run/logs/slurmctld.log")"
log "node up: $(sinfo -h -o '%N %t cpus=%c gres=%G')"

# The coordinator: on the login node or as its own job; here a plain process with SQLite.
url=http://127.0.0.1:16851
"$bin/coordinator" serve --listen 127.0.0.1:16851 --database "sqlite://$run/coordinator.sqlite" --lease-ttl-secs 30 \
  > "$run/logs/coordinator.log" 2>&1 &
pids+=("$!")
for _ in $(seq 60); do "$bin/coordinator" status --coordinator "$url" >/dev/null 2>&1 && break; sleep 0.5; done

# The tiny sweep with one unhealed and one healed variant per cell: score, baseline, 2 methods x
# 2 heal variants = 6 jobs. The healing is long enough to be preempted after a checkpoint (4,000
# steps: about a minute on 2 quiet cores).
cat > "$run/sweep.yaml" <<EOF
name: slurm-check
models:
  - name: tiny-llama
    path: $root/worker/tests/fixtures/tiny-llama
calibration:
  path: $c4
  samples: 4
  seq_len: 16
methods: [angular, deepest]
fractions: [0.25]
heal:
  - name: none
  - name: qlora
    qlora: {rank: 2, alpha: 4, dropout: 0.0, learning_rate: 0.001, batch_size: 2, seq_len: 16, steps: 4000, checkpoint_every: 10}
eval:
  - task: c4-loss
    path: $c4
    limit: 4
    seq_len: 16
    first_doc: 100
seed: 0
max_attempts: 3
EOF
"$bin/coordinator" submit "$run/sweep.yaml" --coordinator "$url"
total=6

# Two workers as one array job, through the same batch script a GPU cluster uses.
cat > "$run/worker.env" <<EOF
export PRUNESWEEP_COORDINATOR=$url
export PRUNESWEEP_WORKER=$bin/worker
export PRUNESWEEP_DEVICE=cpu
export PRUNESWEEP_WORK_DIR=$run/work
export PRUNESWEEP_MODEL_ROOT=$root/worker/tests/fixtures
export PRUNESWEEP_DATA_ROOT=$data
export RUST_LOG=info
EOF
array=$(sbatch --parsable --array=0-1 --cpus-per-task=1 --mem=1G --time=30:00 \
  --output="$run/logs/worker-%A_%a.log" --export="ALL,PRUNESWEEP_ENV=$run/worker.env" \
  "$root/deploy/slurm/worker.sbatch" --lease-wait-secs 2)
log "submitted array job $array: $(squeue -h -o '%i %T %b' | tr '\n' ' ')"

# column_of NAME TABLE: the sweep row's value under the header NAME of `coordinator status`.
column_of() {
  awk -v want="$1" 'NR==1 { for (i = 1; i <= NF; i++) if ($i == want) c = i } NR==2 { print $c }' <<<"$2"
}

# Wait for a healing job past its first checkpoint, and preempt the task that runs it.
victim=""
deadline=$(( $(date +%s) + timeout_secs ))
while [[ -z "$victim" ]]; do
  (( $(date +%s) < deadline )) || die "no healing job reached a checkpoint in ${timeout_secs}s"
  status=$("$bin/coordinator" status slurm-check --coordinator "$url" 2>/dev/null || true)
  # JOB KIND WORKER PHASE PROGRESS ...: a cell in its heal phase, on slurm-<array>_<task>@host.
  line=$(grep -E ' heal ' <<<"$status" | grep -E 'slurm-[0-9]+_[0-9]+@' | head -1 || true)
  if [[ "$(column_of SUCCEEDED "$status")" == "$total" ]]; then
    die "the sweep finished before a healing job could be preempted: make the healing longer"
  fi
  if [[ -n "$line" ]] && find "$run/work" -name checkpoint.safetensors 2>/dev/null | grep -q .; then
    victim=$(grep -oE 'slurm-[0-9]+_[0-9]+' <<<"$line" | head -1 | sed 's/^slurm-//')
    job_id=$(awk '{print $1}' <<<"$line")
    log "job $job_id heals on task $victim: $line"
  fi
  sleep 1
done
log "preempting task $victim as the time limit's --signal=B:TERM would (scancel --batch --signal=TERM)"
scancel --batch --signal=TERM "$victim"

# The sweep finishes; the array tasks end by themselves (--exit-when-done).
while :; do
  (( $(date +%s) < deadline )) || die "the sweep did not finish in ${timeout_secs}s: $("$bin/coordinator" status slurm-check --coordinator "$url")"
  table=$("$bin/coordinator" status slurm-check --coordinator "$url")
  counts=$(awk 'NR==2' <<<"$table")
  succeeded=$(column_of SUCCEEDED "$table")
  failed=$(column_of FAILED "$table")
  cancelled=$(column_of CANCELLED "$table")
  [[ "$succeeded" == "$total" ]] && break
  [[ "$failed" == 0 && "$cancelled" == 0 ]] || die "jobs failed or were cancelled: $counts"
  sleep 2
done
log "sweep done: $counts"
# Slurm holds a requeued task for a while (BeginTime, about 2-3 minutes here) before it runs again;
# it then finds nothing left to do and ends.
for _ in $(seq 420); do
  [[ -z "$(squeue -h -j "$array" 2>/dev/null)" ]] && break
  sleep 1
done
[[ -z "$(squeue -h -j "$array" 2>/dev/null)" ]] || die "array tasks still queued or running after the sweep: $(squeue -h -j "$array")"
log "both array tasks ended by themselves"

cp "$run"/logs/worker-*.log "$out/"
# All workers' logs, without colour codes (grep reads a file: `grep -q` in a pipe would kill its
# writer with SIGPIPE, which pipefail reports as a failure).
sed 's/\x1b\[[0-9;]*m//g' "$run"/logs/worker-*.log > "$run/all-workers.log"

# The preempted task was requeued and ran again.
victim_log="$run/logs/worker-${victim}.log"
grep -q "requeueing" "$victim_log" || die "task $victim did not requeue itself: $(tail -20 "$victim_log")"
grep -q "restart 1" "$victim_log" || die "task $victim never ran again after its requeue"
log "task $victim: $(grep -c 'prunesweep-worker: task' "$victim_log") starts, requeued by its own script"
for other in "$run"/logs/worker-*.log; do
  [[ "$other" == "$victim_log" ]] && continue
  ! grep -q "SIGTERM" "$other" || die "$(basename "$other") got a SIGTERM too: the preemption or the requeue hit more than one task"
done

# The healing job was handed back once and resumed from its checkpoint, not from step 0.
resumed=$(grep -E '(^| )resumed' "$run/all-workers.log" | grep -oE 'step=[0-9]+' | head -1 | cut -d= -f2 || true)
[[ -n "$resumed" ]] || die "no worker resumed the healing job from a checkpoint"
(( resumed >= 10 )) || die "the healing job resumed at step $resumed, expected a checkpoint (>= 10)"
grep -q "resuming from the healing checkpoint" "$run/all-workers.log" || die "no resume message"
log "job $job_id resumed from its checkpoint at step $resumed"

# Every job completed exactly once; only the preempted one was leased twice.
for id in $(seq 1 $total); do
  done_count=$(grep -cE "job_id=$id( |$).*completed|completed.*job_id=$id( |$)" "$run/all-workers.log" || true)
  [[ "$done_count" == 1 ]] || die "job $id completed $done_count times"
done
leases=$(grep -E ' leased' "$run/all-workers.log" | grep -oE 'job_id=[0-9]+' | sort | uniq -c | awk '{print $2"x"$1}' | tr '\n' ' ')
log "leases per job: $leases"
for id in $(seq 1 $total); do
  n=$(grep -E ' leased' "$run/all-workers.log" | grep -cE "job_id=$id( |$)" || true)
  want=1
  [[ "$id" == "$job_id" ]] && want=2
  [[ "$n" == "$want" ]] || die "job $id was leased $n times, expected $want"
done
"$bin/coordinator" export slurm-check --coordinator "$url" --format csv --out "$out/results.csv" >/dev/null
log "PASS: $total jobs succeeded once each; task $victim preempted mid-heal, requeued, job $job_id resumed at step $resumed ($(( $(date +%s) - started ))s)"
