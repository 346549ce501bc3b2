"""The ``gradmimic`` command: run, validate and submit specs, report on runs, list stages, benchmark.

Errors in what the user gave (a spec, a flag, a file) print one line and exit 2; a run that failed for another
reason (storage unreachable or full) prints one line and exits 1 (:mod:`pipelines.run.errors`); ``--debug`` shows
the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from typing import Optional, Sequence

from pipelines.run.config import to_plain, type_name


def _run(args: argparse.Namespace) -> None:
    from pipelines.run.runner import run_spec
    from pipelines.run.spec import load_spec

    spec = load_spec(args.spec, args.overrides)
    run_spec(spec, force=args.force, max_parallel=args.max_parallel)
    if spec.writes_report:
        from pipelines.report.build import build_report
        from pipelines.run.storage import open_storage

        fs, root = open_storage(spec.storage, spec.storage_options)
        report = build_report(fs.unstrip_protocol(f"{root}/{spec.name}"), spec.storage_options)
        print(f"report: {report['html']}", file=sys.stderr)


def _show(args: argparse.Namespace) -> None:
    from pipelines.report.show import show_stage

    print(show_stage(args.stage_dir))


def _report(args: argparse.Namespace) -> None:
    from pipelines.report.build import build_report

    report = build_report(args.run_dir)
    shown = {k: v for k, v in report.items() if not isinstance(v, (dict, list))}
    print(json.dumps(shown, indent=2, sort_keys=True, default=str))
    print(f"report: {report['html']}", file=sys.stderr)


def _validate(args: argparse.Namespace) -> None:
    from pipelines.run.spec import check_spec, load_spec

    spec = load_spec(args.spec, args.overrides)
    check_spec(spec)
    print(f"{args.spec}: ok ({len(spec.stages)} stages: {', '.join(s.name for s in spec.stages)})")


def _list_stages(args: argparse.Namespace) -> None:
    from pipelines.run.registry import STAGES

    for name, definition in STAGES.items():
        print(f"{name}: {definition.description} (produces a {definition.produces})")
        _print_fields(definition.config, "  ")


def _print_fields(cls: type, indent: str, tagged: bool = False) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if tagged and f.name == "kind":
            continue
        if dataclasses.is_dataclass(f.default):
            default = f"default kind {f.default.kind}" if hasattr(f.default, "kind") else "default {}"
        elif f.default is not dataclasses.MISSING:
            default = "default " + repr(to_plain(f.default))
        elif f.default_factory is not dataclasses.MISSING:
            default = "default " + repr(to_plain(f.default_factory()))
        else:
            default = "required"
        doc = f.metadata.get("doc", "")
        print(f"{indent}{f.name}: {type_name(hints[f.name])}, {default}" + (f"  # {doc}" if doc else ""))
        options = [a for a in typing.get_args(hints[f.name]) or [hints[f.name]] if dataclasses.is_dataclass(a)]
        if len(options) == 1:
            _print_fields(options[0], indent + "  ")
        for sub in options if len(options) > 1 else []:
            print(f"{indent}  kind: {typing.get_args(typing.get_type_hints(sub)['kind'])[0]}")
            _print_fields(sub, indent + "    ", tagged=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradmimic", description="Grad-Mimic data selection on Ray.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a YAML spec's stages, independent ones at once")
    p.add_argument("spec")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. stages.pool.shard_size=64 storage=s3://b/p")
    p.add_argument("--force", action="append", default=[], metavar="STAGE", help="rerun this stage even if committed")
    p.add_argument("--max-parallel", type=int, metavar="N",
                   help="run at most N stages at once (default: as many as the cluster's CPUs and GPUs allow; "
                        "1: one after another, in the file's order)")
    p.set_defaults(func=_run)

    p = sub.add_parser("validate", help="check a spec without running it")
    p.add_argument("spec")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_validate)

    p = sub.add_parser("report", help="(re)write a run's report.json and report.html from its committed stages")
    p.add_argument("run_dir", help="<storage>/<run>, a local path or s3://...")
    p.set_defaults(func=_report)

    p = sub.add_parser("show", help="a committed stage's summary (a utility stage: its top and bottom samples)")
    p.add_argument("stage_dir", help="<storage>/<run>/<stage>")
    p.set_defaults(func=_show)

    from pipelines.ops import submit

    submit.add_arguments(sub)

    p = sub.add_parser("list-stages", help="every stage with its description and config fields")
    p.set_defaults(func=_list_stages)

    bench = sub.add_parser("bench", help="measure a stage or an exact step against its baselines, side by side in "
                                          "one run")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    from pipelines.bench import aggregate, clipscore, lit, overhead, scale, train
    from pipelines.bench import filter as filter_bench

    for name, module, text in (
            ("overhead", overhead, "cost of an exact Grad-Mimic step vs a plain step and vmap"),
            ("train", train, "train-stage throughput (plain, mimic) vs a bare PyTorch loop"),
            ("aggregate", aggregate, "aggregate-stage throughput vs DuckDB and Ray Data's groupby"),
            ("filter", filter_bench, "filter-stage throughput (the paper's combined rule) vs DuckDB"),
            ("clipscore", clipscore, "clipscore-stage throughput (Ray Data actors) vs a bare PyTorch loop"),
            ("lit", lit, "locked towers: a step of the full tower CLIP vs the towers' features once and steps on them"),
            ("scale", scale, "ingest -> train -> aggregate -> filter on a generated DataComp pool: per stage wall, "
                             "rows/s per core, driver and worker peak memory")):
        p = bench_sub.add_parser(name, help=text)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    import os

    # a failed stage's other tasks are cancelled and the failure reported once, as one line: not again by Ray
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    # Ray starts where the runner says, never as a side effect of a call (a stage still ending after Ctrl-C)
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt as exc:  # Ctrl-C: one line, exit 130, and no Ray process left behind
        _stop_ray()
        where = getattr(exc, "gradmimic_interrupted", "before any stage started")
        print(f"gradmimic: interrupted {where}", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - classified: one line and an exit code, or re-raised (a bug)
        from pipelines.run.errors import classify

        verdict = None if args.debug else classify(exc)
        if verdict is None:
            raise
        code, line = verdict
        print(f"gradmimic: error: {line}", file=sys.stderr)
        return code
    return 0


def _stop_ray() -> None:
    """Disconnect from Ray; a Ray this process started (``address: local``) stops with its workers."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
