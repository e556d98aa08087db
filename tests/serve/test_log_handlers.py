"""The replica's log handlers survive vLLM's logging setup (no engine, child processes).

Ray Serve's replica logs through a MemoryHandler in front of its log file; vLLM's AsyncLLM
applies its logging config with dictConfig, which closes that handler. A closed MemoryHandler
keeps every later record in memory and writes none: the replica's memory grew by every
request's access-log line.
"""

from __future__ import annotations

from pathlib import Path

from tests.support.child import child_json

# Serve's real replica logger setup, then vLLM's real logging setup (what AsyncLLM runs), then
# 200 records as a replica logs them.
CHILD = """
import contextlib, json, logging, logging.handlers, sys
from ray.serve._private.constants import SERVE_LOGGER_NAME
from ray.serve._private.logging_utils import configure_component_logger
from ray.serve.schema import LoggingConfig
from vllm.config.logging import LoggingConfig as VllmLoggingConfig
from vllm.logger import configure_logging
from serve.vllm_glue import log_handlers_kept

logs_dir, keep = sys.argv[1], sys.argv[2] == "keep"
configure_component_logger(
    component_name="replica", component_id="probe", logging_config=LoggingConfig(logs_dir=logs_dir),
    max_bytes=10**7, backup_count=1,
)
serve_logger = logging.getLogger(SERVE_LOGGER_NAME)
for handler in serve_logger.handlers:
    if not isinstance(handler, logging.handlers.MemoryHandler):
        serve_logger.removeHandler(handler)  # the stderr copy: not under test
(memory,) = serve_logger.handlers
with log_handlers_kept() if keep else contextlib.nullcontext():
    configure_logging(VllmLoggingConfig())
for i in range(200):
    serve_logger.info("request %d", i)
print(json.dumps({"buffered": len(memory.buffer), "target": memory.target is not None}))
"""


def _run(tmp_path: Path, mode: str) -> tuple[dict, list[str]]:
    logs = tmp_path / mode
    result = child_json(CHILD, str(logs), mode)
    lines = [line for f in logs.glob("*.log") for line in f.read_text().splitlines()]
    return result, [line for line in lines if "request " in line]


def test_vllm_logging_setup_leaves_the_replica_logger_writing(tmp_path: Path) -> None:
    result, written = _run(tmp_path, "keep")
    assert result == {"buffered": 0, "target": True}
    assert len(written) == 200


def test_without_it_the_replica_logger_keeps_every_record(tmp_path: Path) -> None:
    # Why log_handlers_kept exists: if this stops failing that way, vLLM or Python changed.
    result, written = _run(tmp_path, "bare")
    assert result == {"buffered": 200, "target": False}
    assert written == []
