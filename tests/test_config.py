"""obdask's dask.config namespace: defaults, schema, overrides, no writes on import."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import dask
import pytest
import yaml

from obdask import config, settings


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


def schema_leaves(node, prefix=""):
    for key, sub in (node.get("properties") or {}).items():
        path = f"{prefix}.{key}" if prefix else key
        if sub.get("properties") and key not in ("models", "storage-options"):
            yield from schema_leaves(sub, path)
        else:
            yield path, sub


#: Keys the schema has ahead of obdask.yaml: the fusion branch adds them to obdask.yaml.
#: Delete an entry when obdask.yaml has the key.
SCHEMA_AHEAD = {"obdask.optimize.fuse", "obdask.optimize.batch", "obdask.optimize.batch-size",
                "obdask.optimize.batch-duration"}


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


def test_schema_and_defaults_have_the_same_keys_each_typed():
    with open(config.DEFAULTS_FILE) as f:
        defaults = yaml.safe_load(f)
    schema = settings.schema()
    typed = dict(schema_leaves(schema))
    assert set(leaves(defaults)) - set(typed) == set()  # a new key needs its schema entry
    assert set(typed) - set(leaves(defaults)) <= SCHEMA_AHEAD
    for path, node in typed.items():
        assert {"type", "enum", "$ref"} & set(node), f"{path} has no type in the schema"
        assert node.get("description"), path
    # Every section refuses keys it does not know (a typo is an error, not ignored).
    sections = schema["properties"]["obdask"]["properties"]
    assert all(node.get("additionalProperties") is False for node in sections.values()
               if node.get("properties"))


def test_defaults_are_valid_against_the_schema():
    assert settings.problems() == []


@pytest.mark.parametrize("key, value, message", [
    ("run.retries", -1, "obdask.run.retries: -1 is less than the minimum of 0"),
    ("run.retires", 3, "obdask.run.retires: unknown key (did you mean obdask.run.retries?)"),
    ("cmd.limits.procesess", 3,
     "obdask.cmd.limits.procesess: unknown key (did you mean obdask.cmd.limits.processes?)"),
    ("zzz", 1, "obdask.zzz: unknown key (known keys: workspace,"),
    ("store", "x", "obdask.store: 'x' is not a mapping"),  # and no check inside it trips
    ("llm.budgets", [{"name": "day", "tokens": 5, "window": 0}],
     "obdask.llm.budgets: budget 'day': window must be positive or null"),
    ("llm.budgets", [{"name": "day", "tokens": -5}],
     "obdask.llm.budgets.0.tokens: -5 is less than the minimum of 0"),
    ("judge.panel", [{"model": "x"}], "obdask.judge.panel.0: 'role' is a required property"),
    ("judge.margin", "wide", "obdask.judge.margin: 'wide' is not a number"),  # once, not twice
    ("cmd.sandbox", "zz", "obdask.cmd.sandbox: 'zz' is not one of auto, require, off"),
    ("plan.max-bytes", "-5MB", "obdask.plan.max-bytes: '-5MB' is not a size"),
    ("llm.model-slots", {"qwen": 0}, "obdask.llm.model-slots.qwen: 0 is less than the minimum"),
    ("optimize.batch-size", 0, "obdask.optimize.batch-size: 0 is less than the minimum of 1"),
    ("optimize.batch-duration", "soon", "obdask.optimize.batch-duration: 'soon' is not a duration"),
])
def test_schema_errors_name_the_key_path_and_cause(key, value, message):
    with dask.config.set({f"obdask.{key}": value}):
        found = settings.problems()
    assert len(found) == 1 and found[0].startswith(message), found


def test_good_values_of_every_format_pass():
    with dask.config.set({"obdask.run.timeout": 90, "obdask.cmd.max-output": "2 MiB",
                          "obdask.cmd.pdeathsig": "false", "obdask.cmd.sandbox": "off",
                          "obdask.placement.models": {"coder": "qwen2.5-coder:7b"},
                          "obdask.llm.slot-timeout": None, "obdask.judge.panel": "coder",
                          "obdask.optimize.fuse": True}):
        assert settings.problems() == []


def test_worker_read_keys_are_marked_and_documented():
    keys = settings.worker_keys()
    assert {"cmd.shell", "cmd.launcher", "llm.local-endpoint", "placement.lanes"} <= set(keys)
    with open(os.path.join(os.path.dirname(config.DEFAULTS_FILE), "..", "docs",
                           "configuration.md")) as f:
        doc = f.read()
    section = doc.split("### Keys read on each worker", 1)[1].split("\n#", 1)[0]
    assert [k for k in keys if f"`{k}`" not in section] == []


def test_unknown_key_in_a_config_file_stops_the_cli(tmp_path):
    (tmp_path / "plan.md").write_text("- [ ] id=a lane=1 payload=@cmd:touch ran\n")
    (tmp_path / "dc").mkdir()
    (tmp_path / "dc" / "obdask.yaml").write_text("obdask:\n  run:\n    retires: 2\n")
    result = subprocess.run([sys.executable, "-m", "obdask.cli", "validate", "plan.md"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "DASK_CONFIG": str(tmp_path / "dc")})
    assert result.returncode != 0
    assert "obdask.run.retires: unknown key (did you mean obdask.run.retries?)" in \
        result.stdout + result.stderr
    assert "Traceback" not in result.stderr


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


@pytest.mark.parametrize("value", ["abc", "12 parsecs", [1], "1GiB"])
def test_bad_duration_is_a_config_error(value):
    from obdask.exceptions import ConfigError

    with pytest.raises(ConfigError, match=r"obdask.run.timeout: .* is not a duration"):
        config.get_seconds("run.timeout", value)


@pytest.mark.parametrize("value", ["lots", "12 parsecs", [1]])
def test_bad_size_is_a_config_error(value):
    from obdask.exceptions import ConfigError

    with pytest.raises(ConfigError, match=r"obdask.cmd.max-output: .* is not a size"):
        config.get_bytes("cmd.max-output", value)


@pytest.mark.parametrize("getter, key, value, message", [
    ("get_int", "run.retries", "zzz", "is not a whole number"),
    ("get_int", "run.retries", 1.5, "is not a whole number"),
    ("get_int", "run.retries", True, "is not a whole number"),
    ("get_int", "run.retries", -1, "is below the minimum 0"),
    ("get_str", "workspace", -5, "is not a non-empty string"),
    ("get_str", "store.records", "", "is not a non-empty string"),
    ("get_str_list", "cmd.allowlist", -5, "is not a list of strings"),
    ("get_str_list", "cmd.allowlist", "git", "is not a list of strings"),
    ("get_str_list", "cmd.env-allowlist", ["PATH", 3], "is not a list of strings"),
    ("get_bool", "cmd.pdeathsig", "zzz", "is not true or false"),
    ("get_bytes", "cmd.max-output", -5, "is a negative size"),
])
def test_typed_getters_name_key_and_cause(getter, key, value, message):
    from obdask.exceptions import ConfigError

    with pytest.raises(ConfigError, match=f"obdask.{key}: .*{message}"):
        getattr(config, getter)(key, value)


def test_typed_getters_accept_good_values():
    assert config.get_int("run.retries", "3") == 3 and config.get_int("run.retries") >= 0
    assert config.get_str("workspace") is None or isinstance(config.get_str("workspace"), str)
    assert config.get_str_list("cmd.allowlist", ["git", "make"]) == ("git", "make")
    assert config.get_bool("cmd.pdeathsig", "false") is False
    assert config.get_bool("cmd.pdeathsig", True) is True


@pytest.mark.parametrize("env, message", [
    ("DASK_OBDASK__RUN__RETRIES=zzz", "obdask.run.retries: 'zzz' is not a whole number"),
    ("DASK_OBDASK__RUN__N_WORKERS=-5", "obdask.run.n-workers: -5 is less than the minimum of 1"),
    ("DASK_OBDASK__WORKSPACE=-5", "obdask.workspace: -5 is not a string or null"),
    ("DASK_OBDASK__STORE__RECORDS=-5", "obdask.store.records: -5 is not a string or null"),
    ("DASK_OBDASK__CMD__ALLOWLIST=-5", "obdask.cmd.allowlist: -5 is not a list or null"),
    ("DASK_OBDASK__CMD__LIMITS__FILE_SIZE=zzz", "obdask.cmd.limits.file-size"),
    ("DASK_OBDASK__CMD__LIMITS__PROCESSES=-5",
     "obdask.cmd.limits.processes: -5 is less than the minimum of 0"),
    ("DASK_OBDASK__LLM__BUDGETS=zzz", "obdask.llm.budgets: 'zzz' is not a list or null"),
    ("DASK_OBDASK__PLACEMENT__MAX_LOCALITY_RECORDS=zzz",
     "obdask.placement.max-locality-records: 'zzz' is not a whole number"),
    ("DASK_OBDASK__STORAGE_OPTIONS=zzz",
     "obdask.storage-options: 'zzz' is not a mapping or null"),
    ("DASK_OBDASK__PLACEMENT__MODELS=zzz",
     "obdask.placement.models: 'zzz' is not a mapping or null"),
    ("DASK_OBDASK__RUN__WAIT_FOR_RESOURCES=zz",
     "obdask.run.wait-for-resources: 'zz' is not a duration"),
])
def test_bad_config_stops_obdask_run_before_any_job(tmp_path, env, message):
    (tmp_path / "plan.md").write_text("- [ ] id=a lane=1 payload=@cmd:touch ran\n")
    name, value = env.split("=", 1)
    result = subprocess.run([sys.executable, "-m", "obdask.cli", "run", "plan.md"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, name: value})
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert message in result.stderr
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("key, value, message", [
    ("storage-options", "zzz", "obdask.storage-options: 'zzz' is not a mapping"),
    ("storage-options", {"s3": "zzz"}, "obdask.storage-options.s3: 'zzz' is not a mapping or null"),
    ("placement.models", "zzz", "obdask.placement.models: 'zzz' is not a mapping"),
    ("placement.models", {"coder": {"model": "x", "gpu": "lots"}},
     "obdask.placement.models.coder.gpu: 'lots' is not a number or null"),
    ("placement.models", {"coder": {"model": "x", "vram": "huge"}},
     "obdask.placement.models.coder.vram: 'huge' is not a size"),
    ("placement.models", {"coder": {"gpu": 1}},
     "obdask.placement.models.coder: 'model' is a required property"),
    ("run.wait-for-resources", "zz", "obdask.run.wait-for-resources: 'zz' is not a duration"),
    ("run.connect-timeout", "zz", "obdask.run.connect-timeout: 'zz' is not a duration"),
    ("plan.max-bytes", "zz", "obdask.plan.max-bytes: 'zz' is not a size"),
    ("store.stage-files", "zz", "obdask.store.stage-files: 'zz' is not one of auto, true, false"),
    ("store.stage-files", "false", "in an environment variable write True or False"),
    ("cmd.launcher", "zz", "obdask.cmd.launcher: 'zz' is not one of spawn, exec, preexec"),
    ("cmd.shell", 5, "obdask.cmd.shell: 5 is not a string"),
    ("placement.locality", "zz", "obdask.placement.locality: 'zz' is not true or false"),
    ("llm.on-exhausted", "zz", "obdask.llm.on-exhausted: 'zz' is not one of wait, fail"),
    ("llm.endpoints", "zz", "obdask.llm.endpoints: 'zz' is not a list or null"),
    ("llm.timeout", "zz", "obdask.llm.timeout: 'zz' is not a duration"),
])
def test_check_names_every_bad_key(key, value, message):
    from obdask.exceptions import ConfigError

    with dask.config.set({f"obdask.{key}": value}):
        with pytest.raises(ConfigError) as info:
            settings.check()
    assert message in str(info.value)


def test_check_reports_every_problem_at_once():
    from obdask.exceptions import ConfigError

    settings.check()  # the defaults are valid
    with dask.config.set({"obdask.run.retries": "x", "obdask.storage-options": 3}):
        with pytest.raises(ConfigError, match=r"\(and 1 more problem") as info:
            settings.check()
    assert len(info.value.errors) == 2


def test_storage_options_of_the_wrong_shape_is_a_config_error():
    from obdask.exceptions import ConfigError

    with pytest.raises(ConfigError, match="obdask.storage-options: 'zzz' is not a mapping"):
        config.storage_options("s3://b/k", "zzz")
