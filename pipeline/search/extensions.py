"""Load DuckDB's fts extension from the installed PyPI wheel.

``duckdb-extension-fts`` ships the compiled
extension inside the Python package, built for one DuckDB version. Loading
that file by path means nothing is fetched from the network at run time, and a
version skew shows up as a clear error here rather than as DuckDB trying to
INSTALL from its repository.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import duckdb

from pipeline.search.errors import SearchError

# extension name -> the pip package that carries it
EXTENSION_PACKAGES = {"fts": "duckdb-extension-fts"}

# Passed to every connection we open: never download or auto-load an
# extension behind our back; we load exactly the files we found.
CONNECT_CONFIG = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}


def extension_path(name: str) -> Path:
    """The ``<name>.duckdb_extension`` file inside its PyPI package, for this DuckDB version."""
    pip_name = EXTENSION_PACKAGES[name]
    module = pip_name.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SearchError(
            f"the DuckDB {name} extension is not installed; install the pip package "
            f"'{pip_name}=={duckdb.__version__}' (it must match duckdb {duckdb.__version__})"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(package_dir.rglob(f"{name}.duckdb_extension"))
    wanted = [p for p in found if f"v{duckdb.__version__}" in p.parts]
    if not wanted:
        versions = sorted({p.parent.name for p in found}) or ["none"]
        raise SearchError(
            f"the pip package '{pip_name}' has no {name} extension for duckdb {duckdb.__version__} "
            f"(it has: {', '.join(versions)}); install '{pip_name}=={duckdb.__version__}'"
        )
    return wanted[0]


def load_extensions(con: duckdb.DuckDBPyConnection, names=("fts",)) -> None:
    for name in names:
        path = extension_path(name)
        # LOAD takes no bound parameter; the path is ours (found above), and
        # quoting it as a SQL string literal keeps odd characters inert.
        literal = "'" + str(path).replace("'", "''") + "'"
        try:
            con.execute(f"LOAD {literal}")
        except duckdb.Error as exc:
            raise SearchError(
                f"could not load the DuckDB {name} extension from {path}: {exc}; "
                f"reinstall '{EXTENSION_PACKAGES[name]}=={duckdb.__version__}'"
            ) from exc
