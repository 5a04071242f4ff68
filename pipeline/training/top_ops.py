"""Where a traced step's time goes, without TensorBoard: the TensorFlow ops of a profiler
trace (`<logdir>/plugins/profile/<run>/<host>.xplane.pb`) ranked by self time.

`debug=profile` (`callbacks.profile.ProfileSteps`) logs this table as the run's
`profile/top_ops.txt`. It reads the trace's host plane (`/host:CPU`): the executor
records each op kernel it runs as an event named `node_name:OpType` on the thread that
ran it. An op's self time is its duration minus the op events nested inside it on the
same thread, so that a function call op does not count its body twice.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

HOST_PLANE = "/host:CPU"
# `node_name:OpType`, e.g. `sequential/dense/Relu:_MklNativeFusedMatMul`. Graph node names
# never hold a `:` (it separates a tensor's output index), so `Iterator::Root` or
# `EagerLocalExecute: OptionalHasValue` are not ops.
OP_EVENT = re.compile(r"^([A-Za-z0-9.][A-Za-z0-9_.\-/>]*):([A-Za-z_][A-Za-z0-9_]*)$")
# The wrappers of a Keras train function around the model's own ops, dropped from names:
# function calls (`while/body/_1/.../StatefulPartitionedCall/sequential/dense/MatMul`) and
# control flow (`cond/else/_562/cond/mlp/dense/Relu`, whose `_562` differs between traces).
CALL = re.compile(r"^.*StatefulPartitionedCall/")
CONTROL_FLOW = re.compile(r"(?:^|/)(?:cond|while)(?:_\d+)?(?:/(?:then|else|body|cond)/_\d+)?(?=/)")
NAME_WIDTH = 90  # characters of an op's name in the table: its start (layer) and end (op) kept


@dataclass
class OpTime:
    """One op (node name and type), or one op type (`name` empty), over a trace."""

    name: str
    type: str
    count: int = 0
    self_ps: int = 0  # picoseconds, the trace's unit


def traces(logdir: Path) -> list[Path]:
    """The trace files under a profiler `logdir`, oldest first."""
    return sorted(Path(logdir).glob("plugins/profile/*/*.xplane.pb"))


def op_times(trace: Path) -> list[OpTime]:
    """Per op of the host plane of `trace` (an `.xplane.pb`): how often it ran and its
    self time, largest first."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2  # ships with TensorFlow

    space = xplane_pb2.XSpace()
    space.ParseFromString(Path(trace).read_bytes())
    ops: dict[tuple[str, str], OpTime] = {}
    for plane in space.planes:
        if plane.name != HOST_PLANE:
            continue
        kinds = {key: OP_EVENT.match(metadata.name) for key, metadata in plane.event_metadata.items()}
        for line in plane.lines:
            _add_line(line, kinds, ops)
    return sorted(ops.values(), key=lambda op: -op.self_ps)


def _add_line(line, kinds: dict, ops: dict[tuple[str, str], OpTime]) -> None:
    """Add one thread's op events to `ops`. Events on a thread nest (a call's children lie
    inside it), so a stack of the open events finds each op's nearest enclosing op."""
    events = sorted(line.events, key=lambda e: (e.offset_ps, -e.duration_ps))
    open_events: list[tuple[int, OpTime | None]] = []  # (end_ps, its op or None)
    for event in events:
        start, end = event.offset_ps, event.offset_ps + event.duration_ps
        while open_events and open_events[-1][0] <= start:
            open_events.pop()
        match = kinds.get(event.metadata_id)
        op = None
        if match is not None:
            name, op_type = short_name(match.group(1)), match.group(2)
            op = ops.setdefault((name, op_type), OpTime(name, op_type))
            op.count += 1
            op.self_ps += event.duration_ps
            parent = next((o for _, o in reversed(open_events) if o is not None), None)
            if parent is not None:
                parent.self_ps -= event.duration_ps
        open_events.append((end, op))


def short_name(node: str) -> str:
    """`node` without the function-call and control-flow scopes Keras wraps ops in."""
    return CONTROL_FLOW.sub("", CALL.sub("", node)).lstrip("/")


def by_type(ops: list[OpTime]) -> list[OpTime]:
    """`ops` summed per op type, largest self time first."""
    types: dict[str, OpTime] = defaultdict(lambda: OpTime("", ""))
    for op in ops:
        total = types[op.type]
        total.type, total.count, total.self_ps = op.type, total.count + op.count, total.self_ps + op.self_ps
    return sorted(types.values(), key=lambda op: -op.self_ps)


def table(ops: list[OpTime], steps: int, top: int = 25) -> str:
    """Two aligned tables, by op type and by op: self time (ms, ms per traced step, % of
    all op self time) and how often each ran."""
    total = sum(op.self_ps for op in ops) or 1
    per_step = max(steps, 1)

    def rows(items: list[OpTime], label: str) -> list[str]:
        width = max((len(op.type) for op in items[:top]), default=0)
        lines = [f"{'self ms':>10} {'ms/step':>9} {'%':>6} {'count':>7}  {'op type':<{width}}  {label}".rstrip()]
        for op in items[:top]:
            name = op.name if len(op.name) <= NAME_WIDTH else f"{op.name[:35]}...{op.name[38 - NAME_WIDTH:]}"
            lines.append(f"{op.self_ps / 1e9:10.2f} {op.self_ps / 1e9 / per_step:9.3f} "
                         f"{100 * op.self_ps / total:6.1f} {op.count:7d}  {op.type:<{width}}  {name}".rstrip())
        if len(items) > top:
            rest = sum(op.self_ps for op in items[top:])
            lines.append(f"{rest / 1e9:10.2f} {rest / 1e9 / per_step:9.3f} {100 * rest / total:6.1f} "
                         f"{'':>7}  ({len(items) - top} more)")
        return lines

    return "\n".join([f"By op type (top {top})", *rows(by_type(ops), ""), "",
                      f"By op (top {top})", *rows(ops, "op")])


def report(logdir: Path, header: list[str], steps: int, top: int = 25) -> str:
    """`header`, then the op tables of the newest trace under `logdir`."""
    found = traces(logdir)
    if not found:
        return "\n".join([*header, "", f"No trace (*.xplane.pb) under {logdir}."]) + "\n"
    ops = op_times(found[-1])
    total_ms = sum(op.self_ps for op in ops) / 1e9
    summary = [f"Op self time: {total_ms:.1f} ms in {sum(op.count for op in ops)} op runs "
               f"({total_ms / max(steps, 1):.2f} ms per traced step), summed over threads;",
               "time outside ops (waiting for input, Python, the profiler itself) is not in these tables.", ""]
    body = table(ops, steps, top) if ops else f"No TensorFlow op events on {HOST_PLANE} in {found[-1].name}."
    return "\n".join([*header, *summary, body]) + "\n"

