"""The command line (SPEC §2): run, status, run-now, validate, plugins, --version."""

from __future__ import annotations

import argparse
import json
import os
import sys

from supervisor import __version__
from supervisor.config import EX_CONFIG, ConfigError, config_path, load_config

EX_UNAVAILABLE = 69


def main(argv: list[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE",
                        help="config file (default: $ASSESSMENT_RUNTIME_CONFIG, else /etc/assessment-runtime/config.toml)")
    parser = argparse.ArgumentParser(prog="assessment-runtime", parents=[common],
                                     description="Runs compliance assessment plugins on a schedule and delivers "
                                                 "their results durably.")
    parser.add_argument("--version", action="version", version=f"assessment-runtime {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("run", parents=[common], help="run the service in the foreground")
    p = sub.add_parser("status", parents=[common], help="show the running service's status")
    p.add_argument("--json", action="store_true", help="print the status JSON")
    p = sub.add_parser("run-now", parents=[common], help="run one job now, outside its schedule")
    p.add_argument("job_uuid", metavar="JOB_UUID")
    p = sub.add_parser("validate", parents=[common], help="check the config and spec files offline")
    p.add_argument("paths", nargs="*", metavar="PATH", help="spec files or folders of spec files")
    sub.add_parser("plugins", parents=[common], help="list the plugins found in plugin_dirs")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"assessment-runtime: config error: {e}", file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130


def cmd_run(args) -> int:
    from runner import linux
    from supervisor.service import Service

    linux.set_title("assessment-runtime: supervisor")  # what fits in our command line
    service = Service(config_path(args.config))
    try:
        return service.run()
    except OSError as e:
        print(f"assessment-runtime: cannot start: {e}", file=sys.stderr)
        return 1


def _control(args) -> str:
    return os.path.join(load_config(config_path(args.config)).run_dir, "control.sock")


def cmd_status(args) -> int:
    from supervisor.control import NoService, request

    try:
        code, body = request(_control(args), "GET", "/status")
    except NoService as e:
        print(f"assessment-runtime: {e}", file=sys.stderr)
        return EX_UNAVAILABLE
    if code != 200:
        print(f"assessment-runtime: status failed: HTTP {code}: {body.decode(errors='replace')}", file=sys.stderr)
        return 1
    doc = json.loads(body)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(render_status(doc))
    return 0


def cmd_run_now(args) -> int:
    from supervisor.control import NoService, request

    try:
        code, body = request(_control(args), "POST", f"/jobs/{args.job_uuid}/run")
    except NoService as e:
        print(f"assessment-runtime: {e}", file=sys.stderr)
        return EX_UNAVAILABLE
    if code in (200, 202):
        print(f"run of job {args.job_uuid} requested")
        return 0
    try:
        message = json.loads(body).get("error", body.decode())
    except ValueError:
        message = body.decode(errors="replace")
    print(f"assessment-runtime: {message}", file=sys.stderr)
    return 1


def cmd_validate(args) -> int:
    from supervisor.folder import read_spec_file, spec_files

    problems: list[str] = []
    paths = list(args.paths)
    if args.config:
        try:
            config = load_config(args.config)
            print(f"{args.config}: ok")
            if not paths and config.specs is not None:
                paths.append(config.specs.dir)
        except ConfigError as e:
            problems.append(str(e))
    checked = 0
    for path in paths:
        try:
            files = spec_files(path) if os.path.isdir(path) else [path]
        except OSError as e:
            problems.append(f"{path}: cannot read: {e.strerror}")
            continue
        for file in files:
            specs, rejected = read_spec_file(file)
            checked += len(specs)
            problems += [r.reason for r in rejected]
            for spec in specs:
                print(f"{file}: {spec.job.uuid} ok (revision {spec.revision})")
    for problem in problems:
        print(problem, file=sys.stderr)
    if not args.config and not paths:
        print("nothing to validate: give --config and/or spec files or folders", file=sys.stderr)
        return 1
    return 1 if problems else 0


def cmd_plugins(args) -> int:
    from runner.plugin import list_plugins

    config = load_config(config_path(args.config))
    rows = [("NAME", "VERSION", "PROTOCOL", "NETWORK", "SHA256", "PATH")]
    for p in list_plugins(config.plugin_dirs):
        rows.append((p["name"], p["version"], p.get("protocol") or "-", "yes" if p.get("network") else "no",
                     p.get("sha256") or f"error: {p.get('error')}", p.get("path") or "-"))
    print(_table(rows))
    return 0


def _local_time(iso: str | None, seconds: float | None) -> str:
    """The next run in this host's local time, and how far off it is."""
    if not iso:
        return "-"
    import datetime
    try:
        when = datetime.datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone()
    except ValueError:
        return iso
    return when.strftime("%Y-%m-%d %H:%M:%S %Z") + (f" (in {seconds:.0f}s)" if seconds is not None else "")


def render_status(doc: dict) -> str:
    sandbox = doc.get("sandbox") or {}
    confined = [k for k, on in (sandbox.get("confine") or {}).items() if on]
    lines = [f"assessment-runtime {doc['version']}  pid {doc['pid']}  runtime {doc['runtime_uuid']}",
             f"started {doc['started_at']}",
             f"sandbox: cgroup {sandbox.get('cgroup', '-')}, Landlock ABI {sandbox.get('landlock_abi', 0)} "
             f"(confines: {', '.join(confined).replace('_', ' ') or 'nothing'}), "
             f"user per job: {'yes' if sandbox.get('user_per_job') else 'no'}", ""]
    lines.append("SOURCES")
    rows = [("KIND", "LOCATION", "REVISION", "LAST SUCCESS", "FAILURES", "LAST ERROR")]
    for s in doc["sources"]:
        rows.append((s["kind"], s["location"], s["revision"] or "-", s["last_success"] or "never",
                     str(s["consecutive_failures"]), s["last_error"] or "-"))
    lines += [_table(rows), "", "JOBS"]
    rows = [("UUID", "TITLE", "PLUGIN", "SCHEDULE", "STATE", "PID", "UID", "RUNS", "SKIPPED", "RESTARTS",
             "NEXT RUN (LOCAL)", "LAST RESULT")]
    for j in doc["jobs"]:
        last = j["last_result"]
        last_text = "-" if not last else last["status"] + (f" ({last['reason']})" if last.get("reason") else "")
        rows.append((j["uuid"], j["title"] or "-", j["plugin"] or "-", j.get("schedule") or "-", j["state"],
                     str(j["pid"] or "-"), str(j["uid"] if j.get("uid") is not None else "-"), str(j["runs"]),
                     str(j.get("skipped", 0)), str(j["restarts"]), _local_time(j.get("next_run_at"), j["next_run_in"]),
                     last_text))
    lines.append(_table(rows))
    if doc["rejected"]:
        lines += ["", "REJECTED SPECS"]
        lines += [f"  {r['uuid'] or '?'}  {r['source']}: {r['reason']}" for r in doc["rejected"]]
    pub = doc["publisher"]
    lines += ["", f"PUBLISHER  pid {pub['pid'] or '-'}  outbox {pub['outbox_results']} results / "
                  f"{pub['outbox_bytes']} bytes  dropped {pub['dropped']}"]
    rows = [("SINK", "KIND", "DELIVERED", "PENDING", "FAILURES", "DEAD LETTERS", "LAST ERROR")]
    for s in pub["sinks"]:
        rows.append((s["name"], s["kind"], str(s["delivered"]), str(s["pending"]), str(s["failures"]),
                     str(s["dead_lettered"]), s["last_error"] or "-"))
    lines.append(_table(rows))
    return "\n".join(lines)


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


COMMANDS = {"run": cmd_run, "status": cmd_status, "run-now": cmd_run_now, "validate": cmd_validate,
            "plugins": cmd_plugins}

if __name__ == "__main__":
    sys.exit(main())
