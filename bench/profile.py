"""Where the proxy's CPU goes: py-spy samples of the real proxy process under a pgbench load.

This module owns the profiling half of the benchmark. It sets up the same
throwaway PostgreSQL, OTLP sink and proxy (through its CLI) as ``run.py``,
runs the ``-S``-equivalent traced pgbench workload against one proxy
configuration while ``py-spy record --format raw`` samples the proxy, and
prints per thread the functions with the most self time, each as a share of
samples and as µs of proxy CPU per transaction (samples share × measured
utime+stime / transactions).

Usage::

    python bench/profile.py [--config on|off|flush] [--mode prepared] [--clients 8]
                            [--duration 15] [--native] [--out DIR]

Needs py-spy (``pip install py-spy``) and the right to ptrace the proxy (root,
or ``kernel.yama.ptrace_scope`` 0).
"""

from __future__ import annotations

import argparse
import collections
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # noqa: E402  (bench/run.py, this directory)

log = logging.getLogger("bench.profile")

_CONFIGS = {"off": "proxy-off", "on": "proxy-on", "flush": "proxy-flush", "1pct": "proxy-1pct", "enrich": "proxy-enrich"}
# "func (file:line)" in py-spy's raw (collapsed) output.
_FRAME_RE = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _short(path: str) -> str:
    for marker in ("site-packages/", "pgotel_proxy/", "lib/python3"):
        i = path.find(marker)
        if i >= 0:
            return path[i:] if marker == "pgotel_proxy/" else path[i + len(marker):]
    return path


def _frame_name(frame: str) -> str:
    m = _FRAME_RE.match(frame.strip())
    if not m:
        return frame.strip()
    return f"{m.group('func')} ({_short(m.group('file'))})"


def summarise(raw: str, top: int, us_per_sample: float) -> str:
    """Self and inclusive time per function and thread from py-spy's collapsed stacks."""
    self_t: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    incl_t: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    per_thread: collections.Counter = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = "all"
        if frames and frames[0].startswith(("thread (", "process ")):
            # --subprocesses puts "process <pid>:"<command line>"" first, --threads
            # "thread (<tid>)[: <name>]" next.
            proc = ""
            if frames[0].startswith("process "):
                proc = "span process: " if "tracing.process" in frames[0] else ""
                frames = frames[1:]
            named = frames[0].partition("): ")[2].strip('"') if frames and frames[0].startswith("thread (") else ""
            while frames and frames[0].startswith("thread ("):
                frames = frames[1:]
            thread = proc + (named or (_frame_name(frames[0]) if frames else "?"))
        names = [_frame_name(f) for f in frames]
        if not names:
            continue
        total += n
        per_thread[thread] += n
        self_t[thread][names[-1]] += n
        for name in set(names):
            incl_t[thread][name] += n
    out = [f"{total} samples; µs/tx = share × proxy CPU per transaction"]
    for thread, n in per_thread.most_common():
        out += ["", f"thread {thread}: {n} samples ({100 * n / total:.1f}%, "
                    f"{n * us_per_sample:.1f} µs/tx)",
                f"  {'self %':>7} {'µs/tx':>7}  function (self time)"]
        for name, c in self_t[thread].most_common(top):
            out.append(f"  {100 * c / total:>7.1f} {c * us_per_sample:>7.2f}  {name}")
        out += [f"  {'incl %':>7} {'µs/tx':>7}  function (inclusive)"]
        for name, c in incl_t[thread].most_common(top):
            out.append(f"  {100 * c / total:>7.1f} {c * us_per_sample:>7.2f}  {name}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=sorted(_CONFIGS), default="on")
    ap.add_argument("--mode", choices=bench.MODES, default="prepared")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--native", action="store_true", help="include C frames (uvloop, libc)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", type=Path, help="directory for the raw stacks and the summary")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(pyspy).exists():
        print("profile: py-spy not found (pip install py-spy)", file=sys.stderr)
        return 2
    name = _CONFIGS[args.config]
    workdir = Path(tempfile.mkdtemp(prefix="pgotel-profile-"))
    out_dir = args.out or workdir
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"auto_explain.log_min_duration": -1, "auto_explain.log_analyze": False}
    sink = proxy = None
    with bench.PgServer(settings=settings) as pg:
        try:
            data = bench.prepare_data(pg, scale=10, bulk_mb=1, select_rows=1000)
            script = bench.write_select_script(workdir / "select_traced.sql", data["accounts"],
                                               traced=name not in bench.ROOT_SAMPLED)
            flags = bench.PROXY_FLAGS[name]
            if "--tracing" in flags:
                sink = bench.OtlpSink()
            proxy = bench.ProxyProcess(name, pg, workdir, sink.endpoint if sink else None, flags).start()
            target = proxy.target
            bench.run_pgbench(target, script=script, mode=args.mode, clients=2, duration=2, logdir=workdir)
            raw_path = out_dir / f"pyspy-{args.config}-{args.mode}-{args.clients}.txt"
            spy_cmd = [pyspy, "record", "--pid", str(target.pid), "--format", "raw", "--threads",
                       "--rate", str(args.rate), "-o", str(raw_path), "--subprocesses",
                       "--duration", str(int(args.duration + 30))]
            # Native unwinding must stop the process for each sample; Python-only need not.
            spy_cmd.append("--native" if args.native else "--nonblocking")
            spy = subprocess.Popen(spy_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1.0)  # py-spy attaches
            row = bench.run_pgbench(target, script=script, mode=args.mode, clients=args.clients,
                                    duration=args.duration, logdir=workdir)
            spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
            _, err = spy.communicate(timeout=60)
            if not raw_path.exists():
                print(f"profile: py-spy wrote nothing:\n{err.decode(errors='replace')}", file=sys.stderr)
                return 1
        finally:
            if proxy is not None:
                proxy.stop()
            if sink is not None:
                sink.stop()
    raw = raw_path.read_text()
    total = sum(int(l.rpartition(" ")[2]) for l in raw.splitlines() if l.rpartition(" ")[2].isdigit())
    cpu_tx = row["cpu_us_per_tx"]
    head = (f"proxy {name}, pgbench -M {args.mode} -c {args.clients}, {args.duration:.0f}s: "
            f"{row['tps']:.0f} tps, proxy CPU {cpu_tx:.1f} µs/tx, spans exported "
            f"{row.get('spans_exported', 0)}, dropped {row.get('spans_dropped', 0)}, "
            f"statements dropped {row.get('statements_dropped', 0)}")
    # Samples span a little more than the pgbench run (attach, drain): scale by share.
    summary = head + "\n" + summarise(raw, args.top, cpu_tx / total if total else 0.0)
    (out_dir / f"summary-{args.config}-{args.mode}-{args.clients}.txt").write_text(summary + "\n")
    print(summary)
    print(f"\nraw stacks: {raw_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
