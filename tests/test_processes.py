"""Children of the demo see exactly the parent's settings."""

import subprocess
import sys
import time

from pydantic import SecretStr

from app.processes import Child, settings_env
from app.review_desk import ReviewerKey
from app.settings import Settings
from streams.kafka import KafkaSecurity
from streams.config import LearnerSettings
from trainer.config import ServingSettings
from tests.conftest import free_port


def test_settings_survive_the_trip_through_the_environment(tmp_path):
    password = tmp_path / "kafka-password"
    password.write_text("from-a-secret-file\n")
    kafka = KafkaSecurity(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username="feedloop",
                          sasl_password_file=password)  # fmt: skip
    settings = Settings(data_dir=tmp_path, api_keys={"app": SecretStr("s3cret")}, vllm_urls=["http://h:1", "http://h:2"],
                        serving=ServingSettings(drain_s=3), learners=LearnerSettings(canary_share=0.4),
                        kafka_security=kafka, reviewer_keys={"alice": ReviewerKey(app_id="app", key=SecretStr("r3view"))})  # fmt: skip
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("FEEDLOOP_")}
    code = ("from app.settings import Settings; s = Settings(); print(s.kafka.security.sasl_password.get_secret_value()); "
            "r = s.reviewer_keys['alice']; print(r.app_id, r.key.get_secret_value()); "
            "print(s.model_dump_json(exclude={'reviewer_keys'}))")  # masked, two reviewers' keys would be one
    out = subprocess.run([sys.executable, "-c", code], env={**env, **settings_env(settings)}, cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    secret, reviewer, dumped = out.strip().splitlines()[-3:]
    rebuilt = Settings.model_validate_json(dumped)
    masked = {"api_keys", "kafka_security", "reviewer_keys"}
    assert rebuilt.model_dump(exclude=masked) == settings.model_dump(exclude=masked)
    assert reviewer == "app r3view"  # a model in a dict travels too
    assert rebuilt.kafka_security.sasl_mechanism == "SCRAM-SHA-512" and secret == "from-a-secret-file"
    assert settings_env(settings)["FEEDLOOP_API_KEYS"] == '{"app": "s3cret"}', "secrets travel in clear, to children only"


def test_a_child_runs_with_the_settings_and_stops_cleanly_on_sigterm(tmp_path):
    port = free_port()
    child = Child(["broker", "--port", str(port)], Settings(data_dir=tmp_path, log_format="json"), tmp_path / "b.log")
    child.start()
    deadline = time.monotonic() + 30
    while "broker.started" not in child.log_tail() and time.monotonic() < deadline and child.running:
        time.sleep(0.1)
    assert child.running and f'"port": {port}' in child.log_tail()
    assert child.stop() == 0 and not child.running, child.log_tail()
