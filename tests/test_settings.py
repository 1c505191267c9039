"""One validated settings object: environment, config file, defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from streamvqa.settings import Settings


def test_defaults_are_the_embedded_stack() -> None:
    settings = Settings()
    assert settings.embedded
    assert settings.topics.names() == {
        "frames": "streamvqa.frames",
        "audio": "streamvqa.audio",
        "queries": "streamvqa.queries",
        "answers": "streamvqa.answers",
        "dead_letter": "streamvqa.dead-letter",
        "memory": "streamvqa.memory",
    }
    assert settings.runner.name == "FnApiRunner"


def test_environment_sets_nested_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMVQA_KAFKA__BOOTSTRAP_SERVERS", "kafka:9092")
    monkeypatch.setenv("STREAMVQA_S3__ENDPOINT", "minio:9000")
    monkeypatch.setenv("STREAMVQA_S3__ACCESS_KEY", "ak")
    monkeypatch.setenv("STREAMVQA_S3__SECRET_KEY", "very-secret")
    monkeypatch.setenv("STREAMVQA_TOPICS__PARTITIONS", "12")
    settings = Settings()
    assert settings.kafka.bootstrap_servers == "kafka:9092"
    assert settings.s3.endpoint == "minio:9000"
    assert settings.topics.partitions == 12
    assert not settings.embedded
    assert "very-secret" not in settings.model_dump_json()
    assert "very-secret" not in repr(settings)


def test_config_file_and_environment_priority(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "cluster.toml"
    config.write_text(
        '[kafka]\nbootstrap_servers = "from-file:9092"\n'
        '[topics]\nframes = "prod.frames"\npartitions = 6\n'
        '[runner]\nname = "FlinkRunner"\nflink_master = "jm:8081"\n'
    )
    monkeypatch.setenv("STREAMVQA_CONFIG", str(config))
    monkeypatch.setenv("STREAMVQA_TOPICS__PARTITIONS", "24")
    settings = Settings()
    assert settings.kafka.bootstrap_servers == "from-file:9092"
    assert settings.topics.frames == "prod.frames"
    assert settings.topics.partitions == 24  # environment beats the file
    assert settings.runner.flink_master == "jm:8081"


def test_streamvqa_toml_in_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / "streamvqa.toml").write_text('[topics]\nanswers = "my.answers"\n')
    assert Settings().topics.answers == "my.answers"  # conftest runs tests in tmp_path


def test_missing_config_file_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STREAMVQA_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(FileNotFoundError, match=r"nope\.toml"):
        Settings()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"s3": {"endpoint": "http://minio:9000", "access_key": "a", "secret_key": "b"}}, "without a scheme"),
        ({"s3": {"endpoint": "minio:9000"}}, r"needs s3\.access_key"),
        ({"s3": {"bucket": "Bad_Bucket"}}, "not a valid S3 bucket name"),
        ({"topics": {"frames": "has space"}}, "not a valid Kafka topic name"),
        ({"topics": {"answers": "streamvqa.frames"}}, "must be distinct"),
        ({"topics": {"partitions": 0}}, "greater than or equal to 1"),
        ({"kafka": {"security_protocol": "SASL_SSL"}}, "needs sasl_mechanism"),
        ({"runner": {"name": "FlinkRunner"}}, "needs runner.flink_master"),
        ({"local": {"broker_storage": "postgres"}}, "broker_storage"),
        ({"unknown_section": {}}, "unknown_section"),
    ],
)
def test_invalid_settings_say_what_is_wrong(overrides: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**overrides)


def test_cli_config_masks_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from streamvqa.cli import app

    monkeypatch.setenv("STREAMVQA_S3__ENDPOINT", "minio:9000")
    monkeypatch.setenv("STREAMVQA_S3__ACCESS_KEY", "ak")
    monkeypatch.setenv("STREAMVQA_S3__SECRET_KEY", "very-secret")
    result = CliRunner().invoke(app, ["config"])
    assert result.exit_code == 0, result.output
    assert "minio:9000" in result.output
    assert "very-secret" not in result.output


def test_cli_rejects_invalid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from streamvqa.cli import app

    monkeypatch.setenv("STREAMVQA_TOPICS__PARTITIONS", "-3")
    result = CliRunner().invoke(app, ["config"])
    assert result.exit_code == 2
    assert "partitions" in result.output


def test_every_package_under_the_mapped_roots_is_listed_for_the_wheel() -> None:
    """pyproject lists packages explicitly (repo-root dirs map into streamvqa.*): a new
    sub-package that is not listed would import in the editable checkout but be missing
    from a built wheel (the cluster image)."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    for package, folder in config["package-dir"].items():
        for init in (root / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(root / folder)
            name = ".".join([package, *relative.parts]) if relative.parts else package
            assert name in listed, f"{name} ({init.parent}) is missing from [tool.setuptools] packages"
