#!/usr/bin/env bash
# batchrun from cron: one dated log file per start (stdout and stderr), and batchrun's own lock instead of flock.
#
#   examples/cron/batchrun-cron.sh JOB.yaml [batchrun run options: --set KEY=VALUE, --num-shards N ...]
#
# Each start writes LOG_DIR/<job>-YYYYmmdd-HHMMSS-<pid>.log (LOG_DIR defaults to ~/batchrun-logs; logs older than
# LOG_KEEP_DAYS, 30, are removed) and exits with batchrun's code. A start that overlaps a run still at work on the
# same OUTPUT exits 75 at once, before loading a model, and its log says which process holds the lock; the next
# start resumes where the run stopped, and a start after the job finished exits 0 at once. So no flock: a killed
# run leaves no lock file behind. Exit 1, 2 and 3 also print the log's last line on stderr, which cron mails
# (MAILTO); 0 and 75 print nothing. BATCHRUN_DATE (default: today, YYYY-MM-DD) is exported for the manifest's
# ${BATCHRUN_DATE}. BATCHRUN names the executable (default: batchrun on cron's short PATH, so give a full path).
set -uo pipefail

job=${1:?usage: batchrun-cron.sh JOB.yaml [batchrun run options]}
shift
batchrun=${BATCHRUN:-batchrun}
log_dir=${LOG_DIR:-$HOME/batchrun-logs}
export BATCHRUN_DATE=${BATCHRUN_DATE:-$(date +%F)}

mkdir -p "$log_dir" || exit 1
log="$log_dir/$(basename "$job" .yaml)-$(date +%Y%m%d-%H%M%S)-$$.log"
find "$log_dir" -name '*.log' -type f -mtime "+${LOG_KEEP_DAYS:-30}" -delete 2>/dev/null

echo "$(date -Is) start: $batchrun run $job $* (BATCHRUN_DATE=$BATCHRUN_DATE, pid $$)" >>"$log"
"$batchrun" run "$job" --no-progress "$@" >>"$log" 2>&1
code=$?
case $code in
    0) what="done" ;;
    1) what="failed at run time; the next start retries and resumes" ;;
    2) what="manifest or usage error; fix the job, the next start fails the same way" ;;
    3) what="every row processed, but failed rows above errors.max_error_rate; inspect the error column" ;;
    75) what="interrupted, or OUTPUT locked by a run still at work (see above); the next start resumes" ;;
    *) what="ended by signal or unexpected code; the next start resumes" ;;
esac
echo "$(date -Is) exit $code: $what" >>"$log"
case $code in
    0 | 75) ;;
    *) echo "batchrun $job: exit $code: $what (log: $log)" >&2 ;;
esac
exit "$code"
