"""Server memory while aggregating N simulated sites of the ~100M-parameter ``base100m`` model.

    .venv/bin/python benchmarks/server_memory.py                        # N = 3, 10, then 30 if it fits
    .venv/bin/python benchmarks/server_memory.py --sites 3 --rounds 1   # the smallest check
    .venv/bin/python benchmarks/server_memory.py --sites 3 10 30 --limit-gib 12
    # another version of the server code, e.g. the last commit's, unpacked by git archive:
    mkdir /tmp/head && git archive HEAD | tar -x -C /tmp/head
    PYTHONPATH=/tmp/head .venv/bin/python benchmarks/server_memory.py

Each N runs in a fresh subprocess (``--child N``), so its peak RSS (``ru_maxrss``) is that N's alone.
The child drives the real round loop, :func:`server.federation.run_federation` (of whichever
``server`` package Python imports: it prints which), with an in-process Grid of N nodes. A node
computes its reply when the server pulls it (as a SuperLink hands over a reply that waited in its
own memory): a perturbed copy of the global arrays, deflated to bytes on the node's side and
inflated on the server's as the Deployment Engine does (``--wire proto``: the tests' protobuf round
trip instead), so the server holds what it would hold in a deployment.

Marks split each round into phases: round start, instructions pushed (``configure_train``), then per
site "pulling" (the server's work on the previous reply, the inflation of this one included) and "site
replied" (the node's work up to the bytes it sends), the aggregation and the checkpoint. Each mark records the RSS and the peak since the previous mark
(``VmRSS`` sampled every 20 ms by a thread; exact where the phase set a new ``VmHWM``). The nodes
run in the server's process, so ``ru_maxrss`` includes their scratch memory; "server peak" leaves the
nodes' phases out (keeping the RSS at their end, when the reply is the server's): what a ServerApp
process would peak at.

Before a larger N, the growth per site measured so far projects that N's peak; an N whose projection
is not well under ``--limit-gib`` (and under what the machine has free) is not run, its projection is
printed instead.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
MODEL_YAML = Path(__file__).resolve().parent / "models" / "base100m.yaml"
MIB = 1024 ** 2
GIB = 1024 ** 3
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1",
              "TRANSFORMERS_OFFLINE": "1"}
SAFETY = 0.85  # an N runs only when its projected peak is below this share of the limit
NODE = "node"  # the kind of a phase in which an in-process node worked


# -- memory readings ------------------------------------------------------------------------------

def proc_status_kib(field: str, pid: str = "self") -> int:
    """A ``/proc/PID/status`` field in KiB (``VmRSS``, ``VmHWM``), or 0 when absent."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def mem_available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


class MemoryProbe:
    """Marks of (label, kind, seconds, RSS, peak RSS since the previous mark), in bytes.

    A thread samples ``VmRSS`` every ``interval`` seconds (and ends the process past ``abort_above``);
    a phase that sets a new ``VmHWM`` (the process's exact peak so far, what ``ru_maxrss`` reports)
    gets that exact value as its peak. ``kind`` says who worked in the phase a mark ends.
    """

    def __init__(self, interval: float = 0.02, abort_above: float = float("inf")) -> None:
        self.started = time.time()
        self.abort_above = abort_above
        self.marks: list[dict[str, Any]] = []
        self._phase_max = 0
        self._hwm = proc_status_kib("VmHWM") * 1024
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval,), daemon=True)
        self._thread.start()

    def _sample(self, interval: float) -> None:
        while not self._stop.wait(interval):
            rss = proc_status_kib("VmRSS") * 1024
            self._phase_max = max(self._phase_max, rss)
            if rss > self.abort_above:  # a safety net: never push the machine into swap or the OOM killer
                sys.stderr.write(f"RSS {rss / GIB:.2f} GiB passed the limit {self.abort_above / GIB:.2f} GiB; aborted\n")
                os._exit(3)

    def mark(self, label: str, kind: str = "server") -> None:
        rss, hwm = proc_status_kib("VmRSS") * 1024, proc_status_kib("VmHWM") * 1024
        peak = max(self._phase_max, rss, hwm if hwm > self._hwm else 0)
        self._phase_max, self._hwm = 0, hwm
        self.marks.append({"label": label, "kind": kind, "t": round(time.time() - self.started, 2), "rss": rss,
                           "peak_since_last": peak})

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# -- the in-process Grid (after tests/server/conftest.py's InProcessGrid) ---------------------------

