"""The run directory: the one module that names OUTPUT's files, and the one that writes them.

    OUTPUT/
      part-00000i.parquet     a part: rows_per_part consecutive input rows, its facts in the Parquet footer
      _metrics-00000i.json    what computing part i measured (output/metrics.py), written just before the part
      _batchrun.json          the run's record: identity, manifest, versions; at the end its totals and part sizes
      _progress.json          parts and rows committed, rates, ETA (output/progress.py)
      _eval.json              the scores, when the job has an evaluate section (evaluation.py)
      _SUCCESS                once every part is committed
      .worker-ID.json         a process at work: host, pid, rank or shard, heartbeat (output/claims.py)
      .claim-00000i.G         a claim on part i, generation G (output/claims.py)
      .NAME.tmp-HOST-PID-HEX  a write in flight (output/store.py); a dead writer's is a leftover

A run reads as verbs on RunDir, the way datatrove's CheckpointManager makes resume read: `prepare` before any model
loads (--fresh, leftovers, the identity check, batchrun's own lock; `join` for ranks other than 0), `record_run`
once the model has loaded, `verified_parts` to know what is done, `finish` once every part is committed. status,
evaluate and report read through the same functions.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline_core.errors import BatchrunError, OutputBusy, UsageError
from pipeline_core.identity.keys import differences, fingerprint
from pipeline_core.output.lock import refuse_if_locked
from pipeline_core.output.parts import encode_parquet

log = logging.getLogger("batchrun")

RUN_INFO = "_batchrun.json"
PROGRESS = "_progress.json"
SUCCESS = "_SUCCESS"
EVAL = "_eval.json"
PART_PATTERN = re.compile(r"part-(\d{6})\.parquet")
METRICS_PATTERN = re.compile(r"_metrics-(\d{6})\.json")
WORKER_PATTERN = re.compile(r"\.worker-(?P<id>[\w.-]+)\.json")
CLAIM_PATTERN = re.compile(r"\.claim-(?P<key>\w+)\.(?P<generation>\d+)")
# a temporary of store.put / store.create: ".NAME.tmp-HOST-PID-HEX", or ".NAME.tmp-PID[-HEX]" of older versions
OLD_TEMPORARY = re.compile(r"\..+\.tmp-(?P<pid>\d+)(?:-[0-9a-f]{8})?")
TEMPORARY = re.compile(r"\..+\.tmp-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}")

STALE_AFTER = 120.0  # a worker record not rewritten for this long is a process gone (a preempted node)
RANK_0_TIMEOUT = 600.0  # how long other ranks wait for rank 0 to prepare OUTPUT (it loads no model first)
ADVICE = "it is not a batchrun run directory, or it was edited; check the path (rerun the job with --fresh to start " \
         "it over)"
OWN_WORKERS: set[str] = set()  # ids of this process's worker records (output/claims.py's Worker adds them)


# --- names -----------------------------------------------------------------------------------------------------------

def part_name(index: int) -> str:
    return f"part-{index:06d}.parquet"


def committed_parts(names: list[str]) -> set[int]:
    return {int(match[1]) for name in names if (match := PART_PATTERN.fullmatch(name))}


def metrics_name(index: int) -> str:
    return f"_metrics-{index:06d}.json"


def is_metrics(name: str) -> bool:
    return METRICS_PATTERN.fullmatch(name) is not None


def worker_name(worker_id: str) -> str:
    return f".worker-{worker_id}.json"


def claim_name(key: int | str, generation: int) -> str:
    label = f"{key:06d}" if isinstance(key, int) else key
    return f".claim-{label}.{generation}"


# --- small JSON files: records, claims, progress, scores, metrics ---------------------------------------------------

def read_json(store, name: str) -> dict | None:
    raw = store.get(name)
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None  # torn by a crash mid-write (claims are written in one create; records by rename)
    return value if isinstance(value, dict) else None


def write_worker_record(store, worker_id: str, record: dict) -> None:
    store.put(worker_name(worker_id), json.dumps(record).encode())


def remove_worker_record(store, worker_id: str) -> None:
    store.remove(worker_name(worker_id))


def create_claim(store, key: int | str, generation: int, record: dict) -> bool:
    """Claim generation `generation` of `key`, exclusively: False when it exists."""
    return store.create(claim_name(key, generation), json.dumps(record).encode())


def remove_claim(store, key: int | str, generation: int) -> None:
    store.remove(claim_name(key, generation))


def write_progress(store, snapshot: dict) -> None:
    store.put(PROGRESS, json.dumps(snapshot, indent=2).encode())


def read_progress(store) -> dict:
    """`_progress.json` as written, or {} where it is missing, torn or edited into something else."""
    try:
        progress = json.loads(store.get(PROGRESS) or b"{}")
    except ValueError:
        return {}
    return progress if isinstance(progress, dict) else {}


def write_scores(store, result: dict) -> None:
    store.put(EVAL, (json.dumps(result, indent=2) + "\n").encode())


def read_scores(store) -> dict | None:
    """_eval.json, or None where there is none or it does not parse (it is rewritten by `batchrun evaluate`)."""
    raw = store.get(EVAL)
    try:
        result = json.loads(raw) if raw is not None else None
    except ValueError:
        return None
    return result if isinstance(result, dict) else None


def write_metrics(store, index: int, record: dict) -> None:
    store.put(metrics_name(index), json.dumps(record, separators=(",", ":")).encode())


def read_metrics(store, fingerprint: str | None = None) -> list[dict]:
    """The metrics of OUTPUT's committed parts (of the run with `fingerprint`, when given), by part."""
    names = store.names()
    committed = committed_parts(names)
    records = []
    for name in names:
        match = METRICS_PATTERN.fullmatch(name)
        if match is None or int(match[1]) not in committed:
            continue  # written by a process killed before it committed the part: it will be computed again
        record = read_json(store, name)
        if record is not None and (fingerprint is None or record.get("fingerprint") == fingerprint):
            records.append(record)
    return sorted(records, key=lambda record: record.get("part", 0))


