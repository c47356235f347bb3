"""The ``p2pnn`` command: a user's tool for a node's REST API (the daemon is ``p2pnn-node``).

Every subcommand prints for people by default and JSON with ``--json``;
every error is one line on stderr. Exit status: 0 done (``watch``: the task
succeeded), 1 an error or a failed task, 2 a usage or configuration error,
3 a cancelled task, 124 ``watch --timeout`` ran out, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from p2pnn import __version__
from p2pnn.client._errors import ApiError, ClientError, ConnectError, TaskTimeout
from p2pnn.client._settings import CONFIG_ENV, DEFAULT_URL, TOKEN_ENV, URL_ENV, resolve
from p2pnn.client._sync import Client
from p2pnn.tasks import DATASETS, DEVICES, KINDS, MODELS, OPTIMIZERS, STOPPING_RULES, SWEEP_METRICS, State

EXIT_FAILED = 1  # an error, or the watched task failed
EXIT_USAGE = 2  # bad arguments or client configuration: nothing was asked of the node
EXIT_CANCELLED = 3  # the watched task was cancelled
EXIT_TIMEOUT = 124  # as timeout(1) does: --timeout ran out, the task still runs
EXIT_INTERRUPTED = 130
OUTCOME_EXIT = {State.SUCCEEDED.value: 0, State.FAILED.value: EXIT_FAILED, State.CANCELLED.value: EXIT_CANCELLED}
LS_DEFAULT_LIMIT = 20  # one screenful
PIPE_WIDTH = 200  # output to a pipe or file: wide enough that tables keep one row per line

DESCRIPTION = f"""\
p2pnn talks to a p2pnn node's REST API: submit training, evaluation and
inference tasks, watch them with a live progress bar, list, inspect and cancel
them, fetch their artifacts, and see the swarm's nodes.

The node and token come from --url/--token, else ${URL_ENV} / ${TOKEN_ENV},
else the config file (${CONFIG_ENV} or ~/.config/p2pnn/client.toml, with keys
url, token or token_file); the URL defaults to {DEFAULT_URL}.
A token is minted on a node with: p2pnn-node token --role operator --sub NAME
"""

EXAMPLES = """\
examples:
  p2pnn submit --kind train --dataset digits --epochs 20      # prints the task id
  p2pnn watch ID                                              # live bar; exits with the outcome
  p2pnn submit spec.json --watch
  p2pnn submit --kind infer --model-task ID --inputs samples.json
  p2pnn ls --state running ; p2pnn get ID --json ; p2pnn cancel ID
  p2pnn artifact ID model.safetensors -o model.safetensors
  p2pnn nodes