def _wires() -> dict[str, tuple[Callable, Callable]]:
    """How a reply reaches the server: (pack on the node's side, unpack on the server's side).

    ``objects``: Flower's own transport since 1.20. A node deflates the message into its objects
    (arrays in chunks of at most 5 MiB) and pushes them; the ServerApp's ``HttpGrid.pull_messages``
    pulls their bytes and calls ``inflate_object_from_contents``, done here on the same bytes.
    ``proto``: tests/server/conftest.py's round trip through ``message_to_proto`` bytes (the same
    objects in the end; on this machine 25 s per reply instead of 4 s).
    """
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=no-name-in-module
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    def deflate(msg):
        return msg.object_id, {oid: obj.deflate() for oid, obj in get_all_nested_objects(msg).items()}

    def inflate(packed):
        return inflate_object_from_contents(*packed)

    def serialize(msg):
        return message_to_proto(msg).SerializeToString()

    def parse(data):
        return message_from_proto(ProtoMessage.FromString(data))

    return {"objects": (deflate, inflate), "proto": (serialize, parse)}


def _grid_class():
    """Imported late: the parent process never loads flwr or torch."""
    from flwr.app import Context, Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.serverapp import Grid
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity

    class BenchGrid(Grid):
        """N nodes that reply when pulled. The tests' InProcessGrid, copied rather than imported
        (conftest.py needs pytest and is no package) and changed where a memory figure needs it:

        - a reply is made when the server pulls it, not when the instruction is pushed: replies that
          wait belong in a SuperLink's memory, not in the ServerApp's, and a server that pulls replies
          one at a time must be seen doing so;
        - only replies travel as bytes (``wire``, see :func:`_wires`): they are what the server holds.
          A node reads the server's instruction in place (it never writes to it): a decoded 413 MB
          copy per node would be node-side work and no server memory;
        - no list of the delivered instructions (N decoded models no ServerApp holds).
        """

        def __init__(self, handler: Callable[[Message, Context], Message], n: int, probe: MemoryProbe,
                     wire: str = "objects") -> None:
            self.handler, self.probe = handler, probe
            self.pack, self.unpack = _wires()[wire]
            self.contexts = {nid: Context(run_id=1, node_id=nid, node_config={}, state=RecordDict(), run_config={})
                             for nid in range(2, n + 2)}  # node 1 is the SuperLink's id
            self._pending: dict[str, Message] = {}
            self.replies_served = 0
            self._run = Run.create_empty(1)
            TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID

        def set_run(self, run: Run) -> None:
            self._run = run

        @property
        def run(self) -> Run:
            return self._run

        def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
            return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

        def get_node_ids(self):
            return list(self.contexts)

        def push_messages(self, messages):
            self.probe.mark("instructions pushed")
            ids = []
            for msg in messages:
                msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
                self._pending[msg.metadata.message_id] = msg
                ids.append(msg.metadata.message_id)
            return ids

        def pull_messages(self, message_ids):
            replies = []
            for message_id in list(message_ids):
                msg = self._pending.pop(message_id, None)
                if msg is None:
                    continue
                self.probe.mark("pulling")
                reply = self.handler(msg, self.contexts[msg.metadata.dst_node_id])
                reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
                packed = self.pack(reply)  # the bytes that leave the site
                del reply, msg
                self.probe.mark("site replied", NODE)
                replies.append(self.unpack(packed))  # the server's side of the pull
                replies[-1].metadata.__dict__["_message_id"] = str(uuid.uuid4())
                del packed
                self.replies_served += 1
            return replies

        def send_and_receive(self, messages, *, timeout=None):
            return self.pull_messages(self.push_messages(messages))

    return BenchGrid


