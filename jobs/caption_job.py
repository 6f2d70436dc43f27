"""``python -m jobs.caption_job --config FILE``: ``captioner run --config FILE`` under another name.

    ray job submit --address http://HEAD:8265 -- python -m jobs.caption_job --config /abs/run.json

where ``run.json`` is a resolved config (``captioner run`` saves one beside
every output, with absolute paths). It exists for ``ray job submit``, whose
entrypoint is a command line on the cluster's Python; every flag of
``captioner run`` works here too. The run itself is :mod:`jobs.run`; the Ray
session, resource plan and dataset are :mod:`jobs.ray_plan`.
"""

from __future__ import annotations

import sys

from jobs.ray_plan import RayUnavailable
from jobs.run import RunSummary, run_job

__all__ = ["RayUnavailable", "RunSummary", "main", "run_job"]


def main(argv: list[str] | None = None) -> int:
    from pipeline.cli import main as cli

    args = sys.argv[1:] if argv is None else list(argv)
    try:
        cli.main(["run", *args], prog_name="python -m jobs.caption_job")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