"""


class UsageError(Exception):
    """Arguments that make no request possible; exit status 2."""


# --- arguments ---------------------------------------------------------------


def _connection_flags(p: argparse.ArgumentParser, *, top: bool) -> None:
    # Given to the top parser and to every subcommand, so `p2pnn --json ls` and
    # `p2pnn ls --json` both work; SUPPRESS keeps a subcommand from resetting a value given before it.
    default = None if top else argparse.SUPPRESS
    p.add_argument("--url", default=default, help=f"node API URL (default: ${URL_ENV}, the config file, {DEFAULT_URL})")
    p.add_argument("--token", default=default, help=f"bearer token (default: ${TOKEN_ENV}, the config file)")
    p.add_argument("--config", default=default, metavar="FILE", help=f"client config file (default: ${CONFIG_ENV} or ~/.config/p2pnn/client.toml)")
    p.add_argument("--json", action="store_true", default=False if top else argparse.SUPPRESS, help="print JSON for scripts")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2pnn", description=DESCRIPTION, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"p2pnn {__version__}")
    _connection_flags(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=summary, description=summary)
        _connection_flags(p, top=False)
        return p

    submit = command("submit", "submit a task from a JSON spec file and/or flags; prints its id")
    submit.add_argument("spec", nargs="?", metavar="SPEC", help="JSON file with a spec or a list of specs ('-': stdin); flags below override its fields")
    submit.add_argument("--kind", choices=KINDS, help="task kind (default: the file's, else train)")
    submit.add_argument("--model", choices=MODELS, help="model name (train)")
    submit.add_argument("--dataset", choices=DATASETS, help="dataset name (train; evaluate: default the model task's test split)")
    submit.add_argument("--epochs", type=int, help="training epochs")
    submit.add_argument("--lr", type=float, help="learning rate")
    submit.add_argument("--batch-size", type=int, help="batch size")
    submit.add_argument("--optimizer", choices=OPTIMIZERS)
    submit.add_argument("--seed", type=int)
    submit.add_argument("--device", choices=DEVICES)
    submit.add_argument("--model-task", metavar="ID", help="the succeeded train task whose model to use (evaluate, infer)")
    submit.add_argument("--inputs", metavar="FILE", help="JSON file with a list of samples (infer)")
    submit.add_argument("--payload", metavar="JSON", help="payload (echo), as JSON")
    submit.add_argument("--max-attempts", type=int, help="retries if a worker dies (1-20)")
    submit.add_argument("--set", action="append", default=[], metavar="PATH=JSON", help="any other field, e.g. --set model.hidden=[64,64] (repeatable)")
    submit.add_argument("--idempotency-key", metavar="KEY", help="the same key again returns the same task")
    submit.add_argument("--watch", action="store_true", help="then watch it, as `p2pnn watch`")
    submit.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="with --watch: give up after this long")

    watch = command("watch", "follow a task live (progress bar for training) until it ends; exits with its outcome")
    watch.add_argument("id", metavar="ID")
    watch.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="give up after this long (exit 124; the task keeps running)")

    ls = command("ls", "list tasks, newest first")
    ls.add_argument("--state", choices=[s.value for s in State])
    ls.add_argument("--kind", choices=KINDS)
    ls.add_argument("--limit", type=int, default=LS_DEFAULT_LIMIT, help=f"how many (default {LS_DEFAULT_LIMIT})")
    ls.add_argument("--parent", metavar="ID", help="only the trials of this sweep")

    get = command("get", "show one task: state, progress, result, error, spec")
    get.add_argument("id", metavar="ID")

    cancel = command("cancel", "cancel a task (a running one is stopped)")
    cancel.add_argument("id", metavar="ID")

    artifact = command("artifact", "download an artifact of a task, e.g. model.safetensors")
    artifact.add_argument("id", metavar="ID")
    artifact.add_argument("name", metavar="NAME")
    artifact.add_argument("-o", "--output", metavar="FILE", help="where to write it (default: NAME here; '-': stdout)")

    sweep = command("sweep", "submit a hyper-parameter sweep over a base train spec; prints its id")
    sweep.add_argument("base", nargs="?", metavar="BASE", help="JSON file with the base train spec ('-': stdin; default: digits with the defaults)")
    sweep.add_argument("--space", action="append", default=[], metavar="PATH=JSON", required=True,
                       help='a dimension (repeatable): a list is a grid, --space model.hidden=[[64],[128,64]]; '
                            'an object is drawn, --space \'lr={"log_uniform":[1e-4,1e-2]}\'')
    sweep.add_argument("--trials", type=int, help="trial budget (default: the whole grid, or 10 with drawn dimensions)")
    sweep.add_argument("--parallelism", type=int, help="trials queued or running at once (default 2)")
    sweep.add_argument("--metric", choices=SWEEP_METRICS, help="what the best trial is chosen by (default test_accuracy)")
    sweep.add_argument("--mode", choices=("max", "min"), help="max for accuracies (default), min for losses")
    sweep.add_argument("--early-stopping", choices=STOPPING_RULES, help="end trials worse than the median early (default median)")
    sweep.add_argument("--seed", type=int, help="seed of the trial draw (default 0)")
    sweep.add_argument("--idempotency-key", metavar="KEY", help="the same key again returns the same sweep")
    sweep.add_argument("--watch", action="store_true", help="then watch it, and print its trial table when it ends")
    sweep.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="with --watch: give up after this long")

    command("nodes", "the swarm's nodes: roles, principal and term, free slots, GPUs, health")
    return parser


# --- submit ------------------------------------------------------------------


def _read_json(path: str, what: str) -> Any:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"{what} {path}: {exc.strerror}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{what} {path}: not JSON: {exc}") from None


def _set_path(spec: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node = spec
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UsageError(f"--set {path}: {part} is not an object")
        node = child
    node[last] = value


def build_specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The spec(s) to submit: the file's (one or a list), each with the flags applied over it."""
    base: Any = _read_json(args.spec, "spec file") if args.spec else {}
    specs = base if isinstance(base, list) else [base]
    if not specs or not all(isinstance(s, dict) for s in specs):
        raise UsageError("spec file: expected a JSON object or a non-empty list of objects")
    flags: dict[str, Any] = {
        "kind": args.kind, "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
        "optimizer": args.optimizer, "seed": args.seed, "device": args.device, "model_task": args.model_task,
        "max_attempts": args.max_attempts,
    }
    if args.model:
        flags["model"] = {"name": args.model}
    if args.dataset:
        flags["dataset"] = {"name": args.dataset}
    if args.inputs:
        flags["inputs"] = _read_json(args.inputs, "inputs file")
    if args.payload is not None:
        try:
            flags["payload"] = json.loads(args.payload)
        except ValueError:
            flags["payload"] = args.payload  # a bare word is a string payload
    out = []
    for spec in specs:
        spec = json.loads(json.dumps(spec))  # a copy per spec
        for key, value in flags.items():
            if value is None:
                continue
            if isinstance(value, dict) and isinstance(spec.get(key), dict):
                spec[key] = {**spec[key], **value}  # --model cnn keeps the file's model options
            else:
                spec[key] = value
        spec.setdefault("kind", "train")
        if spec["kind"] == "train":
            spec.setdefault("dataset", {"name": "digits"})
        for item in args.set:
            _set_path(spec, *_assignment(item, "--set"))
        out.append(spec)
    return out