def perturbed_reply(msg, context):
    """A site's reply: the global arrays plus small Gaussian noise (seeded by node), 10 examples."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    rng = np.random.default_rng(context.node_id)
    out = {}
    for key, array in msg.content.array_records["arrays"].items():
        value = array.numpy()
        if np.issubdtype(value.dtype, np.floating):
            value = value + rng.standard_normal(value.shape, dtype=np.float32).astype(value.dtype) * 1e-4
        out[key] = Array(np.ascontiguousarray(value))
        del value
    metrics = MetricRecord({"num-examples": 10, "train-loss": 1.0, "train-seconds": 0.0})
    return Message(RecordDict({"arrays": ArrayRecord(array_dict=out), "metrics": metrics}), reply_to=msg)


def instrument_strategy(probe: MemoryProbe, timings: list[dict[str, Any]]) -> None:
    """Wrap ``build_strategy`` as ``run_federation`` sees it, so each round's phases are marked: round
    start (``configure_train``) and the aggregation (``aggregate_train`` over a list of replies, or
    ``aggregate_streamed`` where the loop folds each reply into a running mean as it arrives)."""
    import server.federation as federation

    original = federation.build_strategy

    def timed(name: str, method: Callable) -> Callable:
        def call(*args, **kwargs):
            probe.mark(f"before {name}")
            started = time.perf_counter()
            result = method(*args, **kwargs)
            timings.append({"method": name, "seconds": round(time.perf_counter() - started, 2)})
            probe.mark(name)
            return result
        return call

    def build(settings):
        strategy = original(settings)
        configure = strategy.configure_train

        def configure_train(server_round, arrays, config, grid):
            probe.mark(f"round {server_round} start")
            return configure(server_round, arrays, config, grid)

        strategy.configure_train = configure_train
        for name in ("aggregate_train", "aggregate_streamed"):
            if hasattr(strategy, name):
                setattr(strategy, name, timed(name, getattr(strategy, name)))
        return strategy

    federation.build_strategy = build


# -- one N, in a fresh process ----------------------------------------------------------------------

def run_child(sites: int, rounds: int, threads: int, limit_gib: float, wire: str) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    import server.federation
    from server.settings import settings_from_run_config

    probe = MemoryProbe(abort_above=min(limit_gib * GIB, mem_available_bytes() - GIB))
    timings: list[dict[str, Any]] = []
    instrument_strategy(probe, timings)
    grid = _grid_class()(perturbed_reply, sites, probe, wire)
    with tempfile.TemporaryDirectory(prefix="server_memory_") as tmp:
        settings = settings_from_run_config({
            "preset": str(MODEL_YAML), "num-rounds": rounds, "min-available": sites, "min-replies": sites,
            "run-dir": str(Path(tmp) / "run"), "keep-checkpoints": 1, "max-update-norm": 1e6,
        })
        probe.mark("imports")
        summary = server.federation.run_federation(grid, settings)
        probe.mark("checkpoint")
        history = [json.loads(line) for line in (Path(tmp) / "run" / "history.jsonl").read_text().splitlines()]
    probe.stop()
    return {"sites": sites, "rounds": rounds, "code": server.federation.__file__, "wire": wire,
            "model_bytes": sum(a.nbytes for a in summary.pop("final_arrays").values()),
            "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "marks": probe.marks,
            "aggregation": timings, "replies_served": grid.replies_served,
            "history_aggregation_seconds": [h.get("aggregation_seconds") for h in history],
            "valid": [h["participation"]["valid"] for h in history]}


# -- reading a child's marks ------------------------------------------------------------------------

def rounds_of(marks: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The marks split at each "round N start" (the marks before round 1 are left out)."""
    out: list[list[dict[str, Any]]] = []
    for m in marks:
        if m["label"].startswith("round ") and m["label"].endswith(" start"):
            out.append([])
        if out:
            out[-1].append(m)
    return out


