"""`rdpt mlflow-server start|stop|status` and `rdpt runs list|compare|sync`."""

from __future__ import annotations

import argparse
import sys

SERVER_EPILOG = """\
examples:
  rdpt mlflow-server start                      # ./mlflow/{mlflow.db,artifacts/}, port 5000 if free
  rdpt mlflow-server start --root demo/mlflow --port 5001
  rdpt mlflow-server status --root demo/mlflow
  rdpt mlflow-server stop --root demo/mlflow

`start` is idempotent: when the server of that root is already up it prints its URL.
The URL is also written to ROOT/server.url (pid in ROOT/server.pid, log in ROOT/server.log).
Point training at it with MLFLOW_TRACKING_URI=$(cat ROOT/server.url) or tracking.uri=..."""

RUNS_EPILOG = """\
examples:
  rdpt runs list --experiment rdpt
  rdpt runs list --filter "params.model.hidden_size = '128'" --format csv
  rdpt runs compare lr3e-4 lr1e-3 --experiment rdpt --out comparisons/lr
  rdpt runs compare 0f3c...e1 9a7b...42 --format json

Runs are named by run id or run name (a name must be unique in the searched experiments).
The tracking URI is --tracking-uri, else MLFLOW_TRACKING_URI, else the server started by
`rdpt mlflow-server start` (root ./mlflow or RDPT_MLFLOW_ROOT).
`compare` writes loss_vs_tokens.png, loss_vs_r.png and comparison.json to --out and logs them
as artifacts comparisons/vs-<ids>/ to each compared run (--no-log to skip)."""


def register(subparsers) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser(
        "mlflow-server",
        help="start/stop a local MLflow tracking server (sqlite, 127.0.0.1)",
        description="Run a local MLflow tracking server in the background: sqlite database and "
        "artifact store under --root, bound to 127.0.0.1.",
        epilog=SERVER_EPILOG,
        formatter_class=fmt,
    )
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument(
        "--root", default=None, help="server directory (default ./mlflow or $RDPT_MLFLOW_ROOT)"
    )
    p.add_argument("--port", type=int, default=None, help="port (default 5000 if free)")
    p.set_defaults(func=server_handler)

    p = subparsers.add_parser(
        "runs",
        help="list and compare training runs in MLflow",
        description="Tables of runs (status, tokens, loss, loss at r = 1/8/32, tokens/s) and "
        "side-by-side comparisons of runs with plots.",
        epilog=RUNS_EPILOG,
        formatter_class=fmt,
    )
    sub = p.add_subparsers(dest="runs_command", metavar="ACTION", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--experiment", "-e", default=None, help="experiment name (default: all)")
    common.add_argument("--tracking-uri", default=None, help="server URL or sqlite:///file.db")
    common.add_argument("--format", choices=["md", "csv", "json"], default="md")
    q = sub.add_parser(
        "list",
        parents=[common],
        help="table of runs",
        epilog=RUNS_EPILOG,
        formatter_class=fmt,
        description="List runs, newest first.",
    )
    q.add_argument(
        "--filter",
        default=None,
        help='MLflow filter, e.g. "params.optim.lr = \'0.001\'" or "metrics.`train/loss` < 3"',
    )
    q.add_argument("--max-results", type=int, default=1000)
    q.set_defaults(func=runs_list_handler)
    q = sub.add_parser(
        "compare",
        parents=[common],
        help="compare two or more runs",
        epilog=RUNS_EPILOG,
        formatter_class=fmt,
        description="Params that differ, metrics side by side, plots.",
    )
    q.add_argument("runs", nargs="+", metavar="RUN", help="run ids or run names")
    q.add_argument(
        "--out",
        default=None,
        help="directory for plots and comparison.json (default comparisons/vs-<ids>)",
    )
    q.add_argument("--no-log", action="store_true", help="do not log the plots to the runs")
    q.set_defaults(func=runs_compare_handler)
    q = sub.add_parser(
        "sync",
        help="deliver what a run's tracker could not send to MLflow (exactly once)",
        epilog="example:\n  rdpt runs sync runs/tiny           # after the server was down",
        formatter_class=fmt,
        description="Replay the metric lines of RUN_DIR/metrics.jsonl that never reached MLflow "
        "and the params, tags, artifacts and final status kept in mlflow_pending.json; a line "
        "already delivered is never sent twice.",
    )
    q.add_argument("run_dir", metavar="RUN_DIR", help="a training run directory")
    q.add_argument("--tracking-uri", default=None, help="default: the run's own URI")
    q.set_defaults(func=runs_sync_handler)


def server_handler(args) -> int:
    from pipeline.tracking.runs import default_server_root
    from pipeline.tracking.server import running_server, start_detached, stop_detached

    root = args.root or default_server_root()
    if args.action == "start":
        url, started = start_detached(root, args.port)
        print(url)
        print(
            f"MLflow server {'started' if started else 'already running'} at {url} "
            f"(root {root}); export MLFLOW_TRACKING_URI={url}",
            file=sys.stderr,
        )
        return 0
    if args.action == "stop":
        stopped = stop_detached(root)
        print("stopped" if stopped else f"no MLflow server running for {root}")
        return 0
    running = running_server(root)
    if running:
        print(f"running pid {running[0]} at {running[1]}")
        return 0
    print(f"not running (root {root})")
    return 1


def runs_list_handler(args) -> int:
    from pipeline.tracking.runs import format_rows, list_runs

    rows = list_runs(args.tracking_uri, args.experiment, args.filter, args.max_results)
    print(format_rows(rows, args.format))
    if args.format == "md":
        print(f"\n{len(rows)} run(s)")
    return 0


def runs_compare_handler(args) -> int:
    from pipeline.tracking.runs import compare_runs, format_comparison

    result = compare_runs(
        args.runs, args.tracking_uri, args.experiment, args.out, log_to_runs=not args.no_log
    )
    print(format_comparison(result, args.format), end="")
    return 0


def runs_sync_handler(args) -> int:
    from pipeline.tracking.sync import sync_run

    r = sync_run(args.run_dir, args.tracking_uri)
    print(
        f"run {r['run_id']} at {r['tracking_uri']}: replayed {r['metric_lines']} metric "
        f"line(s), status {r['status']}" + ("" if r["delivered"] else "; NOT everything arrived")
    )
    return 0 if r["delivered"] else 1
