"""Smoke test of ``bench/run.py``: every piece of the benchmark runs, with minimal durations.

Not a timed test: it checks that pgbench cells, CPU accounting, the proxy's
span counters, bulk relay and the idle-connection measurement all produce
sane numbers against the session's PostgreSQL, so the benchmark does not rot
between the occasions someone runs it in full.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

_BENCH = Path(__file__).resolve().parent.parent / "bench" / "run.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("pgotel_bench_run", _BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_latency_stats_from_pgbench_logs(bench, tmp_path):
    prefix = tmp_path / "pgb"
    # pgbench --log lines: client_id transaction_no time_us script_no epoch epoch_us
    (tmp_path / "pgb.100").write_text("".join(f"0 {i} {i * 10} 0 1700000000 0\n" for i in range(1, 101)))
    (tmp_path / "pgb.100.1").write_text("1 1 5000 0 1700000000 0\n")
    stats = bench.latency_stats(prefix)
    assert stats["logged"] == 101
    assert stats["p50_ms"] == pytest.approx(0.51)
    assert stats["p99_ms"] == pytest.approx(1.0)
    assert stats["mean_ms"] == pytest.approx((sum(i * 10 for i in range(1, 101)) + 5000) / 101 / 1000)
    assert not list(tmp_path.glob("pgb.*")), "log files are removed once read"


def test_rounds_combine_into_medians_of_paired_ratios(bench):
    # Round 2 ran on a slower machine for all: its ratios are still taken against its own PgBouncer cell.
    rows = []
    for rnd, (pgb, proxy, cpu) in enumerate([(1000, 900, 10.0), (500, 480, 12.0), (1000, 800, 11.0)]):
        rows.append({"mode": "simple", "clients": 8, "target": "pgbouncer", "round": rnd, "tps": pgb,
                     "transactions": pgb * 10, "cpu_us_per_tx": 10.0, "cpu_s": pgb * 1e-4, "p99_ms": 1.0})
        rows.append({"mode": "simple", "clients": 8, "target": "proxy-on", "round": rnd, "tps": proxy,
                     "transactions": proxy * 10, "cpu_us_per_tx": cpu, "cpu_s": proxy * cpu * 1e-5,
                     "p99_ms": 2.0 + rnd, "spans_exported": proxy * 30})
    bench.add_ratios(rows)
    cells = {c["target"]: c for c in bench.combine_rounds(rows)}
    on = cells["proxy-on"]
    assert on["rounds"] == 3
    assert on["tps"] == 800  # median of 900, 480, 800
    assert on["tps_x_pgbouncer"] == pytest.approx(0.9)  # median of 0.90, 0.96, 0.80 (not 800 / 1000)
    assert on["tps_x_pgbouncer_range"] == [pytest.approx(0.8), pytest.approx(0.96)]
    assert on["cpu_x_pgbouncer"] == pytest.approx(1.1)
    assert on["cpu_x_pgbouncer_range"] == [pytest.approx(1.0), pytest.approx(1.2)]
    assert on["p99_ms"] == 3.0
    assert on["transactions"] == (900 + 480 + 800) * 10
    assert on["spans_exported"] == (900 + 480 + 800) * 30
    assert on["cpu_us_total_per_tx"] == pytest.approx((900 * 10 + 480 * 12 + 800 * 11) / (900 + 480 + 800))
    assert cells["pgbouncer"]["tps_x_pgbouncer"] == 1.0
    table = bench.format_tables({"pgbench": list(cells.values())})
    assert "medians of 3 interleaved rounds" in table and "0.80–0.96" in table


def test_tls_targets_are_held_to_the_pgbouncer_of_their_shape(bench):
    assert bench.split_target("proxy-on-tls2") == ("proxy-on", "-tls2")
    assert bench.split_target("pgbouncer-tls") == ("pgbouncer", "-tls")
    assert bench.split_target("proxy-w2") == ("proxy-w2", "")
    assert bench.references("proxy-off-tls2") == ("direct-tls", "pgbouncer-tls2")
    for bad in ("direct-tls2", "proxy-nope-tls", "tls"):
        with pytest.raises(ValueError):
            bench.check_target(bad)
    rows = [{"mode": "prepared", "clients": 8, "target": name, "round": 0, "tps": tps, "cpu_us_per_tx": cpu}
            for name, tps, cpu in [("direct", 400, None), ("pgbouncer", 200, 10.0), ("proxy-on", 180, 12.0),
                                   ("direct-tls", 300, None), ("pgbouncer-tls", 150, 20.0),
                                   ("proxy-on-tls", 150, 24.0), ("pgbouncer-tls2", 100, 30.0),
                                   ("proxy-on-tls2", 120, 27.0)]]
    bench.add_ratios(rows)
    cells = {r["target"]: r for r in rows}
    assert cells["proxy-on"]["tps_x_pgbouncer"] == pytest.approx(0.9)
    assert cells["proxy-on-tls"]["tps_x_pgbouncer"] == pytest.approx(1.0)
    assert cells["proxy-on-tls"]["cpu_x_pgbouncer"] == pytest.approx(1.2)
    assert cells["proxy-on-tls2"]["tps_x_pgbouncer"] == pytest.approx(1.2)
    assert cells["proxy-on-tls2"]["cpu_x_pgbouncer"] == pytest.approx(0.9)
    assert cells["proxy-on-tls2"]["tps_x_direct"] == pytest.approx(0.4)  # direct-tls serves both TLS shapes


def test_target_sets_expand_in_order_without_repeats(bench):
    opts, _ = bench.parse_args(["--targets", "direct,pgbouncer,tls,proxy-on-tls,tls2", "--sustained", "60"])
    assert opts.targets == ("direct", "pgbouncer", *bench.TLS_TARGETS, *bench.TLS2_TARGETS)
    assert opts.sustained == 60 and opts.sustained_clients == 8
    with pytest.raises(SystemExit):
        bench.parse_args(["--targets", "direct-tls2"])


def test_cpu_and_rss_of_this_process(bench):
    before = bench.cpu_seconds(os.getpid())
    sum(i * i for i in range(300_000))
    assert bench.cpu_seconds(os.getpid()) >= before
    assert bench.rss_kib(os.getpid()) > 1000
    parts = bench.cpu_parts(os.getpid())  # this test's thread is the process's main thread
    assert set(parts) == set(bench.CPU_PARTS) and parts["loop"] > 0 and parts["pump"] == 0


@pytest.mark.skipif(not shutil.which("pgbench"), reason="pgbench not installed")
@pytest.mark.skipif(not (shutil.which("pgbouncer") or os.access("/usr/sbin/pgbouncer", os.X_OK)),
                    reason="pgbouncer not installed")
def test_whole_bench_runs_tiny(bench, pg, tmp_path):
    opts = bench.Options(
        duration=1, modes=("extended",), clients=(2,),
        targets=("direct", "pgbouncer", "proxy-on"),
        scale=1, bulk_mb=2, select_rows=2000, bulk_repeat=1, idle_conns=10, idle_settle=0.1, warmup=0,
        rounds=2, workdir=tmp_path,
    )
    results = bench.run_bench(pg, opts)
    json.dumps(results)  # the results document must serialise as written

    cells = {c["target"]: c for c in results["pgbench"]}
    assert set(cells) == {"direct", "pgbouncer", "proxy-on"}
    # two rounds, each with its own order of targets; the cells hold their medians and sums
    raw = results["pgbench_rounds"]
    assert [r["target"] for r in raw if r["round"] == 1] == ["pgbouncer", "proxy-on", "direct"]
    for name, cell in cells.items():
        assert cell["rounds"] == 2
        assert cell["transactions"] == sum(r["transactions"] for r in raw if r["target"] == name)
    for name, cell in cells.items():
        assert cell["transactions"] > 0 and cell["tps"] > 0, cell
        assert cell["failed"] == 0
        assert cell["logged"] == cell["transactions"], "every transaction's latency was logged"
        assert 0 < cell["p50_ms"] <= cell["p99_ms"]
        assert cell["tps_x_direct"] > 0
    assert cells["direct"]["cpu_us_per_tx"] is None
    for name in ("pgbouncer", "proxy-on"):
        assert cells[name]["cpu_us_per_tx"] > 0, name
    assert cells["pgbouncer"]["cpu_x_pgbouncer"] == pytest.approx(1.0)

    # The traced proxy saw every statement and the separate receiver decoded every span it exported.
    on = cells["proxy-on"]
    assert on["statements"] >= on["transactions"]
    # a statement span and at least one phase child (parse+plan+execute where the wire showed no split)
    assert on["spans_exported"] >= 2 * on["transactions"]
    assert on["spans_dropped"] == 0
    assert on["spans_received"] == on["spans_exported"]
    # Its CPU by part adds up to its CPU (read a moment apart: within two clock ticks), the span
    # process's share is there, and the relay's is the pump's thread where it was built.
    tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
    for r in (r for r in raw if r["target"] == "proxy-on"):
        parts = [r[f"cpu_{part}_us_per_tx"] for part in bench.CPU_PARTS]
        assert min(parts) >= 0 and r["cpu_children_us_per_tx"] > 0, r
        assert sum(parts) == pytest.approx(r["cpu_us_per_tx"], abs=2 * tick_us / r["transactions"]), r
    if os.environ.get("PGOTEL_PURE_PYTHON") != "1" and importlib.util.find_spec("pgotel_proxy.proxy._pump"):
        assert sum(r["cpu_pump_us_per_tx"] for r in raw if r["target"] == "proxy-on") > 0
    assert "cpu_loop_us_per_tx" not in cells["pgbouncer"] or cells["pgbouncer"]["cpu_loop_us_per_tx"] is None

    bulk = {(r["test"], r["target"]): r for r in results["bulk"]}
    assert len(bulk) == 6
    copy_bytes = bulk[("copy", "direct")]["bytes"]
    assert copy_bytes > 1_000_000
    assert all(r["bytes"] == copy_bytes for (kind, _), r in bulk.items() if kind == "copy")
    assert all(r["mb_per_s"] > 0 for r in bulk.values())

    idle = {r["target"]: r for r in results["idle"]}
    assert set(idle) == {"pgbouncer", "proxy-on"}
    assert all(r["connections"] == 10 and r["rss_held_kib"] > 0 for r in idle.values())

    table = bench.format_tables(results)
    for name in cells:
        assert name in table


@pytest.mark.skipif(not shutil.which("pgbench"), reason="pgbench not installed")
@pytest.mark.skipif(not (shutil.which("pgbouncer") or os.access("/usr/sbin/pgbouncer", os.X_OK)),
                    reason="pgbouncer not installed")
def test_tls_targets_and_the_sustained_cell_run_tiny(bench, pg, tmp_path):
    if not pg.ssl:
        pytest.skip("the session's PostgreSQL runs without TLS")
    names = ("direct-tls", "pgbouncer-tls", "proxy-on-tls", "pgbouncer-tls2", "proxy-off-tls2")
    opts = bench.Options(
        duration=1, modes=("extended",), clients=(2,), targets=names,
        scale=1, bulk_mb=1, select_rows=1000, bulk_repeat=1, idle_conns=0, warmup=0,
        sustained=1, sustained_clients=2, workdir=tmp_path,
    )
    results = bench.run_bench(pg, opts)  # checks each target's server leg with pg_stat_ssl
    json.dumps(results)

    cells = {c["target"]: c for c in results["pgbench"]}
    assert set(cells) == set(names)
    assert all(c["transactions"] > 0 and c["failed"] == 0 for c in cells.values())
    assert cells["pgbouncer-tls"]["cpu_x_pgbouncer"] == pytest.approx(1.0)
    assert cells["proxy-on-tls"]["cpu_x_pgbouncer"] == pytest.approx(
        cells["proxy-on-tls"]["cpu_us_per_tx"] / cells["pgbouncer-tls"]["cpu_us_per_tx"])
    assert cells["proxy-off-tls2"]["tps_x_pgbouncer"] == pytest.approx(
        cells["proxy-off-tls2"]["tps"] / cells["pgbouncer-tls2"]["tps"])

    sustained = {r["target"]: r for r in results["sustained"]}
    assert set(sustained) == set(names)
    assert all(r["mode"] == "prepared" and r["clients"] == 2 and r["transactions"] > 0 for r in sustained.values())
    assert sustained["proxy-on-tls"]["statements_dropped"] == 0
    assert sustained["proxy-on-tls"]["spans_received"] == sustained["proxy-on-tls"]["spans_exported"] > 0

    # One traced proxy served the rounds and the sustained cell: its own counters cover both.
    [whole] = results["proxies"]
    assert whole["target"] == "proxy-on-tls" and whole["alive"]
    assert whole["statements"] >= cells["proxy-on-tls"]["statements"] + sustained["proxy-on-tls"]["statements"]
    assert whole["spans_exported"] == results["spans_received_total"]

    bulk = {(r["test"], r["target"]): r for r in results["bulk"]}
    assert len(bulk) == 2 * len(names)
    assert bulk[("copy", "pgbouncer-tls")]["x_pgbouncer"] == pytest.approx(1.0)
    assert bulk[("select", "proxy-off-tls2")]["x_pgbouncer"] > 0

    table = bench.format_tables(results)
    assert "sustained cell: prepared, 2 clients" in table and "traced proxies over the whole run" in table


@pytest.mark.skipif(not shutil.which("pgbench"), reason="pgbench not installed")
@pytest.mark.skipif(not (shutil.which("pgbouncer") or os.access("/usr/sbin/pgbouncer", os.X_OK)),
                    reason="pgbouncer not installed")
def test_slow_mix_cell_counts_the_statements_split_under_the_defaults(bench, pg, tmp_path):
    opts = bench.Options(
        targets=("pgbouncer", "proxy-on"), rounds=0, slow_mix=2, slow_mix_clients=2,
        scale=1, bulk_mb=0, select_rows=1000, idle_conns=0, warmup=0, workdir=tmp_path,
    )
    results = bench.run_bench(pg, opts)
    json.dumps(results)
    assert results["pgbench"] == []

    cells = {c["target"]: c for c in results["slow_mix"]}
    assert set(cells) == {"pgbouncer", "proxy-on"}
    for cell in cells.values():
        assert cell["mode"] == "extended" and cell["failed"] == 0
        fast, slow = cell["by_script"]
        assert fast["logged"] > slow["logged"] > 0
        assert slow["p50_ms"] > 20  # the 20 ms sleep, after planning
    assert "phases_by_statement" not in cells["pgbouncer"]
    by_name = cells["proxy-on"]["phases_by_statement"]
    assert set(by_name) == {"SELECT pgbench_accounts", "SELECT pgbench_branches"}
    slow = by_name["SELECT pgbench_branches"]
    assert slow["statements"] == cells["proxy-on"]["by_script"][1]["logged"]
    # The first runs are unsplit (answered together, one span holding the phases); once their
    # durations have marked the shape, the later runs are split.
    assert slow["split"] + slow["joined"] == slow["statements"], slow
    assert slow["split"] >= slow["statements"] // 2, slow
    fast = by_name["SELECT pgbench_accounts"]
    assert fast["statements"] == cells["proxy-on"]["by_script"][0]["logged"]
    assert fast["joined"] + fast["split"] == fast["statements"]

    table = bench.format_tables(results)
    assert "slow-mix cell: extended, 2 clients" in table
    assert "SELECT pgbench_branches" in table


def test_spanwork_builds_every_record(capsys):
    spec = importlib.util.spec_from_file_location("pgotel_bench_spanwork", _BENCH.parent / "spanwork.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for protocol in ("extended", "simple"):
        assert module.main(["--protocol", protocol, "--batches", "3", "--records", "4", "--repeat", "1"]) == 0
        # two spans a statement (its own and one phase child), every record built
        assert "12 records, 24 spans" in capsys.readouterr().out


def test_relaywork_observes_every_transaction(capsys):
    spec = importlib.util.spec_from_file_location("pgotel_bench_relaywork", _BENCH.parent / "relaywork.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for protocol in ("prepared", "simple"):
        assert module.main(["--protocol", protocol, "--connections", "3", "--transactions", "4", "--reads", "2",
                            "--repeat", "1"]) == 0
        out = capsys.readouterr().out
        assert "24 transactions, observe + take:" in out and "24 transactions, observe + take + pack:" in out
    conns, log = module.setup("prepared", 2, 3)
    assert module.one_read(conns, log, True) == 6  # one statement a transaction, none lost
    assert module.one_read(conns, log, True) == 6  # the sessions are in step for the next read
