"""auto_explain plans: recognising them in log messages, parsing JSON and text formats, turning them into spans.

EXPLAIN plans (the ``explain`` source) become spans the same way, marked estimated.

A plan becomes one INTERNAL span per plan node, nested as the plan tree is,
under the statement's ``execute`` phase span.

Timing approximation: a plan gives, per node, the average time of one loop
(``Actual Total Time``, which includes its children) and the number of loops,
not when the node ran. Each node span therefore lasts ``total time × loops``
and ends where the ``execute`` span ends; a child never lasts longer than its
parent (clamped; parallel workers and rounding can make the raw sum larger).
Durations are exact to the log's precision, positions are not.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind

from ._spanutil import child_context, make_span

__all__ = ["Plan", "parse_plan_message", "parse_text_plan", "node_spans", "plan_shape", "PLAN_ATTR", "ESTIMATED_ATTR", "MAX_NODES"]

#: Plan node spans made per statement at most; bigger plans are cut (breadth first) and say so.
MAX_NODES = 200

PLAN_ATTR = "db.postgresql.plan."
#: Marks a plan node span made from EXPLAIN (estimates), not from an executed plan.
ESTIMATED_ATTR = "pgotel.plan.estimated"

_HEAD_RE = re.compile(r"^duration: (?P<ms>\d+(?:\.\d+)?) ms\s+plan:\n", re.S)


@dataclass(slots=True)
class Plan:
    """One auto_explain record."""

    time_ns: int
    pid: int | None
    duration_ms: float
    query_text: str
    root: dict[str, Any] | None
    query_id: int | None = None
    planning_ms: float | None = None
    execution_ms: float | None = None
    extra: dict = field(default_factory=dict)


def parse_plan_message(message: str, time_ns: int, pid: int | None, query_id: int | None) -> Plan | None:
    """The plan in an auto_explain log message, or None when the message is something else."""
    m = _HEAD_RE.match(message)
    if m is None:
        return None
    body = message[m.end() :]
    duration = float(m.group("ms"))
    if body.lstrip().startswith("{"):
        try:
            doc = json.loads(body)
        except ValueError:
            return None
        if isinstance(doc, list) and doc:
            doc = doc[0]
        if not isinstance(doc, dict):
            return None
        root = doc.get("Plan")
        return Plan(
            time_ns, pid, duration, str(doc.get("Query Text") or ""),
            root if isinstance(root, dict) else None, query_id,
            _float(doc.get("Planning Time")), _float(doc.get("Execution Time")),
        )
    if body.startswith("Query Text: "):
        text, root, planning, execution = parse_text_plan(body)
        return Plan(time_ns, pid, duration, text, root, query_id, planning, execution)
    return None  # XML and YAML plans are not read


def _float(v) -> float | None:
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------- text format

_NODE_RE = re.compile(
    r"^(?P<indent>\s*)(?:->\s+)?(?P<label>\S.*?)\s\s\((?:cost=(?P<c0>[\d.]+)\.\.(?P<c1>[\d.]+) rows=(?P<prows>\d+(?:\.\d+)?) width=\d+\))?"
    r"\s*(?:\((?:actual time=(?P<t0>[\d.]+)\.\.(?P<t1>[\d.]+) )?(?:actual )?rows=(?P<rows>\d+(?:\.\d+)?) loops=(?P<loops>\d+)\)|\((?P<never>never executed)\))?\s*$"
)
_LABEL_RE = re.compile(
    r"^(?P<type>.+?)(?: using (?P<index>\S+))?(?: on (?P<rel>\S+)(?: (?P<alias>\S+))?)?$"
)
_BUF_RE = re.compile(r"(shared|local|temp)((?: (?:hit|read|dirtied|written)=\d+)+)")
_TIME_RE = re.compile(r"^\s*(Planning|Execution) Time: (?P<ms>[\d.]+) ms")


def parse_text_plan(body: str) -> tuple[str, dict | None, float | None, float | None]:
    """(query text, plan tree as the JSON format's dict, planning ms, execution ms) of a text-format plan.

    Best effort: the query text may span lines, so the plan starts at the first
    line that looks like a plan node, i.e. ends in ``(cost=...)`` or ``(actual ...)``.
    """
    lines = body.split("\n")
    first = lines[0][len("Query Text: ") :]
    text_lines = [first]
    i = 1
    while i < len(lines) and not _is_node_line(lines[i]):
        text_lines.append(lines[i])
        i += 1
    root: dict | None = None
    stack: list[tuple[int, dict]] = []
    planning = execution = None
    for line in lines[i:]:
        tm = _TIME_RE.match(line)
        if tm:
            if tm.group(1) == "Planning":
                planning = float(tm.group("ms"))
            else:
                execution = float(tm.group("ms"))
            continue
        nm = _NODE_RE.match(line) if _is_node_line(line) else None
        if nm is not None:
            depth = len(nm.group("indent"))
            node = _text_node(nm)
            while stack and stack[-1][0] >= depth:
                stack.pop()
            if stack:
                stack[-1][1].setdefault("Plans", []).append(node)
            elif root is None:
                root = node
            else:
                continue  # a second top-level tree (trigger output etc.): ignored
            stack.append((depth, node))
            continue
        if line[:1] not in (" ", ""):
            stack = []  # a top-level section (Planning:, Trigger, JIT:) is no node's
            continue
        if stack and "Buffers:" in line:
            for kind, pairs in _BUF_RE.findall(line):
                for pair in pairs.split():
                    what, _, n = pair.partition("=")
                    stack[-1][1][f"{kind.title()} {_BUF_WORD[what]} Blocks"] = int(n)
    return "\n".join(text_lines), root, planning, execution


_BUF_WORD = {"hit": "Hit", "read": "Read", "dirtied": "Dirtied", "written": "Written"}


def _is_node_line(line: str) -> bool:
    s = line.rstrip()
    return s.endswith(")") and ("  (cost=" in s or "  (actual " in s or "(never executed)" in s)


def _num(text: str) -> int | float:
    # PostgreSQL 18 prints average rows per loop with two decimals.
    return float(text) if "." in text else int(text)


def _text_node(m: re.Match) -> dict:
    label = m.group("label")
    lm = _LABEL_RE.match(label)
    node: dict[str, Any] = {"Node Type": label}
    if lm is not None:
        node["Node Type"] = lm.group("type")
        if lm.group("index"):
            node["Index Name"] = lm.group("index")
        if lm.group("rel"):
            node["Relation Name"] = lm.group("rel")
            if lm.group("alias"):
                node["Alias"] = lm.group("alias")
    if m.group("c1"):
        node["Total Cost"] = float(m.group("c1"))
        node["Plan Rows"] = _num(m.group("prows"))
    if m.group("t1"):
        node["Actual Startup Time"] = float(m.group("t0"))
        node["Actual Total Time"] = float(m.group("t1"))
    if m.group("rows"):
        node["Actual Rows"] = _num(m.group("rows"))
        node["Actual Loops"] = int(m.group("loops"))
    if m.group("never"):
        node["Actual Loops"] = 0
    return node


# ----------------------------------------------------------------- spans

_NODE_ATTRS = (
    ("Node Type", "node_type"),
    ("Relation Name", "relation"),
    ("Alias", "alias"),
    ("Index Name", "index"),
    ("Function Name", "function"),
    ("CTE Name", "cte"),
    ("Operation", "operation"),
    ("Join Type", "join_type"),
    ("Parent Relationship", "parent_relationship"),
    ("Actual Rows", "actual_rows"),
    ("Actual Loops", "loops"),
    ("Actual Startup Time", "startup_time_ms"),
    ("Actual Total Time", "total_time_ms"),
    ("Plan Rows", "plan_rows"),
    ("Total Cost", "total_cost"),
    ("Shared Hit Blocks", "shared_hit_blocks"),
    ("Shared Read Blocks", "shared_read_blocks"),
    ("Shared Dirtied Blocks", "shared_dirtied_blocks"),
    ("Shared Written Blocks", "shared_written_blocks"),
    ("Local Hit Blocks", "local_hit_blocks"),
    ("Local Read Blocks", "local_read_blocks"),
    ("Temp Read Blocks", "temp_read_blocks"),
    ("Temp Written Blocks", "temp_written_blocks"),
    ("Workers Launched", "workers_launched"),
)


def node_name(node: dict) -> str:
    """Span name of a plan node: its type and what it reads, e.g. ``Seq Scan users``."""
    kind = str(node.get("Node Type") or "Plan")
    target = node.get("Relation Name") or node.get("Function Name") or node.get("CTE Name") or node.get("Index Name")
    return f"{kind} {target}" if target else kind


def plan_shape(node: dict | None) -> tuple:
    """(name, (children...)) of a plan tree; what tests compare with EXPLAIN."""
    if not node:
        return ()
    return (node_name(node), tuple(plan_shape(c) for c in node.get("Plans") or ()))


def _inclusive_ns(node: dict) -> int:
    total = _float(node.get("Actual Total Time")) or 0.0
    loops = node.get("Actual Loops")
    loops = 1 if loops is None else int(loops)
    return int(total * loops * 1_000_000)


def node_spans(root: dict, parent: ReadableSpan, resource, max_nodes: int = MAX_NODES,
               estimated: bool = False) -> list[ReadableSpan]:
    """Spans for the nodes of ``root``, children of ``parent`` (the execute span), ending at its end.

    ``estimated``: an EXPLAIN plan without actual times; each node span then lasts as long as
    ``parent`` and says ``pgotel.plan.estimated``.
    """
    out: list[ReadableSpan] = []
    end = parent.end_time
    budget = max(parent.end_time - parent.start_time, 0)
    # Breadth first so that a cut keeps the top of the tree.
    queue: list[tuple[dict, Any, int]] = [(root, parent.context, budget)]
    made = 0
    cut = 0
    while queue:
        node, parent_ctx, limit = queue.pop(0)
        if made >= max_nodes:
            cut += 1
            continue
        dur = limit if estimated else min(_inclusive_ns(node), limit)
        attrs = {ESTIMATED_ATTR: True} if estimated else {}
        for key, short in _NODE_ATTRS:
            v = node.get(key)
            if v is not None and not isinstance(v, (dict, list)):
                attrs[PLAN_ATTR + short] = v
        ctx = child_context(parent_ctx)
        out.append(make_span(node_name(node), ctx, parent_ctx, SpanKind.INTERNAL, end - dur, end, attrs, resource))
        made += 1
        for child in node.get("Plans") or ():
            if isinstance(child, dict):
                queue.append((child, ctx, dur))
    if cut:
        # Say so on the top node rather than dropping silently.
        top = out[0]
        attrs = dict(top.attributes or {})
        attrs[PLAN_ATTR + "nodes_omitted"] = cut
        out[0] = make_span(top.name, top.context, top.parent, SpanKind.INTERNAL, top.start_time, top.end_time, attrs, resource)
    return out
