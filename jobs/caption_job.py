"""``python -m jobs.caption_job --config FILE``: run a saved config, e.g. through ``ray job submit``.

    ray job submit --address http://HEAD:8265 -- python -m jobs.caption_job --config /abs/run.json

where ``run.json`` is a resolved config (``captioner run`` saves one beside
every output, with absolute paths). The run itself is :mod:`jobs.run`; the
Ray session, resource plan and dataset are :mod:`jobs.ray_plan`.
"""

from __future__ import annotations

import argparse
import json
import sys

from jobs.ray_plan import RayUnavailable
from jobs.run import RunSummary, run_job, summary_json
from pipeline.config import load_run_config

__all__ = ["RayUnavailable", "RunSummary", "main", "run_job"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a captioner job from a resolved config file.")
    parser.add_argument("--config", required=True, help="a resolved run config (JSON/YAML), e.g. captions.config.json")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    summary = run_job(load_run_config(args.config), progress=not args.no_progress)
    print("\n".join(summary.lines()))
    print(json.dumps(summary_json(summary)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
