"""`rdpt jobs`: the jobs submitted from this project, with their Slurm state; clean cancel.

State comes from `squeue` (queued/running), then `scontrol show job` (finished in the last
MinJobAge seconds), then `sacct` (the accounting DB, or the job-completion log with `-c`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from launch import registry, slurm_tools
from pipeline.common.errors import RdptLaunchError


def job_rows(limit: int | None = None) -> list[dict[str, Any]]:
    """One row per registered job: registry fields + state/nodes/elapsed from Slurm."""
    records = registry.read()
    if limit:
        records = records[-limit:]
    ids = [int(r["job_id"]) for r in records]
    live = slurm_tools.squeue(ids) if ids and slurm_tools.available("squeue") else {}
    rows = []
    missing = []
    for rec in records:
        jid = str(rec["job_id"])
        row = {
            "id": jid,
            "name": rec.get("name", ""),
            "kind": rec.get("kind", ""),
            "state": "UNKNOWN",
            "nodes": "",
            "elapsed": "",
            "reason": "",
            "run_dir": rec.get("run_dir", ""),
            "mlflow_run": rec.get("mlflow_run_id") or "",
            "restarts": "",
        }
        if jid in live:
            row.update({k: live[jid][k] for k in ("state", "nodes", "elapsed", "reason")})
        if rec.get("array") and slurm_tools.available("scontrol"):
            tasks = slurm_tools.scontrol_jobs(jid)  # one record per task (pending ones merged)
            if tasks:
                row.update(
                    state=summarise_states(tasks),
                    nodes=tasks[0].get("NumNodes", ""),
                    elapsed=max(t.get("RunTime", "") for t in tasks),
                )
        elif jid not in live or row["state"] != "PENDING":
            info = slurm_tools.scontrol_job(jid) if slurm_tools.available("scontrol") else None
            if info:
                row["restarts"] = info.get("Restarts", "")
                if jid not in live:
                    row.update(
                        state=info.get("JobState", "UNKNOWN"),
                        nodes=info.get("NumNodes", ""),
                        elapsed=info.get("RunTime", ""),
                        reason=info.get("Reason", ""),
                    )
        if row["state"] == "UNKNOWN":
            missing.append(int(jid))
        if rec.get("cancelled_at") and row["state"] == "UNKNOWN":
            row["state"] = "CANCELLED"
        rows.append(row)
    if missing:
        finished = slurm_tools.sacct(missing)
        for row in rows:
            if row["id"] in finished and row["state"] in ("UNKNOWN", "CANCELLED"):
                f = finished[row["id"]]
                row.update(state=f["state"].split()[0], nodes=f["nodes"], elapsed=f["elapsed"])
    return rows


def summarise_states(tasks: list[dict[str, str]]) -> str:
    """Array task records -> `COMPLETED` when all agree, else `COMPLETED:2,RUNNING:1`."""
    counts: dict[str, int] = {}
    for t in tasks:
        ids = t.get("ArrayTaskId", "0")
        n = _count_ids(ids)
        counts[t.get("JobState", "UNKNOWN")] = counts.get(t.get("JobState", "UNKNOWN"), 0) + n
    if len(counts) == 1:
        return next(iter(counts))
    return ",".join(f"{k}:{v}" for k, v in sorted(counts.items()))


def _count_ids(spec: str) -> int:
    """`0-2,5` -> 4 (a `%N` throttle suffix is ignored)."""
    total = 0
    for part in spec.split("%")[0].split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            total += int(hi) - int(lo) + 1
        elif part.strip().isdigit():
            total += 1
    return total or 1


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return f"no jobs submitted from this project ({registry.registry_path()} is empty)"
    header = ["JOBID", "NAME", "STATE", "NODES", "ELAPSED", "RESTARTS", "RUN DIR", "MLFLOW RUN"]
    table = [header]
    for r in rows:
        reason = r["reason"].strip("()")  # squeue %R says "(Dependency)", scontrol "Dependency"
        state = r["state"] + (f" ({reason})" if r["state"] == "PENDING" and reason else "")
        run_dir = _short(r["run_dir"])
        table.append(
            [
                r["id"],
                r["name"],
                state,
                str(r["nodes"]),
                r["elapsed"],
                str(r["restarts"]),
                run_dir,
                r["mlflow_run"],
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)


def _short(path: str) -> str:
    if not path:
        return ""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def cancel(job_id: int) -> list[int]:
    """Cancel a job of this project and the later jobs of its chain; return the ids cancelled.

    A training job gets TERM, checkpoints and exits 85; the marker file written first tells its
    job script not to requeue it. Pending chain successors are cancelled with it, so the run
    does not start again behind your back.
    """
    rec = registry.find(job_id)
    if rec is None:
        raise RdptLaunchError(
            f"job {job_id} was not submitted from this project (not in {registry.registry_path()})"
        )
    ids = [job_id]
    if rec.get("kind") == "train":
        later = [
            r
            for r in registry.read()
            if r.get("run_dir") == rec["run_dir"]
            and r.get("kind") == "train"
            and int(r["job_id"]) > job_id
            and r.get("chain", [1, 1])[1] > 1
        ]
        ids += [int(r["job_id"]) for r in later if not r.get("cancelled_at")]
        marker_dir = Path(rec["run_dir"]) / "slurm"
        if marker_dir.is_dir():
            for jid in ids:
                (marker_dir / f"cancelled-{jid}").write_text("cancelled by rdpt jobs cancel\n")
    elif rec.get("kind") == "prep-array":
        ids += [
            int(r["job_id"])
            for r in registry.read()
            if r.get("kind") == "prep-finalize" and r.get("dependency") == f"afterok:{job_id}"
        ]
    # NOTE: later jobs first, so none of them starts in the gap after the first one ends.
    slurm_tools.run_slurm(["scancel", *[str(j) for j in reversed(ids)]])
    for jid in ids:
        registry.append({"job_id": jid, "cancelled_at": _now()})
    return ids


def _now() -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
