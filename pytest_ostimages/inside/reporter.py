"""The guest side of ``--ost-run-inside``: a pytest plugin that streams reports out.

Copied into the guest and loaded with ``-p`` by the guest's own pytest, so it
imports nothing but pytest and the standard library. Every collection count and
test report goes out as one JSON line on file descriptor 3 (the SSH channel),
serialized with pytest's own ``pytest_report_to_serializable`` hook, the way
pytest-xdist's workers send reports to their controller. The guest's terminal
output goes to a log file instead.
"""

import json
import os

PREFIX = "@ost-inside@ "
_config = None
_out = None


def _emit(event):
    global _out
    if _out is None:
        _out = os.fdopen(int(os.environ.get("OST_INSIDE_FD", "3")), "w", buffering=1)
    _out.write(PREFIX + json.dumps(event) + "\n")
    _out.flush()


def pytest_configure(config):
    global _config
    _config = config


def pytest_collection_finish(session):
    _emit({"event": "collected", "count": len(session.items)})


def pytest_collectreport(report):
    if not report.passed:  # collection errors and skipped modules are the outer report's too
        _emit({"event": "report", "data": _serialized(report)})


def pytest_runtest_logstart(nodeid, location):
    _emit({"event": "logstart", "nodeid": nodeid, "location": list(location)})


def pytest_runtest_logreport(report):
    _emit({"event": "report", "data": _serialized(report)})


def pytest_runtest_logfinish(nodeid, location):
    _emit({"event": "logfinish", "nodeid": nodeid, "location": list(location)})


def pytest_sessionfinish(session, exitstatus):
    _emit({"event": "finish", "exitstatus": int(exitstatus)})


def _serialized(report):
    return _config.hook.pytest_report_to_serializable(config=_config, report=report)
