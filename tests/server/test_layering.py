"""The server's module layout: no import cycle, and the job layer works without the web layer."""

from __future__ import annotations

import subprocess
import sys

import grimp


def test_no_import_cycle_among_server_modules() -> None:
    graph = grimp.build_graph("tensafe")
    modules = sorted(m for m in graph.modules if m.startswith("tensafe.server."))
    assert "tensafe.server.services" in modules and "tensafe.server.routers.training" in modules
    cycles = []
    for module in modules:
        for imported in graph.find_modules_directly_imported_by(module):
            if not imported.startswith("tensafe.server.") or imported.startswith(module + "."):
                continue
            if module.startswith(imported + "."):
                continue  # a package's __init__ importing its own submodule, or the reverse
            chain = graph.find_shortest_chain(importer=imported, imported=module)
            if chain is not None:
                cycles.append((module, *chain))
    assert not cycles, f"import cycles among server modules: {cycles}"


def test_the_job_layer_imports_no_router() -> None:
    code = (
        "import sys\n"
        "import tensafe.server.jobs, tensafe.server.retention\n"
        "import tensafe.server.checkpoints, tensafe.server.ops\n"
        "web = ('tensafe.server.routers', 'tensafe.server.app', 'tensafe.server.deps')\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(web))\n"
        "print(loaded)\n"
    )
    # tensafe.server's __init__ imports the app; load the job modules without running it.
    prelude = (
        "import importlib.util, sys, types\n"
        "spec = importlib.util.find_spec('tensafe.server')\n"
        "pkg = types.ModuleType('tensafe.server'); pkg.__path__ = list(spec.submodule_search_locations)\n"
        "sys.modules['tensafe.server'] = pkg\n"
    )
    out = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
