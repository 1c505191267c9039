"""Cluster deployment artefacts stay valid and consistent with the code.

The Helm chart is rendered with ``infra/helm/render.py`` (no helm binary installs here) and the
result is linted (yamllint), validated against the Kubernetes OpenAPI schemas
(kubernetes-validate), scanned (checkov, marked slow) and checked against the code:
topic names and partitions, STREAMVQA_* variables, ports, schema version, Ray app names, and
the Flink options that ``pipelines/runner.py`` derives from the same settings.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from streamvqa.pipelines.runner import flink_flags, pipeline_options
from streamvqa.schemas.records import CURRENT_VERSION
from streamvqa.settings import Settings, TopicSettings

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "infra" / "helm" / "streamvqa"
TERRAFORM = ROOT / "infra" / "terraform"
DOCKER = ROOT / "docker"


def _load_renderer():
    spec = importlib.util.spec_from_file_location("streamvqa_helm_render", ROOT / "infra/helm/render.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


render = _load_renderer()


def _docs(values: dict | None = None, **kw) -> list[dict]:
    text = render.render_manifests(CHART, values, **kw)
    return [d for d in yaml.safe_load_all(text) if d]


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return _docs()


@pytest.fixture(scope="module")
def values() -> dict:
    return render.load_values(CHART)


def _one(docs, kind, suffix=""):
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, (kind, suffix, [d["metadata"]["name"] for d in found])
    return found[0]


def _pod_specs(docs) -> list[tuple[str, dict]]:
    """(where, pod spec) for every pod the release runs, CRD pod templates included."""
    out = []
    for d in docs:
        kind, spec = d["kind"], d.get("spec", {})
        if kind in ("Deployment", "Job"):
            out.append((f"{kind}/{d['metadata']['name']}", spec["template"]["spec"]))
        elif kind == "FlinkDeployment":
            for role in ("jobManager", "taskManager"):
                out.append((f"flink/{role}", spec[role]["podTemplate"]["spec"]))
        elif kind == "RayService":
            cluster = spec["rayClusterConfig"]
            out.append(("ray/head", cluster["headGroupSpec"]["template"]["spec"]))
            for group in cluster["workerGroupSpecs"]:
                out.append((f"ray/{group['groupName']}", group["template"]["spec"]))
    return out


def _env(container: dict) -> dict[str, object]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _pipeline_containers(docs) -> list[dict]:
    tm = _one(docs, "FlinkDeployment")["spec"]["taskManager"]["podTemplate"]["spec"]
    submit = _one(docs, "Job", "-submit")["spec"]["template"]["spec"]
    return [c for c in tm["containers"] if c["name"] == "beam-worker-pool"] + submit["containers"]


def _settings_from_env(env: dict[str, object], monkeypatch) -> Settings:
    for name in list(os.environ):
        if name.startswith("STREAMVQA_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(ROOT / "infra")  # no streamvqa.toml here
    for name, value in env.items():
        if name.startswith("STREAMVQA_"):
            monkeypatch.setenv(name, value if isinstance(value, str) else "from-secret")
    return Settings()


# ---------------------------------------------------------------- renderer


def test_renderer_subset_matches_go_template_semantics():
    nodes, _, _ = render._parse(
        render._lex(
            "a:\n  {{- if .Values.x }}\n  x: {{ .Values.x | quote }}\n  {{- else }}\n  y: 1\n  {{- end }}\n"
            "  {{- range $k, $v := .Values.m }}\n  {{ $k }}: {{ $v }}\n  {{- end }}\n"
            "  l: {{- toYaml .Values.m | nindent 4 }}\n"
        )
    )
    out = render._Renderer({}).render(nodes, {"Values": {"x": "hi", "m": {"b": 2, "a": 1}}}, {})
    assert out == 'a:\n  x: "hi"\n  a: 1\n  b: 2\n  l:\n    a: 1\n    b: 2\n'
    with pytest.raises(render.RenderError, match="nil pointer"):
        render._Renderer({}).render(
            render._parse(render._lex("{{ .Values.no.such }}"))[0], {"Values": {}}, {}
        )


def test_chart_renders_to_valid_objects(docs):
    kinds = {d["kind"] for d in docs}
    assert {"FlinkDeployment", "RayService", "KafkaTopic", "Kafka", "NetworkPolicy", "Deployment"} <= kinds
    for d in docs:
        assert d["apiVersion"] and d["metadata"]["name"]
        assert d["metadata"]["namespace"] == "streamvqa", d["metadata"]["name"]
        labels = d["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "streamvqa"


def test_every_values_reference_exists(values):
    """A typo in `.Values.a.b` renders as nothing in Helm: every path must exist in values.yaml."""
    for path in (CHART / "templates").iterdir():
        for ref in re.findall(r"\.Values((?:\.[A-Za-z0-9_]+)+)", path.read_text()):
            node = values
            for part in ref.strip(".").split("."):
                assert isinstance(node, dict) and part in node, (
                    f"{path.name}: .Values{ref} not in values.yaml"
                )
                node = node[part]


def test_optional_parts_switch_off():
    values = render.load_values(
        CHART,
        sets={
            "kafka.create": "false",
            "kafka.bootstrapServers": "kafka:9092",
            "networkPolicy.enabled": "false",
            "pipeline.submit": "false",
            "provision.enabled": "false",
        },
    )
    kinds = [d["kind"] for d in _docs(values)]
    assert "Kafka" not in kinds and "NetworkPolicy" not in kinds and "Job" not in kinds
    assert kinds.count("KafkaTopic") == len(TopicSettings().names()) == 6


# ---------------------------------------------------------------- consistency with the code


def _snake(name: str) -> str:
    """values.yaml spelling (camelCase) -> settings field (snake_case): deadLetter -> dead_letter."""
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


def test_topics_match_settings(docs, values, monkeypatch):
    topics = [d for d in docs if d["kind"] == "KafkaTopic"]
    defaults = Settings.model_fields["topics"].default
    assert sorted(t["spec"]["topicName"] for t in topics) == sorted(defaults.names().values())
    env = _env(_pipeline_containers(docs)[0])
    settings = _settings_from_env(env, monkeypatch)
    roles = {_snake(t["metadata"]["labels"]["streamvqa.io/topic-role"]) for t in topics}
    assert roles == set(settings.topics.names()) == {_snake(r) for r in values["topics"]["names"]}
    assert "memory" in roles  # the main pipeline's internal topic
    assert set(values["topics"]["retentionMs"]) == set(values["topics"]["names"])
    for topic in topics:
        label = topic["metadata"]["labels"]["streamvqa.io/topic-role"]
        role = _snake(label)
        assert settings.topics.names()[role] == topic["spec"]["topicName"] == values["topics"]["names"][label]
        assert topic["spec"]["partitions"] == settings.topics.partitions == values["topics"]["partitions"]
        assert topic["spec"]["replicas"] == settings.topics.replication_factor
        assert topic["spec"]["config"]["retention.ms"] == values["topics"]["retentionMs"][label] > 0
        # producers send up to max_message_bytes + 64 KiB (streamvqa.connect.producer)
        assert topic["spec"]["config"]["max.message.bytes"] >= settings.limits.max_message_bytes + 64 * 1024
    # renamed topics reach the pods too (not only the defaults): one STREAMVQA_TOPICS__* per role
    renamed = {f"topics.names.{label}": f"site-a.{name}" for label, name in values["topics"]["names"].items()}
    other = _docs(render.load_values(CHART, sets=renamed))
    settings = _settings_from_env(_env(_pipeline_containers(other)[0]), monkeypatch)
    assert settings.topics.names() == {
        _snake(label): f"site-a.{name}" for label, name in values["topics"]["names"].items()
    }
    assert {t["spec"]["topicName"] for t in other if t["kind"] == "KafkaTopic"} == set(
        settings.topics.names().values()
    )


def _cli(args: list[str]) -> tuple[list[str], dict]:
    """(sub-command path, parsed parameters) of a `streamvqa` command line, without running it."""
    import typer.main

    from streamvqa.cli import app

    command, rest, path, ctx = typer.main.get_command(app), list(args), [], None
    while hasattr(command, "get_command"):  # a group: the next word names the sub-command
        ctx = command.make_context(path[-1] if path else "streamvqa", [], parent=ctx, resilient_parsing=True)
        assert rest, f"{args}: no sub-command after {path}"
        name, rest = rest[0], rest[1:]
        command = command.get_command(ctx, name)
        assert command is not None, f"{args}: no command {name!r} after {path}"
        path.append(name)
    return path, command.make_context(path[-1], rest, parent=ctx).params


def test_submitter_runs_the_main_pipeline(docs, values, monkeypatch):
    container = _one(docs, "Job", "-submit")["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["streamvqa"]
    args = container["args"]
    assert args[:2] == ["run", "pipeline"] and args[args.index("--group") + 1] == values["pipeline"]["group"]
    path, params = _cli(args)  # the CLI accepts exactly these arguments
    assert path == ["run", "pipeline"] and params["group"] == values["pipeline"]["group"]
    other = _docs(render.load_values(CHART, sets={"pipeline.group": "streamvqa-blue"}))
    assert _one(other, "Job", "-submit")["spec"]["template"]["spec"]["containers"][0]["args"] == [
        "run",
        "pipeline",
        "--group",
        "streamvqa-blue",
    ]
    # the job reads and writes the topics of the pods' settings, all of which the chart creates
    from streamvqa.pipelines.video_qa.graph import input_topics

    settings = _settings_from_env(_env(container), monkeypatch)
    created = {d["spec"]["topicName"] for d in docs if d["kind"] == "KafkaTopic"}
    written = {settings.topics.memory, settings.topics.answers, settings.topics.dead_letter}
    assert set(input_topics(settings)) | written <= created
    assert settings.topics.memory in input_topics(settings)


def test_pipeline_settings_reach_the_pods(monkeypatch):
    """values pipeline.settings -> STREAMVQA_PIPELINE__* in both pipeline containers -> Settings.pipeline."""
    from streamvqa.settings import PipelineSettings

    chart_settings = render.load_values(CHART)["pipeline"]["settings"]
    fields = {_snake(key): key for key in chart_settings}
    assert set(fields) <= set(PipelineSettings.model_fields), "a values key names no PipelineSettings field"
    defaults = PipelineSettings()
    for field, key in fields.items():  # the chart's defaults are the settings' defaults
        assert (chart_settings[key] or None) == getattr(defaults, field), key

    custom = {
        "lmPath": "/models/qwen2.5-vl-7b",
        "lmDtype": "bfloat16",
        "windowTokens": 512,
        "retrieveTokens": 256,
        "maxNewTokens": 48,
        "holdTimeoutS": 2.5,
        "speech": False,
        "modelTimeoutS": 120.5,
        "modelAttempts": 2,
    }
    assert set(custom) == set(chart_settings), "give every values key a non-default value here"
    sets = {
        f"pipeline.settings.{k}": str(v).lower() if isinstance(v, bool) else str(v) for k, v in custom.items()
    }
    sets |= {"pipeline.models.claimName": "qwen-weights", "pipeline.models.mountPath": "/models"}
    docs = _docs(render.load_values(CHART, sets=sets))
    envs = [_env(c) for c in _pipeline_containers(docs)]
    for key in custom:
        name = f"STREAMVQA_PIPELINE__{_snake(key).upper()}"
        assert all(name in env for env in envs), name
    for env in envs:
        pipeline = _settings_from_env(env, monkeypatch).pipeline
        for key, value in custom.items():
            got = getattr(pipeline, _snake(key))
            assert (str(got) if key == "lmPath" else got) == value, key
    # the weights are mounted read-only where lmPath points, in the sidecars that run the models
    tm = _one(docs, "FlinkDeployment")["spec"]["taskManager"]["podTemplate"]["spec"]
    volume = next(v for v in tm["volumes"] if v["name"] == "models")
    assert volume["persistentVolumeClaim"] == {"claimName": "qwen-weights", "readOnly": True}
    pool = next(c for c in tm["containers"] if c["name"] == "beam-worker-pool")
    mount = next(m for m in pool["volumeMounts"] if m["name"] == "models")
    assert mount["readOnly"] is True and custom["lmPath"].startswith(mount["mountPath"] + "/")
    # defaults: no lm_path (the shipped SmolLM2), nothing mounted
    default_docs = _docs()
    assert all("STREAMVQA_PIPELINE__LM_PATH" not in _env(c) for c in _pipeline_containers(default_docs))
    tm = _one(default_docs, "FlinkDeployment")["spec"]["taskManager"]["podTemplate"]["spec"]
    assert "models" not in {v["name"] for v in tm["volumes"]}
    assert _settings_from_env(_env(_pipeline_containers(default_docs)[0]), monkeypatch).pipeline == defaults


def _field_exists(path: list[str]) -> bool:
    model = Settings
    for part in path:
        fields = model.model_fields
        if part not in fields:
            return False
        annotation = fields[part].annotation
        model = annotation if isinstance(annotation, type) and hasattr(annotation, "model_fields") else None
        if model is None:
            return part == path[-1]
    return True


def test_env_names_are_settings_fields(docs, monkeypatch):
    assert Settings.model_config["env_prefix"] == "STREAMVQA_"
    assert Settings.model_config["env_nested_delimiter"] == "__"
    seen = set()
    for where, pod in _pod_specs(docs):
        for container in pod["containers"]:
            for name in _env(container):
                if name.startswith("STREAMVQA_"):
                    seen.add(name)
                    path = name.removeprefix("STREAMVQA_").lower().split("__")
                    assert _field_exists(path), f"{where}/{container['name']}: {name} is no settings field"
    assert "STREAMVQA_S3__SECRET_KEY" in seen
    env = _env(_pipeline_containers(docs)[0])
    for secret in ("STREAMVQA_S3__ACCESS_KEY", "STREAMVQA_S3__SECRET_KEY"):
        assert isinstance(env[secret], dict) and "secretKeyRef" in env[secret], (
            "credentials come from a Secret"
        )
    settings = _settings_from_env(env, monkeypatch)  # the pods' settings validate
    assert settings.runner.name == "PortableRunner" and not settings.embedded


def test_pipeline_pods_share_one_settings_object(docs):
    envs = [_env(c) for c in _pipeline_containers(docs)]
    assert envs[0] == {k: v for k, v in envs[1].items() if k in envs[0]} and len(envs[0]) >= 20


def test_ports_agree(docs, values, monkeypatch):
    service = _one(docs, "Service", "-beam-job-server")
    deployment = _one(docs, "Deployment", "-beam-job-server")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == ports
    assert f"--job-port={ports['job']}" in container["args"]
    assert (
        f"--flink-master={_one(docs, 'FlinkDeployment')['metadata']['name']}-rest:8081" in container["args"]
    )
    settings = _settings_from_env(_env(_pipeline_containers(docs)[0]), monkeypatch)
    assert settings.runner.job_endpoint == f"{service['metadata']['name']}:{ports['job']}"
    pool = _pipeline_containers(docs)[0]
    assert settings.runner.environment_config == f"localhost:{pool['ports'][0]['containerPort']}"
    assert f"--service_port={pool['ports'][0]['containerPort']}" in pool["args"]
    policy = _one(docs, "NetworkPolicy", "-beam-job-server")
    assert {p["port"] for p in policy["spec"]["ingress"][0]["ports"]} == set(ports.values())
    kafka = _one(docs, "Kafka")
    assert settings.kafka.bootstrap_servers.endswith(f":{kafka['spec']['kafka']['listeners'][0]['port']}")
    assert settings.kafka.bootstrap_servers.startswith(f"{kafka['metadata']['name']}-kafka-bootstrap.")


def test_schema_version(docs, values):
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert values["schemaVersion"] == CURRENT_VERSION
    assert chart["annotations"]["streamvqa.io/schema-version"] == str(CURRENT_VERSION)
    assert {d["metadata"]["labels"]["streamvqa.io/schema-version"] for d in docs} == {str(CURRENT_VERSION)}


def test_ray_apps_match_serve_code(docs):
    source = (ROOT / "operators/serve/deployments.py").read_text()
    tree = ast.parse(source)
    consts = {
        t.id: n.value.value
        for n in tree.body
        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant)
        for t in n.targets
        if isinstance(t, ast.Name)
    }
    deployment_names = dict(re.findall(r'@serve\.deployment\(name="(\w+)"\)\nclass (\w+)', source))
    config = yaml.safe_load(_one(docs, "RayService")["spec"]["serveConfigV2"])
    apps = {a["name"]: a for a in config["applications"]}
    assert set(apps) == {consts["ENCODER_APP"], consts["LM_APP"]}
    assert [d["name"] for d in apps[consts["ENCODER_APP"]]["deployments"]] == ["encoder"]
    assert [d["name"] for d in apps[consts["LM_APP"]]["deployments"]] == ["lm"]
    assert set(deployment_names) == {"encoder", "lm"}
    builders = ast.parse((DOCKER / "serve/streamvqa_serve_app.py").read_text())
    defined = {n.name for n in builders.body if isinstance(n, ast.FunctionDef)}
    for app in apps.values():
        module, _, func = app["import_path"].partition(":")
        assert module == "streamvqa_serve_app" and func in defined
    from streamvqa.operators.serve.handlers import ServeClientSettings

    assert {ServeClientSettings().encoder_app, ServeClientSettings().lm_app} == set(apps)


def test_provision_script_names_exist(docs):
    job = _one(docs, "Job", "-provision")["spec"]["template"]["spec"]["containers"][0]
    script = job["args"][0]
    tree = ast.parse(script)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module}.{alias.name}"
    assert set(_env(job)["PROVISION_BUCKETS"].split(",")) == {"streamvqa", "streamvqa-flink"}


# ---------------------------------------------------------------- Flink options from settings

# Java FlinkPipelineOptions the Beam Flink job server describes to the SDK at submission
# (PortableRunner adds them to its option parser); names as the SDK spells them.
JOB_SERVER_OPTIONS = {
    "checkpointing_interval": int,
    "checkpointing_mode": str,
    "checkpoint_timeout_millis": int,
    "min_pause_between_checkpoints": int,
    "state_backend": str,
    "state_backend_storage_path": str,
    "externalized_checkpoints_enabled": bool,
    "retain_externalized_checkpoints_on_cancellation": bool,
}


def _submitted(options) -> dict:
    def add(parser):
        for name, kind in JOB_SERVER_OPTIONS.items():
            if kind is bool:
                parser.add_argument(f"--{name}", action="store_true")
            else:
                parser.add_argument(f"--{name}", type=kind)

    return options.get_all_options(add_extra_args_fn=add, drop_default=True)


def test_flink_options_come_from_settings():
    settings = Settings(
        runner={
            "name": "FlinkRunner",
            "flink_master": "flink-rest:8081",
            "parallelism": 6,
            "max_parallelism": 60,
            "checkpointing_interval_ms": 30_000,
            "state_backend": "rocksdb",
            "state_backend_storage_path": "s3://ck/job/checkpoints",
        }
    )
    opts = _submitted(pipeline_options(settings))
    assert opts["runner"] == "FlinkRunner" and opts["flink_master"] == "flink-rest:8081"
    assert opts["streaming"] is True
    assert (opts["parallelism"], opts["max_parallelism"]) == (6, 60)
    assert opts["checkpointing_interval"] == 30_000 and opts["checkpointing_mode"] == "EXACTLY_ONCE"
    assert (
        opts["state_backend"] == "rocksdb" and opts["state_backend_storage_path"] == "s3://ck/job/checkpoints"
    )
    assert (
        opts["externalized_checkpoints_enabled"] and opts["retain_externalized_checkpoints_on_cancellation"]
    )
    from apache_beam.options.pipeline_options import FlinkRunnerOptions

    assert FlinkRunnerOptions(flags=[], **{}).view_as(FlinkRunnerOptions).parallelism == -1  # SDK-declared
    assert pipeline_options(settings).view_as(FlinkRunnerOptions).parallelism == 6


def test_local_run_has_no_flink_options():
    opts = pipeline_options(Settings()).get_all_options(retain_unknown_options=True, drop_default=True)
    assert not set(opts) & (set(JOB_SERVER_OPTIONS) | {"parallelism", "flink_master", "runner"})


@pytest.mark.parametrize(
    ("runner", "message"),
    [
        ({"name": "FnApiRunner", "state_backend": "rocksdb"}, "needs runner.state_backend_storage_path"),
        ({"name": "FnApiRunner", "parallelism": 4, "max_parallelism": 2}, "max_parallelism"),
        ({"name": "FnApiRunner", "environment_type": "EXTERNAL"}, "needs runner.environment_config"),
        ({"name": "FnApiRunner", "checkpointing_mode": "SOMETIMES"}, "checkpointing_mode"),
    ],
)
def test_flink_settings_are_validated(runner, message):
    with pytest.raises(ValueError, match=message):
        Settings(runner=runner)


def test_chart_flink_configuration_equals_runner_options(docs, monkeypatch):
    """The FlinkDeployment's own config and the options Beam submits come from the same values."""
    conf = _one(docs, "FlinkDeployment")["spec"]["flinkConfiguration"]
    settings = _settings_from_env(_env(_pipeline_containers(docs)[0]), monkeypatch)
    flags = flink_flags(settings.runner)
    assert conf["execution.checkpointing.interval"] == f"{flags['checkpointing_interval']}ms"
    assert conf["execution.checkpointing.mode"] == flags["checkpointing_mode"] == "EXACTLY_ONCE"
    assert conf["execution.checkpointing.timeout"] == f"{flags['checkpoint_timeout_millis']}ms"
    assert conf["execution.checkpointing.min-pause"] == f"{flags['min_pause_between_checkpoints']}ms"
    assert conf["state.backend.type"] == flags["state_backend"]
    assert conf["state.checkpoints.dir"] == flags["state_backend_storage_path"]
    assert conf["state.checkpoints.dir"].startswith("s3://")
    assert conf["parallelism.default"] == str(flags["parallelism"])
    assert flags["environment_type"] == "EXTERNAL"
    opts = _submitted(pipeline_options(settings))
    assert (
        opts["runner"] == "PortableRunner"
        and opts["checkpointing_interval"] == flags["checkpointing_interval"]
    )
    assert f"{settings.s3.endpoint}" in conf["s3.endpoint"]


