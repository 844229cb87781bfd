"""Source texts of submitted measures for the sandbox, submission and run-directory tests:
a well-behaved one, hostile ones (each tries one thing the sandbox must stop) and ones that
pass validation but fail only on real traces. Each is written to a file by the test, as a
researcher's file would be; the engine never imports them."""

from __future__ import annotations

from pathlib import Path

HEADER = '''import os
import numpy as np
from suite.measures import BYTES_PER_VALUE, CheckCost, DENSE_NEAR_ONE, Measure


def real(traces):
    """True on recorded traces, False on the validator's synthetic ones."""
    return not str(traces.example_id[0]).startswith("synthetic-")
'''


def measure_source(class_name: str, name: str, body: str, *, reads: str = '"top1_prob", "example_id"',
                   description: str = "a submitted test measure", extra: str = "") -> str:
    """A complete measure module whose ``scores`` runs ``body`` (indented, may use
    ``traces`` and ``scores``, the top-1 probabilities as float64) and returns ``scores``."""
    indented = "\n".join("        " + line for line in body.strip("\n").splitlines())
    return HEADER + f'''

class {class_name}(Measure):
    name = {name!r}
    description = {description!r}
    reads = frozenset({{{reads}}})
    thresholds = DENSE_NEAR_ONE
{extra}
    def scores(self, traces):
        scores = traces.top1_prob.astype(np.float64)
{indented}
        return scores

    def check_cost(self, dims):
        return CheckCost(flops=float(dims.vocab_size), bytes=float(BYTES_PER_VALUE * dims.vocab_size),
                         needs_lm_head=True)
'''


GOOD = measure_source("SquaredTop1", "squared_top1", "scores = scores ** 2",
                      description="top-1 probability squared (a submitted test measure)")
SECOND = measure_source("CubedTop1", "cubed_top1", "scores = scores ** 3",
                        description="top-1 probability cubed (a second submission)")
RAISES_ON_REAL = measure_source("RaisesOnReal", "raises_on_real", '''
if real(traces):
    raise ValueError("boom on real traces")''')
NAN_ON_REAL = measure_source("NanOnReal", "nan_on_real", '''
if real(traces):
    scores = scores.copy()
    scores[0, 0] = np.nan''')
SHAPE_ON_REAL = measure_source("ShapeOnReal", "shape_on_real", '''
if real(traces):
    scores = scores[:, :-1]''')
HOSTILE_NAME = measure_source("HostileName", "../../pwned", "scores = scores * 0.5")


def writer(target: Path) -> str:
    return measure_source("Writer", "writer", f'''
with open({str(target)!r}, "w") as fh:
    fh.write("written by a submitted measure")''')


def deleter(target: Path) -> str:
    return measure_source("Deleter", "deleter", f"os.remove({str(target)!r})")


SOCKET = measure_source("Socket", "socket_opener", '''
import socket
socket.create_connection(("127.0.0.1", 9), timeout=1)''')
FORK = measure_source("Forker", "forker", '''
pid = os.fork()
if pid == 0:
    os._exit(0)''')
SUBPROCESS = measure_source("Spawner", "spawner", '''
import subprocess
subprocess.run(["true"], check=True)''')
SLEEPER = measure_source("Sleeper", "sleeper", '''
import time
time.sleep(3600)''')
MEMORY_EATER = measure_source("MemoryEater", "memory_eater", '''
hog = np.ones((1 << 40,), dtype=np.uint8)  # a terabyte
scores = scores + hog[0]''')
ENV_READER = measure_source("EnvReader", "env_reader", '''
if os.environ.get("EXITBENCH_TEST_SECRET"):
    raise RuntimeError("the secret leaked in")''')
