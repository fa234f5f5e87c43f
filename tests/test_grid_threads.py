"""The in-process grid's client threads decode Flower Arrays at once (numpy's np.load parses
each header with ast.literal_eval): parsing must survive threads on CPython 3.11."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Two threads parse array headers while finalisers of garbage cycles let the GIL switch in the
# middle of an AST conversion. Without server.grid.serialise_ast_parsing this raised
# "SystemError: AST constructor recursion depth mismatch" within 2 s in 4 of 4 runs here
# (CPython 3.11.7, cpython gh-106905), as it did in a client thread of a fresh clone's suite.
STRESS = """
import ast, gc, sys, threading, time
from server.grid import serialise_ast_parsing
serialise_ast_parsing()
serialise_ast_parsing()  # idempotent: one lock, not a lock around a lock

class Cycle:
    def __init__(self): self.me = self
    def __del__(self): time.sleep(0)

errors = []
def work():
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (64, 3, 3, 3), }"
    for _ in range(20000):
        Cycle()
        try:
            assert ast.literal_eval(header)["shape"] == (64, 3, 3, 3)
        except SystemError as exc:
            errors.append(str(exc))
            return

gc.set_threshold(50)
sys.setswitchinterval(1e-6)
threads = [threading.Thread(target=work) for _ in range(2)]
[t.start() for t in threads]
[t.join() for t in threads]
print(len(errors), errors[:1])
"""


def test_header_parsing_in_two_threads_never_fails():
    out = subprocess.run([sys.executable, "-c", STRESS], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0 []", out.stdout