# --- who is at work: worker records and their liveness ---------------------------------------------------------------

def is_live(record: dict | None, now: float | None = None) -> bool:
    """A worker record of a process still at work: running, with a fresh heartbeat and, on this host, a pid."""
    if not record or record.get("state") != "running":
        return False
    heartbeat = record.get("heartbeat")
    if not isinstance(heartbeat, (int, float)) or isinstance(heartbeat, bool):
        return False  # a record edited by hand or written by something else: it proves nobody is alive
    now = time.time() if now is None else now
    if now - heartbeat > STALE_AFTER:
        return False
    if record.get("host") == socket.gethostname():
        if record.get("pid") == os.getpid():
            # this process's pid, but not one of its records: a process before a restart in a fresh PID namespace
            # (a container's PID 1 restarted on the same host name), which cannot be alive
            return record.get("worker") in OWN_WORKERS
        return pid_alive(record.get("pid"))
    return True


def pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return True  # no process to ask about (and os.kill(-1, ...) would reach every process): the heartbeat decides
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def worker_records(store) -> list[dict]:
    """Every worker record in OUTPUT, live or not, each with "live" set."""
    now = time.time()
    records = []
    for name in store.names():
        if WORKER_PATTERN.fullmatch(name) and (record := read_json(store, name)) is not None:
            records.append({**record, "live": is_live(record, now)})
    return records


def is_leftover(store, name: str) -> bool:
    """A temporary whose writer is gone: its pid is dead on this host, or it is older than STALE_AFTER (a live
    writer renames its temporaries within seconds)."""
    match = OLD_TEMPORARY.fullmatch(name) or TEMPORARY.fullmatch(name)
    if match is None:
        return False
    host = match.groupdict().get("host") or socket.gethostname()
    if host == socket.gethostname() and not pid_alive(int(match["pid"])):
        return True
    return store.age(name) > STALE_AFTER


# --- _batchrun.json --------------------------------------------------------------------------------------------------

