"""One smoke row in its own process: `python -m edgekd.doctor.row MODULE:FUNCTION JSON_KWARGS`.

The last stdout line is RESULT_MARK followed by {"detail": ...} or {"error": ...}; a crash or a kill
leaves no such line, and the parent reports the exit status and the log's last lines instead.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys

RESULT_MARK = "EDGEKD_SMOKE_RESULT "


def main(target: str, kwargs_json: str) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname).1s %(name)s: %(message)s", stream=sys.stderr)
    module, _, function = target.partition(":")
    try:
        detail = getattr(importlib.import_module(module), function)(**json.loads(kwargs_json))
        result, code = {"detail": str(detail)}, 0
    except Exception as exc:  # every kind of failure is this row's result, reported in one line
        logging.getLogger("edgekd.doctor").exception("row failed")
        message = getattr(exc, "message", None) or str(exc)
        first = next((line for line in message.splitlines() if line.strip()), "")
        result, code = {"error": f"{exc.__class__.__name__}: {first[:300]}"}, 1
    print(RESULT_MARK + json.dumps(result), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
