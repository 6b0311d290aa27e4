"""What a ``cosmos embed`` process pays before its first image (issue 22, item 2).

The CLI imports only what the embed verb needs (no Dask, no ONNX, no finetuning module), the
runtimes' export-only packages are looked up without being imported, and an OpenVINO encoder
keeps its compiled model in a cache beside the export, so a later process skips the compile.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from cosmoslib.models import backends
from cosmoslib.tests.test_backend_auto import shrunk_vit

#: Modules `cosmos embed` must not import before it needs them.
NOT_FOR_EMBED = ("distributed", "dask", "dask_jobqueue", "onnx", "nncf",
                 "cosmoslib.protocol.distributed", "cosmoslib.protocol.evaluate",
                 "cosmoslib.protocol.finetune", "cosmoslib.protocol.propagation")


def test_cli_import_and_parser_leave_the_heavy_modules_alone():
    code = ("import json, sys; from cosmoslib import cli; cli.build_parser(); "
            f"print(json.dumps([m for m in {list(NOT_FOR_EMBED)!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_finetune_choices_are_checked_when_used():
    from cosmoslib import cli

    parser = cli.build_parser()
    args = parser.parse_args(["finetune", "ROOT", "--model", "m", "--out", "DIR", "--prompts", "mixed"])
    assert args.prompts == "mixed"
    with pytest.raises(SystemExit):
        parser.parse_args(["finetune", "ROOT", "--model", "m", "--out", "DIR", "--prompts", "nope"])


def test_export_only_packages_are_looked_up_not_imported(monkeypatch):
    pytest.importorskip("openvino")
    monkeypatch.delitem(sys.modules, "onnx", raising=False)
    backends._import("openvino")
    assert "onnx" not in sys.modules  # found by find_spec, not imported
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now fails: not installed
    with pytest.raises(ImportError, match="'onnx'"):
        backends._import("openvino")


def test_openvino_compiled_model_is_cached_beside_the_export(tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    pytest.importorskip("onnx")
    monkeypatch.setenv("COSMOS_EXPORTS", str(tmp_path / "exports"))
    model = dataclasses.replace(shrunk_vit(), backend="openvino")  # exports and compiles
    path = backends.exported_path(model, "openvino")
    cache = path.parent / backends.COMPILE_CACHE
    blobs = sorted(p.name for p in cache.iterdir())
    assert blobs, "no compiled model stored"
    again = backends.ExportedEncoder("openvino", path, torch.get_num_threads())  # from the cache
    assert sorted(p.name for p in cache.iterdir()) == blobs  # reused, nothing new compiled
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, 256, 256), dtype=np.float32))
    np.testing.assert_array_equal(again(x).numpy(), model._exported(x).numpy())
