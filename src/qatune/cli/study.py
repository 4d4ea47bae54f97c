"""`qatune study FILE`: run a study (resumable), or show its cost (--dry-run), its state (--status), or rebuild
its results store (--rebuild-db)."""

from __future__ import annotations

import argparse
import sys

from qatune.cli.common import CliError, emit, table


def add(sub) -> None:
    st = sub.add_parser("study", help="run a declarative study (TOML): a grid of training runs, resumable")
    st.add_argument("file", help="study file, e.g. studies/offline.toml")
    st.add_argument("--dry-run", action="store_true", help="list the runs with cost estimates; train nothing")
    st.add_argument("--calibrate", action="store_true",
                    help="with --dry-run: time a few steps of each distinct run shape here and project wall times")
    st.add_argument("--status", action="store_true", help="show each run's status and scores")
    st.add_argument("--rebuild-db", action="store_true",
                    help="rebuild a damaged study.sqlite from the run directories (the old file is moved aside)")
    st.add_argument("--set", action="append", metavar="[ARM.]KEY=VALUE",
                    help="override an option for all arms (or one arm), e.g. --set train_data=/data/train.json; "
                         "a grid key replaces that axis (of all arms, or of the arm named)")
    st.add_argument("--dir", help="study directory (default: from the file, else studies-out/NAME)")
    st.add_argument("--launcher", choices=["local", "ray"], default="local",
                    help="local: worker processes on this machine; ray: Ray tasks on a local instance or a cluster")
    st.add_argument("--workers", type=int, help="runs at once (default: 1 on a CPU; GPUs x --runs-per-gpu)")
    st.add_argument("--runs-per-gpu", type=int, default=1, help="runs sharing each GPU (default 1)")
    st.add_argument("--threads", type=int,
                    help="CPU threads per run (default: cores / workers locally, 1 per Ray task)")
    st.add_argument("--ray-address", help="Ray cluster address (default: start a local Ray instance)")
    st.add_argument("--max-attempts", type=int, default=3, help="tries per run before it counts as failed")
    st.add_argument("--retry-failed", action="store_true", help="give failed runs a fresh set of attempts")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=study)


def study(args: argparse.Namespace) -> None:
    from qatune.study.launch import LaunchError, check_settings
    from qatune.study.studyfile import StudyError, load_study

    try:
        loaded = load_study(args.file, args.set or [], args.dir)
        check_settings(args.workers, args.runs_per_gpu, args.threads)  # checked first, whatever the mode
    except (StudyError, LaunchError) as e:
        raise CliError(str(e)) from e
    if args.max_attempts < 1:
        raise CliError(f"--max-attempts must be >= 1, got {args.max_attempts}")
    if args.calibrate and not args.dry_run:
        raise CliError("--calibrate only goes with --dry-run (it times steps and projects; it trains nothing)")
    if sum(map(bool, (args.dry_run, args.status, args.rebuild_db))) > 1:
        raise CliError("choose one of --dry-run, --status and --rebuild-db")
    if args.rebuild_db:
        _rebuild(loaded, args.json)
    elif args.dry_run:
        _dry_run(loaded, args)
    elif args.status:
        _status(loaded, args.json)
    else:
        _run(loaded, args)


def _run(loaded, args: argparse.Namespace) -> None:
    from qatune.study.driver import failed_configurations, run_study, status
    from qatune.study.launch import LaunchError, make_launcher

    try:
        launcher = make_launcher(args.launcher, args.workers, args.runs_per_gpu, args.threads, args.ray_address)
    except LaunchError as e:
        raise CliError(str(e)) from e
    print(f"study {loaded.name}: {loaded.size()} -> {loaded.directory}; {launcher.name} launcher, "
          f"{len(launcher.slots)} at a time ({launcher.slots[0].describe()}{', ...' if len(launcher.slots) > 1 else ''})",
          flush=True)
    counts = run_study(loaded, launcher, max_attempts=args.max_attempts, retry_failed=args.retry_failed)
    failed_tuning = failed_configurations(loaded)
    lines = [f"study {loaded.name}: {count_line(counts)} -> {loaded.directory} (qatune report {loaded.directory})"]
    emit({"directory": str(loaded.directory), **counts,
          **({"failed_configurations": [g.id for g, _ in failed_tuning]} if failed_tuning else {})}, args.json, lines)
    if counts.get("failed"):
        for s in status(loaded):
            if s["status"] == "failed":
                print(f"  failed: {s['run'].id} ({s['run'].arm}): "
                      f"{(s['error'] or '?').strip().splitlines()[-1][:200]}", file=sys.stderr)
        for g, why in failed_tuning:
            print(f"  failed: tuned configuration {g.id} ({configuration_name(g)}): {why[:400]}", file=sys.stderr)
        tuned = (f" ({len(failed_tuning)} tuned configuration(s) none of whose candidates reached a rung: "
                 f"{', '.join(g.id for g, _ in failed_tuning)})" if failed_tuning else "")
        raise CliError(f"{counts['failed']} run(s) failed{tuned}; their errors: "
                       f"qatune study {args.file} --status. Fix the cause, then rerun with --retry-failed")


