"""Coverage-guided fuzzing of one target with atheris (libFuzzer), seeded from the kept corpus.

Usage::

    python tests/fuzz/run.py TARGET [--seconds N] [--runs N] [--seed N] [--no-save]

TARGET is one of ``client``, ``server``, ``startup``, ``sqlcomment``,
``sqlinfo`` (see ``targets.py``). The run reads ``corpus/TARGET/`` and writes
the inputs libFuzzer finds interesting (new coverage) to a scratch directory;
at the end a libFuzzer merge copies into ``corpus/TARGET/`` only those that
add coverage to the corpus as it is (named by content hash), unless
``--no-save``. A failing input is left in the scratch directory as
``crash-*`` / ``timeout-*`` / ``oom-*`` and the exit status is non-zero; once
fixed, copy it into the corpus so CI replays it for good.

The fuzzing itself runs in a child process (libFuzzer ends its process when
done, and re-runs it for the merge).

Bounds: each input must finish within ``--timeout`` seconds (default 5), the
process within ``--rss-mb`` MB, and inputs are at most ``targets.MAX_INPUT``
bytes. The CI test runs this with a fixed seed and a run count.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
_ENV = "PGOTEL_FUZZ_TARGET"


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("target")
    p.add_argument("--seconds", type=int, default=60, help="stop after this many seconds (default 60)")
    p.add_argument("--runs", type=int, default=-1, help="stop after this many inputs (default: no limit)")
    p.add_argument("--seed", type=int, default=0, help="libFuzzer seed (0: random)")
    p.add_argument("--timeout", type=int, default=5, help="seconds one input may take")
    p.add_argument("--rss-mb", type=int, default=1024, help="memory limit of the run")
    p.add_argument("--no-save", action="store_true", help="do not add new inputs to the corpus")
    p.add_argument("--workdir", help="scratch directory (default: a new temporary one)")
    return p.parse_args(argv)


def _child() -> None:
    """Inside the fuzzing process (``PGOTEL_FUZZ_TARGET`` set): run libFuzzer with our argv."""
    import atheris

    # Instrument the proxy's own modules (not pglast or the stdlib) as they are imported.
    sys.path.insert(0, str(HERE))
    with atheris.instrument_imports(include=["pgotel_proxy"]):
        import targets
    fn = targets.TARGETS[os.environ[_ENV]]
    take_logs = targets.watch_logs()

    def one_input(data: bytes) -> None:
        fn(data)
        logged = take_logs()
        if logged:
            raise AssertionError(f"parser logged (a swallowed error): {logged}")

    # libFuzzer re-runs argv[0] through the shell for -merge: it must name the interpreter too.
    atheris.Setup([f"{sys.executable} {pathlib.Path(__file__).resolve()}", *sys.argv[1:]], one_input)
    atheris.Fuzz()  # exits the process


def main(argv: list[str] | None = None) -> int:
    args = _args(sys.argv[1:] if argv is None else argv)
    sys.path.insert(0, str(HERE))
    from targets import MAX_INPUT, TARGETS

    if args.target not in TARGETS:
        print(f"unknown target {args.target!r}; one of {', '.join(TARGETS)}", file=sys.stderr)
        return 2
    kept = CORPUS / args.target
    kept.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix=f"pgotel-fuzz-{args.target}-"))
    new = work / "new"
    new.mkdir(parents=True, exist_ok=True)
    flags = [
        f"-max_total_time={args.seconds}",
        f"-timeout={args.timeout}",
        f"-rss_limit_mb={args.rss_mb}",
        f"-max_len={MAX_INPUT}",
        f"-artifact_prefix={work}{os.sep}",
        "-print_final_stats=1",
    ]
    if args.runs >= 0:
        flags.append(f"-runs={args.runs}")
    if args.seed:
        flags.append(f"-seed={args.seed}")
    env = dict(os.environ, **{_ENV: args.target})
    me = [sys.executable, str(pathlib.Path(__file__).resolve())]
    print(f"fuzzing {args.target}: corpus {kept}, scratch {work}", file=sys.stderr, flush=True)
    # New inputs go to the scratch directory (libFuzzer writes to the first one given).
    rc = subprocess.run([*me, *flags, str(new), str(kept)], env=env).returncode
    if rc != 0:
        print(f"failing input kept in {work} (exit status {rc})", file=sys.stderr)
        return rc
    if not args.no_save and any(new.iterdir()):
        # Keep only what adds coverage over the corpus as it is.
        before = {p.name for p in kept.iterdir()}
        merge = subprocess.run([*me, "-merge=1", f"-max_len={MAX_INPUT}", str(kept), str(new)], env=env,
                               capture_output=True, text=True)
        if merge.returncode != 0:
            print(merge.stderr[-2000:], file=sys.stderr)
            return merge.returncode
        added = sorted({p.name for p in kept.iterdir()} - before)
        print(f"{len(added)} new inputs added to {kept}", file=sys.stderr)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if os.environ.get(_ENV):
        _child()
    sys.exit(main())
