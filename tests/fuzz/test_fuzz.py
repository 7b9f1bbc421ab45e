"""The bounded fuzzing run CI does on every change: the kept corpora replayed, then a short search.

For each target in ``targets.py``:

* every file of ``corpus/<target>/`` (seeds recorded from real drivers and
  inputs earlier runs found) goes through the target again, each within a
  time bound, with no log record from the parsers' catch-alls;
* a short coverage-guided run from that corpus with a fixed seed and a run
  count (atheris, through ``run.py``, which also bounds time per input and
  memory). Where atheris is not installed the search is hypothesis mutating
  corpus files instead, derandomised, so CI never depends on luck.

Longer local runs that grow the corpora: ``python tests/fuzz/run.py TARGET --seconds N``.
"""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from targets import MAX_INPUT, TARGETS, watch_logs  # noqa: E402

from pgotel_proxy.tracing import sqlinfo  # noqa: E402

CORPUS = HERE / "corpus"
PER_INPUT_SECONDS = 1.0  # generous: the slowest kept input takes a few milliseconds
RUNS = {"client": 4000, "server": 2000, "startup": 20000, "sqlcomment": 3000, "sqlinfo": 1500}
HAVE_ATHERIS = importlib.util.find_spec("atheris") is not None



@pytest.fixture
def take_logs():
    take = watch_logs()
    yield take
    take.close()


def corpus(target: str) -> list[pathlib.Path]:
    return sorted(p for p in (CORPUS / target).iterdir() if p.is_file())


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_corpus_replay(target, take_logs):
    files = corpus(target)
    assert len(files) >= 5, f"corpus/{target} is nearly empty"
    fn = TARGETS[target]
    take_logs()
    for path in files:
        data = path.read_bytes()
        assert len(data) <= MAX_INPUT, f"{path.name}: {len(data)} bytes, keep corpus files small"
        start = time.perf_counter()
        fn(data)
        elapsed = time.perf_counter() - start
        assert elapsed < PER_INPUT_SECONDS, f"{path.name} took {elapsed:.2f}s"
        assert take_logs() == [], path.name


@pytest.mark.skipif(not HAVE_ATHERIS, reason="atheris not installed (the hypothesis search below runs instead)")
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_coverage_guided_run(target, tmp_path):
    cmd = [sys.executable, str(HERE / "run.py"), target, "--seconds", "3", "--runs", str(RUNS[target]),
           "--seed", "1", "--no-save", "--workdir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    failing = sorted(p.name for p in tmp_path.iterdir() if p.name.split("-")[0] in ("crash", "timeout", "oom", "leak"))
    assert proc.returncode == 0 and not failing, f"{failing}\n{proc.stderr[-4000:]}"
    assert "Done" in proc.stderr, proc.stderr[-2000:]


# One mutation: (kind, where, value), "where" taken modulo the input's size.
_mutation = st.tuples(
    st.sampled_from(["flip", "set", "cut", "dup", "insert"]),
    st.integers(min_value=0, max_value=1 << 16),
    st.integers(min_value=0, max_value=255),
)


def _mutate(data: bytes, muts) -> bytes:
    b = bytearray(data)
    for kind, where, value in muts:
        if not b:
            b.append(value)
            continue
        at = where % len(b)
        if kind == "flip":
            b[at] ^= 1 << (value & 7)
        elif kind == "set":
            b[at] = value
        elif kind == "cut":
            del b[at : at + value % 64 + 1]
        elif kind == "dup":
            b[at:at] = b[at : at + value % 64 + 1]
        else:
            b[at:at] = bytes((value,)) * (value % 8 + 1)
    return bytes(b[:MAX_INPUT])


@pytest.mark.skipif(HAVE_ATHERIS, reason="the coverage-guided run covers this")
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_mutation_search_without_atheris(target, take_logs):
    files = corpus(target)
    fn = TARGETS[target]

    @settings(max_examples=300, deadline=int(PER_INPUT_SECONDS * 1000), derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(index=st.integers(min_value=0, max_value=len(files) - 1), muts=st.lists(_mutation, max_size=8))
    def search(index, muts):
        fn(_mutate(files[index].read_bytes(), muts))
        assert take_logs() == []

    search()


# --- regression tests for what the fuzzers found ------------------------------------


def test_sqlinfo_results_encodable_with_lone_surrogates():
    # Found by the sqlinfo target: a lone surrogate in the text came through to the
    # sanitised text, and an unencodable attribute fails the span's whole export batch.
    sql = "select * fr\udcff\udcffom w join items using (id) where a = 'x\ud800'"
    for info in [sqlinfo.analyze(sql), *sqlinfo.analyze_many(sql)]:
        for text in (info.summary, info.sanitized, info.operation or "", info.collection or ""):
            text.encode("utf-8")
        assert "x" not in info.sanitized.split("where", 1)[-1]  # the literal is still replaced
    assert "\ufffd" in sqlinfo.analyze(sql).sanitized


@pytest.mark.parametrize("body", ["+" * 30000, "+-" * 15000, "/*" * 15000, "*/" * 15000, "x /* " + "/*" * 15000])
def test_sqlinfo_operator_runs_cost_linear_time(body):
    # Found while timing hostile statements: PostgreSQL's lexer, which pglast runs,
    # takes time quadratic in a run of operator characters (5 s for these 30 KB)
    # and held the span builder that long. Such text now takes the linear heuristic.
    sql = "SELECT 1 " + body
    start = time.thread_time()
    info = sqlinfo.analyze(sql)
    sqlinfo.analyze_many(sql + " ")
    sqlinfo.fingerprint(sql)
    assert time.thread_time() - start < 0.5
    assert info.summary.startswith("SELECT")
