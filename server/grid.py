"""A Grid that runs the ClientApp in this process (no Ray): one message after the other, or
`workers` at once in threads, each client on one torch thread (as Ray's actors of one CPU).
Threads share the weights the server sends instead of serialising 45 MB per client each way,
which is where Ray's time goes on a small machine (see the launcher).

It runs the same ServerApp, ClientApp and strategy as Flower's simulation engine: nodes get
random 64-bit ids and a `partition-id` / `num-partitions` node config, each node keeps its
Context between rounds, a ClientApp exception becomes an error reply (as under Ray).
"""
from __future__ import annotations

import ast
import functools
import secrets
import threading
import traceback
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from uuid import uuid4

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

CLIENT_APP_EXCEPTION = 300  # Flower's ErrorCode.CLIENT_APP_RAISED_EXCEPTION


def serialise_ast_parsing() -> None:
    """Make `ast.parse` take turns between threads (once per process).

    numpy's `np.load` reads every array's header with `ast.literal_eval`, and Flower decodes
    every Array through it (our clients' global state, its SecAgg+ and DP mods). CPython
    3.11's AST constructor keeps its recursion depth per interpreter, not per thread; when a
    finaliser lets the GIL switch in the middle of one conversion, another thread's parse
    corrupts it: "SystemError: AST constructor recursion depth mismatch" (cpython gh-106905).
    Client threads decoding at once hit this about once in two test suites. Parsing a
    header takes microseconds, so waiting for the lock costs nothing measurable."""
    if getattr(ast.parse, "serialised", False):
        return
    parse, lock = ast.parse, threading.Lock()

    @functools.wraps(parse)
    def serialised_parse(*args, **kwargs):
        with lock:
            return parse(*args, **kwargs)

    serialised_parse.serialised = True  # type: ignore[attr-defined]
    ast.parse = serialised_parse  # ast.literal_eval looks `parse` up in the module: it uses this


def own_records(content: RecordDict) -> RecordDict:
    """A message's content with its own config and metric records. Flower's engines
    serialise every message, so each node gets its own copy; here messages built from one
    RecordDict would share it, and a ClientApp mod may edit a record in place (SecAgg+'s pops
    its stage). Arrays are shared: clients only read them, and copying them costs."""
    own = RecordDict()
    for key, record in content.items():
        if isinstance(record, ConfigRecord):
            record = ConfigRecord(dict(record))
        elif isinstance(record, MetricRecord):
            record = MetricRecord(dict(record))
        own[key] = record
    return own


class InProcessGrid(Grid):
    def __init__(self, client_app: ClientApp, num_nodes: int, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1; got {workers}")
        self.client_app = client_app
        self.workers = workers
        self._run = Run.create_empty(run_id=secrets.randbits(63))
        # Messages take their run and source from the process's task identity (as
        # run_simulation sets it for its in-memory grid).
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = self._run.run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        self.contexts: dict[int, Context] = {}
        for pid in range(num_nodes):
            node_id = secrets.randbits(63)
            self.contexts[node_id] = Context(
                run_id=self._run.run_id, node_id=node_id,
                node_config={"partition-id": pid, "num-partitions": num_nodes},
                state=RecordDict(), run_config={},
            )
        self._queue: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            if msg.metadata.dst_node_id not in self.contexts:
                raise ValueError(f"no node {msg.metadata.dst_node_id}")
            if msg.has_content():
                msg.content = own_records(msg.content)
            msg_id = str(uuid4())
            msg.metadata.__dict__["_message_id"] = msg_id
            self._queue[msg_id] = msg
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        queued = [msg for msg in (self._queue.pop(i, None) for i in message_ids) if msg is not None]
        nodes = [msg.metadata.dst_node_id for msg in queued]
        if self.workers == 1 or len(queued) < 2 or len(set(nodes)) < len(nodes):  # a node's Context is not shared
            return [self._handle(msg) for msg in queued]
        from clients.training import single_thread

        serialise_ast_parsing()
        # torch's thread count is process-wide: one for all workers (the clients' own
        # single_thread() then nests inside it), the server's count back afterwards.
        with single_thread(), ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(self._handle, queued))

    def _handle(self, msg: Message) -> Message:
        context = self.contexts[msg.metadata.dst_node_id]
        try:
            reply = self.client_app(msg, context)
        except Exception as exc:  # noqa: BLE001 - a failing client is a reply, as under Ray
            reason = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"
            reply = Message(Error(code=CLIENT_APP_EXCEPTION, reason=reason), reply_to=msg)
        reply.metadata.__dict__["_message_id"] = str(uuid4())
        return reply

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


__all__ = ["InProcessGrid"]