def rss_after_replies(round_marks: list[dict[str, Any]]) -> list[int]:
    return [m["rss"] for m in round_marks if m["kind"] == NODE]


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Baseline (round 1 start), the server's peak (the nodes' phases left out), per model size."""
    marks = result["marks"]
    baseline = next(m["rss"] for m in marks if m["label"] == "round 1 start")
    in_rounds = [m for r in rounds_of(marks) for m in r][1:]  # the phase ending at round 1's start: the build
    server = [m["peak_since_last"] for m in in_rounds if m["kind"] != NODE] + \
             [m["rss"] for m in in_rounds if m["kind"] == NODE]
    size = result["model_bytes"]
    last_reply = max(max(rss_after_replies(r)) for r in rounds_of(marks))
    return {"baseline": baseline, "server_peak": max(server), "size": size, "above": max(server) - baseline,
            "ratio": (max(server) - baseline) / size, "last_reply_ratio": (last_reply - baseline) / size,
            "loop": "streamed" if any(t["method"] == "aggregate_streamed" for t in result["aggregation"]) else "list"}


def print_rounds(result: dict[str, Any]) -> None:
    """Each round's server phases, and the RSS after each reply is in (the nodes' phases summed up)."""
    print(f"  N={result['sites']} ({result['code']}, replies as {result['wire']}): seconds, RSS GiB, "
          "peak since the previous mark GiB")
    for i, marks in enumerate(rounds_of(result["marks"]), 1):
        nodes = [m for m in marks if m["kind"] == NODE]
        pulls = [m for m in marks if m["label"] == "pulling"]
        for m in marks:
            if m["kind"] != NODE and m["label"] != "pulling":
                print(f"    {m['t']:7.1f}  {m['label']:<26} rss {m['rss'] / GIB:6.2f}  peak {m['peak_since_last'] / GIB:6.2f}")
            if nodes and m is nodes[-1]:
                print(f"             {len(nodes)} sites replied: peak during the in-process nodes' work "
                      f"{max(n['peak_since_last'] for n in nodes) / GIB:.2f}, during the server's work between "
                      f"replies {max(p['peak_since_last'] for p in pulls) / GIB:.2f}")
                print("             RSS as each site's reply arrives (its bytes, before the server inflates them): " + " ".join(f"{x / GIB:.2f}" for x in rss_after_replies(marks)))


def fmt_seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def print_table(results: list[dict[str, Any]]) -> None:
    """One row per N. "aggregate call": ``aggregate_train`` (list) or ``aggregate_streamed`` (the final
    mean; the checks and folding happen as replies arrive); the history's ``aggregation_seconds``
    counts the checks and folding too."""
    print("\n| sites | loop | model MB | baseline RSS GiB | peak RSS GiB (ru_maxrss, incl. in-process nodes) "
          "| server peak GiB | server peak above baseline GiB | / model size | RSS after the last reply above "
          "baseline / model size | aggregate call s per round | history aggregation_seconds per round |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        s = summarize(r)
        seconds = ", ".join(f"{t['seconds']:.1f}" for t in r["aggregation"])
        history = ", ".join(fmt_seconds(x) for x in r["history_aggregation_seconds"])
        print(f"| {r['sites']} | {s['loop']} | {s['size'] / 1e6:.1f} | {s['baseline'] / GIB:.2f} | {r['maxrss'] / GIB:.2f} "
              f"| {s['server_peak'] / GIB:.2f} | {s['above'] / GIB:.2f} | {s['ratio']:.1f} | {s['last_reply_ratio']:.1f} "
              f"| {seconds} | {history} |")


# -- the parent ---------------------------------------------------------------------------------------

def measure(sites: int, args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, **FLOWER_ENV}
    args = [sys.executable, __file__, "--child", str(sites), "--rounds", str(args.rounds), "--threads",
            str(args.threads), "--limit-gib", str(args.limit_gib), "--wire", args.wire]
    done = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"N={sites} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def growth_per_site(results: list[dict[str, Any]]) -> tuple[float, str]:
    """Bytes of peak RSS per additional site: between the two largest N measured, or with one N, the
    RSS each reply after the first added within its rounds (the first also leaves the allocator's share
    of the node's freed scratch memory, which later replies reuse)."""
    if len(results) >= 2:
        a, b = sorted(results, key=lambda r: r["sites"])[-2:]
        return (b["maxrss"] - a["maxrss"]) / (b["sites"] - a["sites"]), f"peak RSS N={a['sites']} -> N={b['sites']}"
    only = results[0]
    added = [(after[-1] - after[0]) / (len(after) - 1) for after in map(rss_after_replies, rounds_of(only["marks"]))
             if len(after) > 1]
    return max(0.0, max(added, default=0.0)), f"RSS added per reply after the first, within N={only['sites']}'s rounds"


def fits(results: list[dict[str, Any]], sites: int, limit_gib: float) -> bool:
    """Print the projection of N=``sites`` from what was measured; True when it fits well."""
    per_site, source = growth_per_site(results)
    peak = results[-1]["maxrss"] + per_site * (sites - results[-1]["sites"])
    room = min(limit_gib * GIB * SAFETY, mem_available_bytes() - 2 * GIB)
    print(f"N={sites}: measured growth {per_site / MIB:.0f} MiB per site ({source}; "
          f"{per_site / results[-1]['model_bytes']:.2f} x model size) projects a peak RSS of {peak / GIB:.1f} GiB; "
          f"room: {room / GIB:.1f} GiB (min of {SAFETY:.0%} of {limit_gib:g} GiB and MemAvailable - 2 GiB)", flush=True)
    if peak > room:
        print(f"N={sites}: NOT RUN, it would not fit; the projection above stands in for it.", flush=True)
    return peak <= room


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 10, 30])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each child")
    parser.add_argument("--limit-gib", type=float, default=12.0, help="never start an N projected to peak near this")
    parser.add_argument("--wire", choices=("objects", "proto"), default="objects",
                        help="how replies travel as bytes (see _wires)")
    parser.add_argument("--json", help="also write every N's result (marks included) to this file")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, args.rounds, args.threads, args.limit_gib, args.wire)))
        return
    results: list[dict[str, Any]] = []
    for sites in sorted(args.sites):
        if results and not fits(results, sites, args.limit_gib):
            continue
        started = time.time()
        result = measure(sites, args)
        print(f"N={sites}: {time.time() - started:.0f} s, peak RSS {result['maxrss'] / GIB:.2f} GiB, valid replies "
              f"per round {result['valid']}", flush=True)
        print_rounds(result)
        results.append(result)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    print_table(results)


if __name__ == "__main__":
    main()