def _assignment(item: str, flag: str) -> tuple[str, Any]:
    """``PATH=VALUE`` of a flag: the value as JSON, else the bare word as a string."""
    path, sep, raw = item.partition("=")
    if not sep or not path:
        raise UsageError(f"{flag} {item}: expected PATH=VALUE")
    try:
        return path, json.loads(raw)
    except ValueError:
        return path, raw


def build_sweep(args: argparse.Namespace) -> dict[str, Any]:
    """The sweep spec: the base file's train spec (or the default one) and a dimension per --space."""
    base = _read_json(args.base, "base spec file") if args.base else {"kind": "train", "dataset": {"name": "digits"}}
    if not isinstance(base, dict):
        raise UsageError("base spec file: expected a JSON object (a train spec)")
    base.setdefault("kind", "train")
    space = dict(_assignment(item, "--space") for item in args.space)
    spec: dict[str, Any] = {"kind": "sweep", "base": base, "space": space}
    for key in ("trials", "parallelism", "metric", "mode", "seed"):
        if getattr(args, key) is not None:
            spec[key] = getattr(args, key)
    if args.early_stopping:
        spec["early_stopping"] = {"rule": args.early_stopping}
    return spec


# --- output ------------------------------------------------------------------


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:
        console.width = PIPE_WIDTH
    return console


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _age(ts: float | None) -> str:
    if not ts:
        return "-"
    seconds = max(0.0, time.time() - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _metrics(progress: dict[str, Any] | None, *, short: bool = False) -> str:
    """One line of a train task's last epoch: what a person follows (``short``: for a table cell)."""
    if not progress:
        return ""
    parts = []
    if "epoch" in progress:
        parts.append(f"epoch {progress['epoch']}/{progress.get('epochs', '?')}")
    shown = (("loss", "loss"), ("test_accuracy", "test acc")) if short else (
        ("loss", "loss"), ("accuracy", "acc"), ("test_accuracy", "test acc"), ("test_loss", "test loss"))
    for key, label in shown:
        if isinstance(progress.get(key), (int, float)):
            parts.append(f"{label} {progress[key]:.4f}")
    return "  ".join(parts)


def _outcome(task: dict[str, Any]) -> str:
    """The last line of a watch: how the task ended and its headline figure."""
    state = task["state"]
    took = ""
    if task.get("started_at") and task.get("finished_at"):
        took = f" in {task['finished_at'] - task['started_at']:.1f} s"
    result = task.get("result") or {}
    if state == State.SUCCEEDED.value:
        figures = [f"{k} {result[k]:.4f}" for k in ("test_accuracy", "accuracy", "mse", "r2", "loss") if isinstance(result.get(k), (int, float))]
        if isinstance(result.get("classes"), list):  # infer: the predicted classes
            figures.append(f"classes {result['classes'][:10]}{' ...' if len(result['classes']) > 10 else ''}")
        if not figures and "payload" in result:
            figures.append(f"payload {json.dumps(result['payload'])[:80]}")
        return f"task {task['id']} succeeded{took}" + (f": {', '.join(figures)}" if figures else "")
    if state == State.FAILED.value:
        return f"task {task['id']} failed{took} (attempt {task.get('attempts')}): {task.get('error')}"
    return f"task {task['id']} cancelled"


# --- commands ----------------------------------------------------------------


def cmd_submit(client: Client, args: argparse.Namespace) -> int:
    specs = build_specs(args)
    if len(specs) == 1:
        tasks = [client.submit(specs[0], idempotency_key=args.idempotency_key)]
    else:
        tasks = client.submit_many(specs, idempotency_key=args.idempotency_key)
    if args.watch:
        if len(tasks) != 1:
            raise UsageError("--watch follows one task; the spec file held a list")
        if not args.json:
            _console(stderr=True).print(f"submitted {tasks[0]['kind']} task {tasks[0]['id']}")
        return _watch(client, tasks[0]["id"], args)
    if args.json:
        _print_json(tasks[0] if len(tasks) == 1 else tasks)
    else:
        for task in tasks:
            print(task["id"])  # alone on its line: ID=$(p2pnn submit ...)
    return 0


def cmd_sweep(client: Client, args: argparse.Namespace) -> int:
    sweep = client.submit(build_sweep(args), idempotency_key=args.idempotency_key)
    if not args.watch:
        if args.json:
            _print_json(sweep)
        else:
            print(sweep["id"])
        return 0
    if not args.json:
        _console(stderr=True).print(f"submitted sweep {sweep['id']}")
    code = _watch(client, sweep["id"], args)
    if not args.json:
        _print_trials(_console(), client.get(sweep["id"]))
    return code


def _print_trials(console: Any, sweep: dict[str, Any]) -> None:
    """A finished sweep's trial table, best first as its mode ranks them, and its best trial."""
    result = sweep.get("result") or {}
    trials = result.get("trials") or []
    if not trials:
        return
    from rich.table import Table

    metric = result.get("metric", "metric")
    table = Table(box=None, pad_edge=False)
    for column in ("TRIAL", "TASK", "STATE", metric.upper(), "EPOCHS", "STOPPED AT", "PARAMS"):
        table.add_column(column, no_wrap=True)
    for t in trials:
        value = t.get("metric")
        table.add_row(
            str(t.get("trial", "")), str(t.get("task_id", ""))[:8], str(t.get("state", "")),
            "-" if value is None else f"{value:.4f}", str(t.get("epochs", "-")),
            str(t.get("stopped_at_epoch") or "-"), json.dumps(t.get("params", {})),
        )
    console.print(table)
    best = result.get("best") or {}
    if best:
        console.print(f"best: trial {best.get('trial')} (task {best.get('task_id')}) {metric} {best.get('metric')} "
                      f"{json.dumps(best.get('params', {}))}; its weights: p2pnn artifact {best.get('task_id')} model.safetensors")
    if result.get("epochs_saved_fraction") is not None:
        console.print(f"early stopping saved {result['epochs_saved_fraction']:.0%} of {result.get('epochs_budget')} epochs")


def cmd_watch(client: Client, args: argparse.Namespace) -> int:
    return _watch(client, args.id, args)


def _watch(client: Client, task_id: str, args: argparse.Namespace) -> int:
    timeout = args.timeout  # None: no limit, a long training run is watched to its end
    if args.json:
        task = client.wait(task_id, timeout=timeout)
        _print_json(task)
        return OUTCOME_EXIT[task["state"]]
    console = _console(stderr=True)
    view = _LiveView(console, task_id) if console.is_terminal else _LineView(console, task_id)
    with view:
        task = client.wait(task_id, timeout=timeout, on_update=view.update)
    _console().print(_outcome(task))
    return OUTCOME_EXIT[task["state"]]




class _LiveView:
    """A rich progress bar: epochs of a training task, else a spinner with the task's state."""

    def __init__(self, console: Any, task_id: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[metrics]}"), TimeElapsedColumn(), console=console, transient=False,
        )
        self._bar = self._progress.add_task(f"{task_id[:8]} …", total=None, metrics="")

    def __enter__(self) -> "_LiveView":
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def update(self, task: dict[str, Any]) -> None:
        progress = task.get("progress") or {}
        total = progress.get("epochs") or (task["spec"].get("epochs") if task["kind"] == "train" else None)
        done = progress.get("epoch", 0)
        if task["state"] == State.SUCCEEDED.value and total:
            done = total
        self._progress.update(
            self._bar, description=f"{task['kind']} {task['id'][:8]} {task['state']}", total=total,
            completed=done, metrics=_metrics(progress, short=True),
        )


