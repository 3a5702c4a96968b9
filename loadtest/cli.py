"""Command line of `python -m loadtest`: options, the plan they describe, and the run from plan to report."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path

from rich.console import Console

from loadtest.report import build_document, markdown_tables, write_report
from loadtest.runner import LoadTest, Plan
from loadtest.server import DEFAULT_CONFIGS, EXTERNAL, ServerFailed, parse_config, parse_env_assignment
from loadtest.workload import DEFAULT_EVAL_DIR, build_workload

# Full-run defaults, and what --quick uses instead for any option not given explicitly.
DEFAULTS = {"variants": "flash,int8+flash", "concurrency": "1,4,16", "requests": 48, "max_duration": None}
QUICK = {"concurrency": "1,2", "requests": 6, "max_duration": 8.0}


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _concurrencies(text: str) -> list[int]:
    levels = [int(part) for part in _csv(text)]
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"concurrency levels must be positive integers: {text!r}")
    return levels


def env_option(text: str) -> tuple[str, str]:
    try:
        return parse_env_assignment(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _config_option(text: str):
    try:
        return parse_config(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest",
        description="Replay a fixed, seeded workload of real speech against the transcription server at several "
        "concurrency levels, per model variant, with batching on and off, and write a comparison report.",
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--spawn", action="store_true", help="start `python -m app` per configuration (the default)")
    target.add_argument(
        "--url", help="measure a running server instead, e.g. http://127.0.0.1:8000 (one configuration: external)"
    )
    parser.add_argument("--model", default="base", help="model to load and request (default: base)")
    parser.add_argument("--variants", help=f"comma-separated variants (default: {DEFAULTS['variants']}; --quick: the first only)")
    parser.add_argument(
        "--concurrency", type=_concurrencies, help=f"comma-separated concurrency levels (default: {DEFAULTS['concurrency']})"
    )
    parser.add_argument("--requests", type=int, help=f"requests per run (default: {DEFAULTS['requests']})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the workload draw (default: 0)")
    parser.add_argument("--max-duration", type=float, help="only clips up to this many seconds (default: all; --quick: 8)")
    parser.add_argument(
        "--eval-dir",
        type=Path,
        default=DEFAULT_EVAL_DIR,
        help=f"folder with en_read/ and en_untranscribed/ (default: {DEFAULT_EVAL_DIR})",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks"), help="output folder (default: benchmarks)")
    parser.add_argument("--name", default="loadtest", help="file name prefix of the report (default: loadtest)")
    parser.add_argument(
        "--config",
        dest="configs",
        action="append",
        type=_config_option,
        metavar="NAME:KEY=VALUE,...",
        help="a named server configuration (repeatable), replacing the default pair "
        "`batched` (server defaults) and `unbatched` (MAX_BATCH_SIZE=1); e.g. --config fifo:BATCH_POLICY=fifo",
    )
    parser.add_argument(
        "--server-env",
        dest="server_env",
        action="append",
        type=env_option,
        default=[],
        metavar="KEY=VALUE",
        help="an environment setting for every spawned server (repeatable); a configuration's own settings win",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: concurrency 1,2, 6 requests, one variant, clips up to 8 s"
    )
    return parser


def plan_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[Plan, dict]:
    """The plan, with --quick filling in only what the command line left unsaid."""
    preset = {**DEFAULTS, **QUICK} if args.quick else DEFAULTS
    variants = _csv(args.variants or preset["variants"])
    if args.quick and args.variants is None:
        variants = variants[:1]
    concurrencies = args.concurrency or _concurrencies(preset["concurrency"])
    requests = args.requests if args.requests is not None else preset["requests"]
    max_duration = args.max_duration if args.max_duration is not None else preset["max_duration"]
    if not variants:
        parser.error("--variants names no variant")
    if requests < 1:
        parser.error("--requests must be at least 1")
    if args.url and (args.configs or args.server_env):
        parser.error("--config and --server-env configure spawned servers; they do not apply to --url")
    configs = [EXTERNAL] if args.url else (args.configs or list(DEFAULT_CONFIGS))
    if len({c.name for c in configs}) != len(configs):
        parser.error("configuration names must be unique")
    plan = Plan(
        model=args.model,
        variants=variants,
        concurrencies=concurrencies,
        configs=configs,
        out_dir=args.out,
        name=args.name,
        url=args.url.rstrip("/") if args.url else None,
        server_env=dict(args.server_env),
    )
    workload_options = {"count": requests, "seed": args.seed, "eval_dir": args.eval_dir, "max_duration": max_duration}
    return plan, workload_options


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    plan, workload_options = plan_from_args(args, parser)
    console = Console(stderr=True)  # progress and notes on stderr; the final table on stdout

    try:
        workload = build_workload(**workload_options)
    except (OSError, ValueError) as e:
        console.print(f"workload: {e}", style="red", markup=False)
        return 2
    description = workload.describe()
    console.print(
        f"workload: {description['count']} requests ({description['with_reference']} with reference), "
        f"{description['total_audio_s']:.1f} s of audio, seed {workload.seed}; "
        f"configurations: {', '.join(c.name for c in plan.configs)}; variants: {', '.join(plan.variants)}; "
        f"concurrency: {', '.join(map(str, plan.concurrencies))}",
        markup=False,
    )

    load_test = LoadTest(plan, workload, console)
    failure = None
    try:
        load_test.run()
    except (ServerFailed, RuntimeError, OSError) as e:
        failure = e
        console.print(f"load test stopped: {e}", style="red", markup=False)
    if not load_test.runs:
        return 1

    # A failure part-way still leaves a report of the runs that finished.
    document = build_document(
        command=shlex.join(["python", "-m", "loadtest", *argv]),
        model=plan.model,
        mode="spawn" if plan.spawn else "external",
        servers=load_test.servers,
        workload=description,
        runs=load_test.runs,
        settings={
            "variants": plan.variants,
            "concurrency": plan.concurrencies,
            "server_env": plan.server_env,
            "configs": [{"name": c.name, "env": c.env} for c in plan.configs],
            "complete": failure is None,
        },
    )
    paths = write_report(document, plan.out_dir, plan.name)
    print(markdown_tables(document))
    console.print("report: " + ", ".join(str(p) for p in paths.values()), markup=False)
    return 0 if failure is None else 1


def run_command(main, what: str = "servers stopped") -> None:
    """Run a command's `main` as a program: SIGTERM ends it like Ctrl-C does, through the
    `finally` blocks that stop spawned servers; its return value is the exit status."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print(f"interrupted: {what}, no report written", file=sys.stderr)
        sys.exit(130)
