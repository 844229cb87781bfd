"""The sandbox worker: the only process that imports and runs a submitted measure's code.

Started by :class:`suite.sandbox.SandboxSession` as ``python -m suite.sandbox.worker`` inside
bubblewrap (or, where the user chose so, a plain subprocess), with resource limits already set.
It imports what the suite needs, installs the system-call filter (:mod:`suite.sandbox.seccomp`),
and only then imports the measure. It answers requests, one JSON object per line, on a pipe
the submitted code does not own: the pipes it was started with are moved to private file
descriptors and the measure's ``print`` goes to standard error, which the engine logs.

Arrays travel as ``.npy`` files without pickles (``allow_pickle=False`` on both sides): the
engine writes the traces into the session's read-only input folder; the worker writes scores
and masks into the scratch folder, the only place it may write. Nothing the worker sends is
trusted by the engine: results are checked there (shape, dtype, finiteness) like any measure's.

Requests (``op`` and arguments) and what they return:

- ``load`` (``kind``: ``file`` with ``path``, or ``import`` with ``spec``): the class's
  declared attributes, or ``api_error``;
- ``new`` (``options``): a handle for an instance;
- ``fit`` (``handle``, ``traces``: a folder, ``options``);
- ``scores`` (``handle``, ``traces``): the ``.npy`` path of the scores, or what was returned
  instead of an array;
- ``thresholds_for`` / ``checked_layers`` (``handle``, ``num_layers``), ``check_cost``
  (``handle``, ``dims``): the values, faithfully (a wrong type is reported, not fixed);
- ``close``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any


def _json_value(value: Any) -> Any:
    """``value`` as JSON when it is a plain number, bool, string or list of them; else a
    ``{"repr": ..., "type": ...}`` marker so the engine reports it as it was."""
    import numpy as np

    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, np.generic):
        return {"numpy": value.item(), "type": type(value).__name__}
    if isinstance(value, (list, tuple)):
        items = [_json_value(v) for v in value]
        return {"sequence": items, "type": type(value).__name__}
    if isinstance(value, (set, frozenset)):
        return {"set": sorted((_json_value(v) for v in value), key=repr),
                "type": type(value).__name__}
    return {"repr": repr(value)[:500], "type": type(value).__name__}


class Worker:
    def __init__(self, scratch: Path):
        self.scratch = scratch
        self.measure_cls: Any = None
        self.instances: dict[int, Any] = {}
        self.counter = 0

    # -- requests ------------------------------------------------------------------------
    def load(self, kind: str, path: str | None = None, spec: str | None = None) -> dict:
        import inspect

        from suite.measures import Measure
        from suite.registry import import_object
        from suite.validate import load_measure_file

        cls = load_measure_file(path).measure_cls if kind == "file" else import_object(spec)
        self.measure_cls = cls
        if not (isinstance(cls, type) and issubclass(cls, Measure)):
            return {"api_error": f"{cls!r} is not a subclass of suite.measures.Measure; derive "
                                 f"the measure class from it", "qualname": repr(cls)}
        if inspect.isabstract(cls):
            return {"api_error": f"{cls.__name__} does not implement "
                                 f"{', '.join(sorted(cls.__abstractmethods__))}",
                    "qualname": cls.__qualname__}
        attributes = {name: _json_value(getattr(cls, name, None))
                      for name in ("name", "description", "reads", "fit_reads", "needs_fit",
                                   "deployable", "propagation", "thresholds")}
        return {"api_error": None, "qualname": cls.__qualname__, "attributes": attributes,
                "defines_fit": cls.fit is not Measure.fit}

    def new(self, options: dict) -> int:
        instance = self.measure_cls(**options)
        self.counter += 1
        self.instances[self.counter] = instance
        return self.counter

    def fit(self, handle: int, traces: str, options: dict) -> None:
        from suite.validate import call_fit

        call_fit(self.instances[handle], read_traces(Path(traces)), **options)

    def scores(self, handle: int, traces: str) -> dict:
        import numpy as np

        result = self.instances[handle].scores(read_traces(Path(traces)))
        return self._array(result, np)

    def thresholds_for(self, handle: int, num_layers: int) -> Any:
        return _json_value(self.instances[handle].thresholds_for(num_layers))

    def checked_layers(self, handle: int, num_layers: int) -> dict:
        import numpy as np

        return self._array(self.instances[handle].checked_layers(num_layers), np)

    def check_cost(self, handle: int, dims: dict) -> dict:
        from suite.measures import CheckCost, ModelDims

        cost = self.instances[handle].check_cost(ModelDims(**dims))
        if not isinstance(cost, CheckCost):
            return {"not_check_cost": type(cost).__name__}
        return {"flops": _json_value(cost.flops), "bytes": _json_value(cost.bytes),
                "needs_lm_head": _json_value(cost.needs_lm_head)}

    def _array(self, result: Any, np) -> dict:
        if not isinstance(result, np.ndarray):
            return {"not_array": type(result).__name__}
        if result.dtype.hasobject:
            return {"object_array": list(result.shape)}
        self.counter += 1
        path = self.scratch / f"out-{self.counter}.npy"
        np.save(path, result, allow_pickle=False)
        return {"path": str(path)}


def read_traces(folder: Path):
    """A :class:`~suite.traces.TraceArrays` from the ``.npy`` fields the engine wrote (fields
    it did not send are ``None``)."""
    import dataclasses

    import numpy as np

    from suite.traces import TraceArrays

    values = {}
    for field in dataclasses.fields(TraceArrays):
        path = folder / f"{field.name}.npy"
        values[field.name] = np.load(path, allow_pickle=False) if path.is_file() else None
    if values["example_id"] is not None:
        values["example_id"] = values["example_id"].astype(object)
    return TraceArrays(**values)


def serve(requests, replies, worker: Worker) -> None:
    for line in requests:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            op = request.pop("op")
            if op == "close":
                replies.write(json.dumps({"ok": True, "result": None}) + "\n")
                replies.flush()
                return
            if op.startswith("_") or not hasattr(worker, op):
                raise ValueError(f"unknown request {op!r}")
            reply = {"ok": True, "result": getattr(worker, op)(**request)}
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - SystemExit too: it goes back as an error
            text = str(exc).strip().splitlines()
            reply = {"ok": False, "type": type(exc).__name__,
                     "message": text[0][:1000] if text else "(no message)",
                     "traceback": "".join(traceback.format_exception(exc))[-4000:]}
        try:
            data = json.dumps(reply)
        except (TypeError, ValueError) as exc:
            data = json.dumps({"ok": False, "type": "TypeError",
                               "message": f"the result could not be sent back ({exc})"})
        replies.write(data + "\n")
        replies.flush()


def main() -> int:
    # Private copies of the request and reply pipes; the measure gets /dev/null as standard
    # input and standard error as standard output.
    requests = os.fdopen(os.dup(0), "r", encoding="utf-8")
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    scratch = Path(os.environ["EXITBENCH_SANDBOX_SCRATCH"])
    # what the suite itself needs, imported before the filter goes on
    import numpy  # noqa: F401

    import suite.measures  # noqa: F401
    import suite.traces  # noqa: F401
    import suite.validate  # noqa: F401
    from suite.sandbox import seccomp

    if os.environ.get("EXITBENCH_SANDBOX_SECCOMP", "1") == "1":
        seccomp.install()
    os.chdir(scratch)
    serve(requests, replies, Worker(scratch))
    return 0


if __name__ == "__main__":  # pragma: no cover - run by the engine
    sys.exit(main())