class _LineView:
    """Without a terminal (a pipe, a CI log): one line per change, no control characters."""

    def __init__(self, console: Any, task_id: str) -> None:
        self._console = console

    def __enter__(self) -> "_LineView":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, task: dict[str, Any]) -> None:
        self._console.print(f"{task['kind']} {task['id'][:8]} {task['state']}  {_metrics(task.get('progress'))}".rstrip())


def cmd_ls(client: Client, args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise UsageError("--limit: must be at least 1")
    tasks: list[dict[str, Any]] = []
    cursor = None
    while len(tasks) < args.limit:
        page = client.list(state=args.state, kind=args.kind, parent=args.parent, limit=min(args.limit - len(tasks), 100), cursor=cursor)
        tasks.extend(page["tasks"])
        cursor = page.get("next_cursor")
        if not cursor:
            break
    if args.json:
        _print_json(tasks)
        return 0
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("ID", "KIND", "STATE", "TRIES", "CREATED"):
        table.add_column(column, no_wrap=True)
    table.add_column("PROGRESS / ERROR", no_wrap=True, overflow="ellipsis")
    for t in tasks:
        detail = t.get("error") or _metrics(t.get("progress"), short=True)
        table.add_row(t["id"], t["kind"], t["state"], f"{t['attempts']}/{t['max_attempts']}", _age(t.get("created_at")), (detail or "")[:80])
    _console().print(table if tasks else "no tasks")
    return 0


def cmd_get(client: Client, args: argparse.Namespace) -> int:
    task = client.get(args.id)
    if args.json:
        _print_json(task)
        return 0
    console = _console()
    rows = [
        ("id", task["id"]), ("kind", task["kind"]), ("state", task["state"]), ("owner", task.get("owner")),
        ("attempts", f"{task['attempts']}/{task['max_attempts']}"), ("created", _age(task.get("created_at"))),
        ("progress", _metrics(task.get("progress")) or "-"), ("artifacts", ", ".join(task.get("artifacts") or []) or "-"),
    ]
    if task.get("error"):
        rows.append(("error", task["error"]))
    for key, value in rows:
        console.print(f"{key:<10} {value}")
    result = dict(task.get("result") or {})
    epochs = result.pop("epochs", None)
    if isinstance(epochs, list):
        result["epochs"] = f"[{len(epochs)} epochs; --json shows them]"
    if task["kind"] == "sweep":
        result.pop("trials", None)
    console.print(f"{'result':<10} {json.dumps(result) if result else '-'}")
    console.print(f"{'spec':<10} {json.dumps(task['spec'])}")
    if task["kind"] == "sweep":
        _print_trials(console, task)
    return 0


def cmd_cancel(client: Client, args: argparse.Namespace) -> int:
    task = client.cancel(args.id)
    if args.json:
        _print_json(task)
    else:
        print(f"task {task['id']}: {task['state']}{' (cancel requested)' if task.get('cancel_requested') else ''}")
    return 0


def cmd_artifact(client: Client, args: argparse.Namespace) -> int:
    data = client.artifact(args.id, args.name)
    target = args.output or args.name
    if target == "-":
        sys.stdout.buffer.write(data)
        return 0
    try:
        Path(target).write_bytes(data)
    except OSError as exc:
        raise UsageError(f"{target}: {exc.strerror}") from None
    if args.json:
        _print_json({"task": args.id, "name": args.name, "path": str(target), "bytes": len(data)})
    else:
        _console(stderr=True).print(f"wrote {target} ({len(data):,} bytes)")
    return 0


def cmd_nodes(client: Client, args: argparse.Namespace) -> int:
    nodes = client.nodes()
    cluster = client.cluster()
    if args.json:
        _print_json({"cluster": cluster, "nodes": nodes})
        return 0
    from rich.table import Table

    principal = cluster.get("principal")
    console = _console()
    swarm = cluster.get("swarm") or "(lone node)"
    console.print(f"swarm {swarm}  principal {principal[:12] if principal else '-'}  term {cluster.get('term')}  members {len(nodes)}")
    table = Table(box=None, pad_edge=False)
    for column in ("NODE", "ROLES", "AN", "API", "FREE", "GPU", "HEALTHY", "SEEN"):
        table.add_column(column, no_wrap=True)
    for n in sorted(nodes, key=lambda n: (n["id"] != principal, n["id"])):
        load = n.get("load") or {}
        gpus = (n.get("capabilities") or {}).get("gpus") or []
        table.add_row(
            n["id"][:12], ",".join(n.get("roles") or []) or "-", (n.get("an") or "-")[:12],
            (n.get("addresses") or {}).get("api", "-"), f"{load.get('free_slots', '?')}/{load.get('slots', '?')}",
            str(len(gpus)) if gpus else "-", "yes" if n.get("healthy") else "NO", _age(n.get("last_seen")),
        )
    console.print(table)
    return 0


COMMANDS = {
    "submit": cmd_submit, "watch": cmd_watch, "ls": cmd_ls, "get": cmd_get, "cancel": cmd_cancel,
    "artifact": cmd_artifact, "nodes": cmd_nodes, "sweep": cmd_sweep,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = resolve(args.url, args.token, config=args.config)
        with Client(settings.url, settings.token) as client:
            return COMMANDS[args.command](client, args)
    except UsageError as exc:
        print(f"p2pnn: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TaskTimeout as exc:
        print(f"p2pnn: {exc}; it keeps running (p2pnn watch {exc.task_id})", file=sys.stderr)
        return EXIT_TIMEOUT
    except ConnectError as exc:
        print(f"p2pnn: cannot reach the node: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ApiError as exc:
        where = f" ({exc.field})" if exc.field and exc.field not in exc.detail else ""
        print(f"p2pnn: {exc.error or 'error'}{where}: {exc.detail} [HTTP {exc.status}]", file=sys.stderr)
        return EXIT_FAILED
    except ClientError as exc:  # configuration: the URL, the config file
        print(f"p2pnn: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("p2pnn: interrupted (a submitted task keeps running)", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