TUNING_STAGES = ("winner", "pruned", "paused")  # a candidate's terminal or waiting state, counted apart


def count_line(counts: dict[str, int]) -> str:
    """Run counts as a line: the runs by status, then the tuning candidates by stage ("tuned: 1 winner, ...")."""
    runs = [f"{v} {k}" for k, v in counts.items() if k not in TUNING_STAGES]
    tuned = [f"{counts[k]} {k}" for k in TUNING_STAGES if counts.get(k)]
    return ", ".join(runs) + ("; " if runs and tuned else "") + (f"tuned: {', '.join(tuned)}" if tuned else "")


def configuration_name(group) -> str:
    """A tuned configuration as a reader names it: its arm and grid point."""
    return f"{group.arm}, " + (", ".join(f"{k}={v}" for k, v in group.point.items()) or "its one configuration")


def _rebuild(loaded, as_json: bool) -> None:
    from qatune.study.driver import rebuild_store
    from qatune.study.store import DB_FILE

    r = rebuild_store(loaded)
    emit(r, as_json, [f"{loaded.directory / DB_FILE}: rebuilt from the run directories: "
                      f"{r['finished']} finished, {r['pending']} pending"
                      + (f", {r['tuned']} tuned configuration(s) decided again from their candidates' pauses"
                         if r.get("tuned") else "")
                      + (f"; {r['awaiting_choice']} finished final run(s) of tuned configurations not decided yet "
                         f"are kept: the next qatune study trains their candidates again and finds them once the "
                         f"same values are chosen" if r.get("awaiting_choice") else "")
                      + (f" (the old file is {r['set_aside']})" if r["set_aside"] else "")])


def _dry_run(loaded, args: argparse.Namespace) -> None:
    from qatune.study.plan import dry_run

    slots, threads, gpus = 1, None, 0
    if args.calibrate:
        from qatune.study.launch import LocalLauncher, visible_gpus

        if args.launcher == "local":
            gpus = len(visible_gpus())
            launcher_slots = LocalLauncher(args.workers, args.runs_per_gpu, args.threads).slots
            slots, threads = len(launcher_slots), launcher_slots[0].threads
        else:  # a cluster's size is not known before it is reached: project for the given slots
            slots, threads = args.workers or 1, args.threads or 1
    plan = dry_run(loaded, args.calibrate, slots, threads, args.runs_per_gpu, gpus)
    emit(plan["summary"], args.json, [f"study {loaded.name}: {loaded.size()} -> {loaded.directory}",
                                      *table(plan["header"], plan["rows"]), *plan["notes"]])


def _status(loaded, as_json: bool) -> None:
    from qatune.record import exact_match
    from qatune.study.driver import failed_configurations, status

    body, runs, counts = [], [], {}
    for k, s in enumerate(status(loaded), 1):
        run, m, state = s["run"], s["metrics"], s["status"]
        where = ""
        if state == "running":
            where = (f"step {s['step'] or 0}/{s['total_steps'] or '?'} on {s['worker'] or '?'} "
                     f"[{s['owner'] or ''}]")
        elif state in TUNING_STAGES:  # a tuning candidate: its validation F1 at the last rung it reached
            last = (s["scores"] or [{}])[-1]
            where = (f"tuned: validation F1 {last['f1']:.2f} at step {last['step']}" if last
                     else "tuned: chosen without training (its only candidate)" if state == "winner" else "tuned")
            if s["error"]:
                where += f"; failed: {s['error'].strip().splitlines()[0][:80]}"
        elif s["error"]:
            where = s["error"].strip().splitlines()[0][:100]
        point = ", ".join(f"{key}={v}" for key, v in run.point.items())
        body.append([k, run.id, run.arm, point, state, s["attempts"], f"{exact_match(m):.2f}" if m else "",
                     f"{m['f1']:.2f}" if "f1" in m else "", f"{s['train_s']:.0f}" if s["train_s"] is not None else "",
                     where])
        runs.append({"id": run.id, "arm": run.arm, "status": state, "attempts": s["attempts"], "step": s["step"],
                     "total_steps": s["total_steps"], "worker": s["worker"], "rungs": s["scores"]})
        counts[state] = counts.get(state, 0) + 1
    failed_tuning = failed_configurations(loaded)
    emit({"runs": len(body), **counts, "per_run": runs,
          "failed_configurations": [{"configuration": g.id, "arm": g.arm, "point": g.point, "error": why}
                                    for g, why in failed_tuning]}, as_json,
         table(["#", "run", "arm", "grid point", "status", "tries", "EM", "F1", "train s", "progress / error"], body)
         + [count_line(counts)]
         + [f"tuning failed: configuration {g.id} ({configuration_name(g)}): {why[:300]} (--retry-failed tries it again)"
            for g, why in failed_tuning])