def read_run_info(store) -> dict:
    """OUTPUT's _batchrun.json ({} when there is none), with the identity every reader needs; a usage error naming
    the file when it is not a run's record."""
    raw = store.get(RUN_INFO)
    if raw is None:
        return {}
    info = parse_run_info(raw, store)
    if "identity" not in info:
        raise not_a_run(store, 'has no "identity" object')
    return info


def parse_run_info(raw: bytes, store) -> dict:
    """The run info of `store` from its bytes: a JSON object, whose identity, where it has one, is an object too."""
    try:
        info = json.loads(raw)
    except UnicodeDecodeError:
        raise not_a_run(store, "is not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise not_a_run(store, f"is not valid JSON (line {error.lineno} column {error.colno})") from None
    if not isinstance(info, dict):
        raise not_a_run(store, f"holds {json.dumps(info)[:40]}, not a JSON object")
    if not isinstance(info.get("identity", {}), dict):
        raise not_a_run(store, 'has an "identity" that is not an object')
    return info


def not_a_run(store, problem: str) -> UsageError:
    return UsageError(f"{store}/{RUN_INFO} {problem}: {ADVICE}")


def status_run_info(store, output: str) -> dict:
    """`_batchrun.json`, with what status, evaluate and report need of it: a UsageError naming the file and the
    problem otherwise."""
    info = read_run_info(store)
    if not info:
        raise UsageError(f"{output} holds no batchrun run (no {RUN_INFO}); check the path")
    if not isinstance(info.get("fingerprint"), str):
        raise not_a_run(store, 'has no "fingerprint" string')
    rows_per_part = info["identity"].get("output.rows_per_part")
    if not isinstance(rows_per_part, int) or isinstance(rows_per_part, bool) or rows_per_part < 1:
        raise not_a_run(store, 'has no positive "output.rows_per_part" in its "identity"')
    return info


def recorded_totals(info: dict) -> tuple[int | None, int | None]:
    """(rows, failed rows) _batchrun.json recorded when the run finished; (None, None) for a run finished by a
    batchrun that did not record them (its parts are counted instead)."""
    rows, failed_rows = info.get("rows"), info.get("failed_rows")
    if isinstance(rows, int) and isinstance(failed_rows, int):
        return rows, failed_rows
    return None, None


# --- parts -----------------------------------------------------------------------------------------------------------

@dataclass
class PartFacts:
    index: int
    rows: int
    failed_rows: int
    evaluation: dict | None = None  # the part's evaluation statistics, when the run is scored


def commit_part(store, index: int, table: pa.Table, compression: str, fingerprint: str,
                evaluation: dict | None = None) -> None:
    """`evaluation`: the part's statistics for the run's scores (evaluation.py), committed with its rows."""
    first_row = table.column("row_id")[0].as_py() if table.num_rows else -1
    failed = table.num_rows - table.column("error").null_count
    facts = {"fingerprint": fingerprint, "part": index, "first_row": first_row, "rows": table.num_rows,
             "failed_rows": failed}
    if evaluation is not None:
        facts["evaluation"] = json.dumps(evaluation, separators=(",", ":"))
    store.put(part_name(index), encode_parquet(table, compression, facts))


def read_part_columns(store, index: int, columns: list[str]) -> pa.Table:
    """Some columns of a committed part's rows."""
    with store.open(part_name(index)) as file:
        return pq.read_table(file, columns=columns)


def _evaluation(raw: str | None) -> dict | None:
    try:
        stats = json.loads(raw) if raw is not None else None
    except ValueError:
        return None  # unreadable: the part's statistics are computed again from its rows
    return stats if isinstance(stats, dict) else None


def read_part_facts(store, index: int, fingerprint: str, rows_per_part: int,
                    split_start: int | None = 0) -> PartFacts | None:
    """What a committed part's footer says, or None when the file is unreadable, truncated or not this run's.
    `split_start`: the row id of the split's first row (`train[10:50]` starts at 10), which fixes each part's first
    row id; None where the split is not open (status, a finished run's exit code) and it is not checked."""
    try:
        with store.open(part_name(index)) as file:
            metadata = pq.read_metadata(file).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None
    facts = {key.decode().removeprefix("batchrun."): value.decode() for key, value in metadata.items()
             if key.startswith(b"batchrun.")}
    try:
        rows, first_row = int(facts["rows"]), int(facts["first_row"])
        valid = (facts["fingerprint"] == fingerprint and int(facts["part"]) == index
                 and 0 < rows <= rows_per_part
                 and (split_start is None or first_row == split_start + index * rows_per_part))
        if not valid:
            return None
        return PartFacts(index, rows, int(facts["failed_rows"]), _evaluation(facts.get("evaluation")))
    except (KeyError, ValueError):
        return None


def part_sizes(store, total: int) -> list[int]:
    """The bytes of parts 0 to total-1, from one listing: what a finished run records, to be checked on reruns."""
    sizes = store.sizes()
    return [sizes[part_name(index)] for index in range(total)]


def changed_since_finished(store, info: dict) -> list[int]:
    """Parts of a finished run that are missing, or whose size differs, from what `_batchrun.json` recorded when it
    finished: one listing, no part read. A run finished by a batchrun that recorded no sizes is checked by name,
    for the parts its recorded rows fill."""
    sizes = store.sizes()
    recorded = info.get("part_bytes")
    if isinstance(recorded, list):
        return [index for index, size in enumerate(recorded) if sizes.get(part_name(index)) != size]
    rows, rows_per_part = info.get("rows"), (info.get("identity") or {}).get("output.rows_per_part")
    if not isinstance(rows, int) or not isinstance(rows_per_part, int) or rows_per_part < 1:
        return []
    return [index for index in range(-(-rows // rows_per_part)) if part_name(index) not in sizes]


def first_few(indices: list[int]) -> str:
    shown = ", ".join(str(index) for index in indices[:5])
    return f"parts {shown}" + (", ..." if len(indices) > 5 else "")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# --- the run's verbs -------------------------------------------------------------------------------------------------

class RunDir:
    """One OUTPUT, as a run sees it."""

    def __init__(self, store):
        self.store = store

    def __str__(self) -> str:
        return str(self.store)

    def prepare(self, run_identity: dict, fresh: bool, layout) -> tuple[bool, dict]:
        """Before any model loads: --fresh, leftovers, the job's identity against OUTPUT's, and batchrun's own lock:
        a live process of another start at work on this share refuses this one with exit 75 (a finished job is still
        reported as finished). (finished, the identity in force: the one OUTPUT's run recorded, else this job's)."""
        if fresh:
            refuse_fresh_for_a_shard(fresh, layout)
            self.discard()
        self.remove_leftovers()
        finished, recorded = self.run_in_output(run_identity)
        if not finished:
            refuse_if_locked(self.store, layout.labels(), worker_records(self.store))
        if recorded is not None:
            return finished, recorded
        info = {"fingerprint": fingerprint(run_identity), "identity": run_identity, "started": now()}
        if not self.store.create(RUN_INFO, json.dumps(info, indent=2, default=str).encode()):
            finished, recorded = self.run_in_output(run_identity)  # another process created it first: this job's?
        return finished, recorded or run_identity

    def join(self, run_identity: dict, stop, layout=None) -> tuple[bool, dict] | None:
        """Ranks other than 0 wait until rank 0 has prepared OUTPUT (its --fresh must not discard their parts): the
        live worker record of their launch's rank 0 says so, or _SUCCESS when it found the job finished. Then the
        same identity check, and prepare's answer. No collective operation: a rank 0 that fails makes the launcher
        stop the group. Meanwhile another start's live process on this share refuses them as it refuses rank 0
        (exit 75): on another node the launcher may not stop them at once. None when stopped."""
        deadline = time.monotonic() + RANK_0_TIMEOUT
        labels = layout.labels() if layout is not None else {}
        while True:
            records = worker_records(self.store)
            if self.store.exists(SUCCESS) or any(record["live"] and record.get("rank") == 0
                                                 and record.get("launch") == labels.get("launch")
                                                 and record.get("attempt") == labels.get("attempt")
                                                 for record in records):
                break
            if layout is not None:
                refuse_if_locked(self.store, labels, records)
            if time.monotonic() > deadline:
                raise BatchrunError(f"rank 0 did not start writing {self.store} within {RANK_0_TIMEOUT:.0f}s; see "
                                    "its log")
            if stop.wait(0.2):
                return None
        finished, recorded = self.run_in_output(run_identity)
        return finished, recorded or run_identity

    def run_in_output(self, run_identity: dict) -> tuple[bool, dict | None]:
        """(finished, the identity recorded) when OUTPUT holds this job's run, (False, None) when it holds none;
        exit 2 when it holds another job's run. The recorded identity stays in force: one recorded by an older
        batchrun lacks keys added since (not compared), and its parts carry its fingerprint."""
        store = self.store
        previous = read_run_info(store)
        if not previous:
            if committed_parts(store.names()):
                raise UsageError(f"{store} holds parts but no {RUN_INFO}; it is not a batchrun run of this job "
                                 "(use --fresh to discard it, or another output.path)")
            return False, None
        changed = differences(previous["identity"], run_identity)
        if changed and self.abandoned_start():
            log.warning("%s holds the start of another job (fingerprint %s) that committed no part; it is replaced "
                        "(what differed: %s)", store, previous.get("fingerprint"), "; ".join(changed),
                        extra={"event": "abandoned_start_replaced"})
            self.discard()
            return False, None
        if changed:
            raise UsageError(
                f"{store} holds a run of a different job (fingerprint {previous.get('fingerprint')}); what "
                "differs:\n" + "\n".join(f"  - {change}" for change in changed)
                + "\nuse --fresh to discard it, or another output.path"
            )
        return self.still_finished(previous), previous["identity"]

    def abandoned_start(self) -> bool:
        """A start that committed no part, and whose processes are gone, is not a run to protect: a job that failed
        before its first part (a model that would not load, a device out of memory) must not block the fixed job."""
        names = self.store.names()
        return (not committed_parts(names) and SUCCESS not in names
                and not any(record["live"] for record in worker_records(self.store)))

    def still_finished(self, info: dict) -> bool:
        """Whether OUTPUT holds the finished run it says it does: _SUCCESS, and every part as the run recorded it
        when it finished (one listing of names and sizes, no part read). A part deleted or changed since is computed
        again: _SUCCESS goes first, so that no reader takes the output for whole meanwhile, then the changed parts."""
        if not self.store.exists(SUCCESS):
            return False
        changed = changed_since_finished(self.store, info)
        if not changed:
            return True
        log.warning("%s was finished, but parts are missing or changed since (%s): removing %s and computing them "
                    "again", self.store, first_few(changed), SUCCESS,
                    extra={"event": "finished_run_incomplete", "parts": changed[:100]})
        self.store.remove(SUCCESS)
        for index in changed:
            self.store.remove(part_name(index))
        return False

    def check_still_ours(self, run_identity: dict) -> None:
        """Once this process's record is live, OUTPUT must still hold its job's start: a start of another job that
        found the start abandoned just before (between its create and this record) replaced it."""
        info = read_run_info(self.store)
        if not info or differences(info["identity"], run_identity):
            raise UsageError(f"{self.store} was taken by another job starting at the same moment (fingerprint "
                             f"{info.get('fingerprint')}); use another output.path for this job")

    def discard(self) -> None:
        """--fresh: remove the run's own files, refused while another process is writing OUTPUT.

        In an order that leaves a run a plain rerun can resume wherever the discard is killed: _SUCCESS first (a
        finished run that has lost parts would otherwise look finished), _batchrun.json last (parts without it would
        look like another program's files)."""
        store = self.store
        live = [record for record in worker_records(store) if record["live"]]
        if live:
            raise OutputBusy(f"--fresh would discard {store} while {len(live)} live process(es) write it, e.g. pid "
                             f"{live[0].get('pid')} on {live[0].get('host')}; retry when they have finished")
        names = store.names()
        for name in (SUCCESS, EVAL, PROGRESS):
            store.remove(name)
        for name in names:
            if committed_parts([name]) or CLAIM_PATTERN.fullmatch(name) or WORKER_PATTERN.fullmatch(name):
                store.remove(name)
        for name in names:  # after the parts, so that a discard killed midway leaves no part without its metrics
            if is_metrics(name):
                store.remove(name)
        store.remove(RUN_INFO)

    def remove_leftovers(self) -> None:
        """Temporary files of processes killed mid-write (never one of a live process, which may be mid-write)."""
        for name in self.store.names():
            if is_leftover(self.store, name):
                self.store.remove(name)

    def verified_parts(self, run_fingerprint: str, rows_per_part: int,
                       split_start: int | None = None) -> dict[int, PartFacts]:
        """Committed parts whose footers check out; a truncated, unreadable or foreign part is removed and redone."""
        done = {}
        for index in sorted(committed_parts(self.store.names())):
            facts = read_part_facts(self.store, index, run_fingerprint, rows_per_part, split_start)
            if facts is None:
                log.warning("%s is damaged or not from this run: it will be computed again", part_name(index))
                self.store.remove(part_name(index))
            else:
                done[index] = facts
        return done

    def record_run(self, info: dict) -> None:
        """_batchrun.json gets the manifest, versions and resolved device from the first process to load the
        model; `info` is that record, the start time kept from the one prepare created."""
        recorded = read_run_info(self.store)
        if recorded.get("manifest") is not None:
            return
        self.store.put(RUN_INFO, json.dumps({**info, "started": recorded.get("started", now())}, indent=2,
                                            default=str).encode())

    def finish(self, done: dict[int, PartFacts], total: int, progress: dict, scores: dict | None) -> bool:
        """Every part is committed and this process holds the finish claim: the run's totals, part sizes and
        processes into _batchrun.json, the scores, the complete progress, then _SUCCESS, then no claims or stopped
        records left. False when _SUCCESS was there already (another process judged this one dead)."""
        store = self.store
        info = read_run_info(store)
        info["finished"] = now()
        info["rows"] = sum(facts.rows for facts in done.values())  # what a rerun's exit code is judged by
        info["failed_rows"] = sum(facts.failed_rows for facts in done.values())
        info["part_bytes"] = part_sizes(store, total)  # what a rerun and status check the parts against
        info["processes"] = _process_summaries(worker_records(store))
        if scores is not None:  # before _SUCCESS: a finished run has its scores
            write_scores(store, scores)
        store.put(RUN_INFO, json.dumps(info, indent=2, default=str).encode())
        write_progress(store, progress)
        written = store.create(SUCCESS, b"")
        self.remove_claims_and_records()
        return written

    def remove_claims_and_records(self) -> None:
        """The finished job needs no claims, no records of processes that have stopped, and no leftovers."""
        store = self.store
        self.remove_leftovers()
        for name in store.names():
            if CLAIM_PATTERN.fullmatch(name):
                store.remove(name)
        for record in worker_records(store):
            if not record["live"]:
                remove_worker_record(store, record["worker"])

    def finished_totals(self, rows_per_part: int) -> tuple[int, int]:
        """(rows, failed rows) of a finished run: as _batchrun.json recorded them when it finished; runs finished
        before it recorded them are counted from the part footers."""
        info = read_run_info(self.store)
        rows, failed_rows = recorded_totals(info)
        if rows is None:
            done = self.verified_parts(info.get("fingerprint"), rows_per_part, split_start=None)
            rows, failed_rows = sum(f.rows for f in done.values()), sum(f.failed_rows for f in done.values())
        return rows, failed_rows


def refuse_fresh_for_a_shard(fresh: bool, layout) -> None:
    if fresh and layout.num_shards > 1:
        raise UsageError("--fresh with --num-shards would discard the other shards' parts; "
                         "discard OUTPUT once before starting the shards (or use a new output.path)")


def _process_summaries(records: list[dict]) -> list[dict]:
    """Who computed the job, for _batchrun.json: one entry per process that took part."""
    keys = ("host", "pid", "rank", "world_size", "shard_index", "num_shards", "device", "parts_done", "rows_done",
            "rows_per_second", "input_read")
    return [{key: record.get(key) for key in keys} for record in sorted(records, key=lambda r: r.get("started", 0))]