# ---------------------------------------------------------------- hygiene


def test_pods_have_resources_probes_and_no_root(docs):
    for where, pod in _pod_specs(docs):
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["runAsUser"] > 0, where
        for c in pod["containers"]:
            name = f"{where}/{c['name']}"
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], name
            if c["name"] != "flink-main-container":  # the operator sets its resources from spec.*.resource
                assert c["resources"]["requests"] and c["resources"]["limits"], name
            if not where.startswith("Job/"):
                assert "livenessProbe" in c and "readinessProbe" in c, name


def test_no_secrets_in_values():
    text = (CHART / "values.yaml").read_text()
    data = yaml.safe_load(text)

    def walk(node, path=""):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from walk(v, f"{path}.{k}")
        else:
            yield path, node

    for path, value in walk(data):
        leaf = path.rsplit(".", 1)[-1].lower()
        if re.search(r"password|secretkey|accesskey|token$|apikey", leaf):
            pytest.fail(f"{path} looks like a secret value in values.yaml")
        if leaf.endswith("secret"):
            assert isinstance(value, str) and re.fullmatch(r"[a-z0-9-]+", value), f"{path} must name a Secret"


def _unquote(node):
    """python-hcl2 8 keeps the quotes of string keys and literals: drop them."""
    if isinstance(node, dict):
        return {_unquote(k): _unquote(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_unquote(v) for v in node]
    if isinstance(node, str) and len(node) >= 2 and node[0] == node[-1] == '"':
        return node[1:-1]
    return node


def test_terraform_parses_and_is_documented():
    hcl2 = pytest.importorskip("hcl2", reason="python-hcl2 is not installed (dev extra)")
    files = sorted(TERRAFORM.rglob("*.tf"))
    assert files
    parsed = {f: _unquote(hcl2.load(f.open())) for f in files}
    for f, data in parsed.items():
        for block in data.get("variable", []):
            for name, body in block.items():
                assert body.get("description") and body.get("type"), f"{f.name}: variable {name}"
        for block in data.get("output", []):
            for name, body in block.items():
                assert body.get("description"), f"{f.name}: output {name}"
    main = parsed[TERRAFORM / "main.tf"]
    releases = {name: body for r in main["resource"] for name, body in r.get("helm_release", {}).items()}
    assert set(releases) == {"flink_operator", "kuberay", "strimzi", "minio", "streamvqa"}
    assert releases["streamvqa"]["chart"] == "${local.chart_path}"
    assert (
        main["locals"][0]["chart_path"] == "${path.module}/../helm/streamvqa"
        and (CHART / "Chart.yaml").is_file()
    )
    for name, body in releases.items():
        assert name == "streamvqa" or body.get("version"), f"helm_release {name} is not pinned"
    defaults = {n: b for v in parsed[TERRAFORM / "variables.tf"]["variable"] for n, b in v.items()}
    assert defaults["topic_partitions"]["default"] == render.load_values(CHART)["topics"]["partitions"]
    secrets = {name for r in main["resource"] for name in r.get("kubernetes_secret", {})}
    assert {"s3", "ray_token"} <= secrets
    values_text = (CHART / "values.yaml").read_text()
    for secret_name in ("streamvqa-s3", "streamvqa-ray-token"):
        assert secret_name in values_text and secret_name in (TERRAFORM / "main.tf").read_text()


def test_terraform_fmt_accepts_the_module(tmp_path):
    """The real Terraform parser, where the binary is on the machine (``terraform fmt`` needs no
    providers; ``terraform validate`` needs them from the registry, which is out of reach here)."""
    binary = shutil.which("terraform")
    if binary is None:
        pytest.skip("no terraform binary on this machine")
    env = {**os.environ, "TF_CLI_CONFIG_FILE": str(tmp_path / "none.tfrc"), "CHECKPOINT_DISABLE": "1"}
    proc = subprocess.run(
        [binary, "fmt", "-check", "-recursive", "-diff", str(TERRAFORM)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    broken = tmp_path / "broken.tf"
    broken.write_text('resource "x" "y" {\n  a = \n')  # and it does parse: a syntax error fails it
    proc = subprocess.run(
        [binary, "fmt", "-check", str(broken)], capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode != 0


def test_dockerfiles_pin_versions_and_drop_root():
    for path in sorted(DOCKER.glob("*.Dockerfile")):
        text = path.read_text()
        for image in re.findall(r"(?m)^FROM\s+(\S+)", text):
            assert ":" in image and not image.endswith(":latest"), f"{path.name}: {image} unpinned"
        user = re.findall(r"(?m)^USER\s+(\S+)", text)
        assert user and user[-1].split(":")[0] not in ("0", "root"), f"{path.name} runs as root"
        assert "torch==2.13.0" in text
    assert "apache/beam_python3.11_sdk:${BEAM_VERSION}" in (DOCKER / "pipeline.Dockerfile").read_text()
    assert "ARG BEAM_VERSION=2.77.0" in (DOCKER / "pipeline.Dockerfile").read_text()
    assert "rayproject/ray:2.60.0-py311-gpu" in (DOCKER / "serve.Dockerfile").read_text()
    values = render.load_values(CHART)
    assert values["images"]["jobServer"]["tag"] == "2.77.0" and values["ray"]["version"] == "2.60.0"
    assert values["images"]["flink"]["tag"].startswith(values["flink"]["pluginVersion"])
    assert values["flink"]["version"] == "v" + "_".join(values["flink"]["pluginVersion"].split(".")[:2])
    assert (
        "flink" + values["flink"]["pluginVersion"].rsplit(".", 1)[0]
        in values["images"]["jobServer"]["repository"]
    )


# ---------------------------------------------------------------- external linters


def test_yamllint(tmp_path):
    pytest.importorskip("yamllint", reason="yamllint is not installed (dev extra)")
    rendered = tmp_path / "manifests.yaml"
    rendered.write_text(render.render_manifests(CHART))
    config = ROOT / "infra/helm/.yamllint.yaml"
    files = [rendered, CHART / "values.yaml", CHART / "Chart.yaml"]
    result = subprocess.run(
        [sys.executable, "-m", "yamllint", "-f", "parsable", "-c", str(config), *map(str, files)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _kubernetes_versions(kv) -> list[str]:
    """The chart's lowest supported version (Chart.yaml kubeVersion) and the newest schema shipped."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    lowest = re.fullmatch(r">=(\d+\.\d+)\.\d+(?:-0)?", chart["kubeVersion"]).group(1)
    return [lowest, kv.latest_version()]


def _core_objects(docs) -> list[tuple[str, dict]]:
    """(where, object) for every core Kubernetes object, pods inside custom resources as PodTemplates."""
    out = [
        (f"{d['kind']}/{d['metadata']['name']}", d)
        for d in docs
        if (group := d["apiVersion"].split("/")[0]).endswith("k8s.io") or "." not in group
    ]
    for where, spec in _pod_specs(docs):
        if where.startswith(("flink/", "ray/")):
            template = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": where.replace("/", "-")},
                "template": {"spec": spec},
            }
            out.append((where, template))
    return out


def test_manifests_match_the_kubernetes_schemas(docs):
    """Every core object, and every pod inside a FlinkDeployment or RayService, is valid against the
    Kubernetes OpenAPI schemas (strict: an unknown or misspelt field fails) of the chart's lowest
    supported version and the newest one. yamllint and checkov do not catch a field Kubernetes
    would drop or refuse."""
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (dev extra)")
    objects = _core_objects(docs)
    kinds = {obj["kind"] for _, obj in objects}
    assert {"Deployment", "Service", "NetworkPolicy", "Job", "PodTemplate", "Role"} <= kinds
    assert sum(1 for where, _ in objects if where.startswith(("flink/", "ray/"))) >= 4
    errors = []
    versions = _kubernetes_versions(kv)
    for version in versions:
        for where, obj in objects:
            try:
                kv.validate(obj, version, strict=True)
            except kv.ValidationError as e:
                errors.append(f"{version} {where}: {e.message} at {'/'.join(map(str, e.path))}")
    assert not errors, "\n".join(errors)

    broken = json.loads(json.dumps(_one(docs, "Deployment")))
    broken["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {"tcpSocket": {"port": 1}}
    with pytest.raises(kv.ValidationError, match="livenesProbe"):
        kv.validate(broken, versions[0], strict=True)


def _checkov() -> str | None:
    for candidate in (
        os.environ.get("CHECKOV"),
        str(ROOT / ".venv-iac/bin/checkov"),
        shutil.which("checkov"),
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_checkov_finds_nothing(tmp_path):
    checkov = _checkov()
    if checkov is None:
        pytest.skip("checkov not installed: `make iac-tools` (own venv .venv-iac) or set CHECKOV=path")
    k8s = tmp_path / "k8s"
    k8s.mkdir()
    (k8s / "manifests.yaml").write_text(render.render_manifests(CHART))
    result = subprocess.run(
        [
            checkov,
            "-o",
            "json",
            "--skip-download",
            "-d",
            str(k8s),
            "-d",
            str(TERRAFORM),
            "-d",
            str(DOCKER),
            "--framework",
            "kubernetes",
            "terraform",
            "dockerfile",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"},
    )
    reports, text, pos = [], result.stdout, 0
    decoder = json.JSONDecoder()
    while text[pos:].strip():  # one JSON value per framework run, or a list of them
        value, end = decoder.raw_decode(text, text.index(text[pos:].strip()[0], pos))
        reports += value if isinstance(value, list) else [value]
        pos = end
    failed = [
        (r["check_type"], c["check_id"], c["resource"])
        for r in reports
        for c in r["results"]["failed_checks"]
    ]
    assert not failed, failed
    skipped = [c for r in reports for c in r["results"]["skipped_checks"]]
    justified = dict(
        re.findall(
            r"checkov\.io/skip\d+: (CKV\w+)=(.{20,})",
            "".join(p.read_text() for p in (CHART / "templates").iterdir()),
        )
    )
    assert {c["check_id"] for c in skipped} <= set(justified), (
        "every skip carries its reason in the templates"
    )
    assert sum(r["summary"]["passed"] for r in reports) > 300
