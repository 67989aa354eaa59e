"""obdask's dask.config namespace: defaults, schema, overrides, no writes on import."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import dask
import yaml

from obdask import config


def leaves(tree, prefix=""):
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value and key not in ("models", "storage-options"):
            yield from leaves(value, path)
        else:
            yield path


def test_defaults_are_registered():
    assert dask.config.get("obdask.run.timeout") == "120s"
    assert "git" in dask.config.get("obdask.cmd.allowlist")
    assert config.get_seconds("run.timeout") == 120
    assert config.get("run.retries", 3) == 3  # explicit argument wins over config


def test_every_key_has_a_schema_description():
    with open(config.DEFAULTS_FILE) as f:
        defaults = yaml.safe_load(f)
    with open(config.SCHEMA_FILE) as f:
        schema = yaml.safe_load(f)
    for path in leaves(defaults):
        node = schema
        for part in path.split("."):
            node = node["properties"][part]
        assert node.get("description"), path
        assert not node["description"].startswith("See obdask.yaml"), path


def test_environment_overrides_and_no_writes_to_home(tmp_path):
    code = ("import json, dask, obdask; "
            "print(json.dumps([dask.config.get('obdask.run.timeout'), "
            "dask.config.get('obdask.cmd.allow-substitution')]))")
    env = {**os.environ, "HOME": str(tmp_path), "DASK_OBDASK__RUN__TIMEOUT": "5m",
           "DASK_OBDASK__CMD__ALLOW_SUBSTITUTION": "True", "DASK_CONFIG": str(tmp_path / "dc")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert json.loads(out.stdout) == ["5m", True]
    assert list(tmp_path.iterdir()) == []


def test_importing_obdask_does_not_import_distributed():
    code = "import sys, obdask, obdask.plan; print('distributed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
