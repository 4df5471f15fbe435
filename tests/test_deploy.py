"""deploy/: the worker image, the Compose stacks and the Terraform modules say what the code
does. Without Docker or Terraform here, the files are parsed: every command line through
the CLI's own argument parser, every variable against the settings the code reads, every
name and key against what ``flowcraft provision`` creates on the local services."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import hcl2
import pytest
import yaml

from flowcraft.adapters.connect import AwsSettings, AzureSettings
from flowcraft.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
BACKENDS = ["aws", "azure"]

# Read by the SDKs themselves rather than by flowcraft's settings.
SDK_VARIABLES = {"aws": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"},
                 "azure": set()}
SETTINGS = {"aws": AwsSettings, "azure": AzureSettings}


# -- reading the files ---------------------------------------------------------------------------


def compose(backend: str) -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / f"compose.{backend}.yml").read_text(encoding="utf-8"))


def flowcraft_services(backend: str) -> dict[str, dict[str, Any]]:
    """The services that run the worker image (built from deploy/Dockerfile)."""
    services = compose(backend)["services"]
    found = {name: service for name, service in services.items()
             if (service.get("build") or {}).get("dockerfile") == "deploy/Dockerfile"}
    assert found, f"compose.{backend}.yml builds no service from deploy/Dockerfile"
    return found


def parse(argv: list[str], where: str) -> Any:
    with contextlib.redirect_stderr(io.StringIO()) as stderr:
        try:
            return build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"{where}: flowcraft {shlex.join(argv)}\n  {stderr.getvalue().strip()}")


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
            for line in lines if line and not line.startswith("#")]


def instruction(name: str) -> list[str]:
    return [argument for keyword, argument in dockerfile_instructions() if keyword == name]


def exec_form(argument: str) -> list[str]:
    value = json.loads(argument)
    assert isinstance(value, list), f"not exec form: {argument}"
    return value


def terraform(backend: str) -> dict[str, Any]:
    """The module's files merged: resources by type and name, variables' defaults."""
    options = hcl2.SerializationOptions(with_comments=False, explicit_blocks=False,
                                        strip_string_quotes=True)
    merged: dict[str, Any] = {"resource": {}, "data": {}, "variable": {}}
    for path in sorted((DEPLOY / "terraform" / backend).glob("*.tf")):
        with path.open(encoding="utf-8") as file:
            parsed = hcl2.load(file, serialization_options=options)
        for kind in ("resource", "data"):
            for block in parsed.get(kind, []):
                for type_name, named in block.items():
                    merged[kind].setdefault(type_name, {}).update(named)
        for block in parsed.get("variable", []):
            merged["variable"].update(block)
    return merged


def resolve(value: Any, variables: dict[str, Any]) -> Any:
    """``"${var.x}-dlq"`` with the variables' defaults filled in."""
    if not isinstance(value, str):
        return value
    whole = re.fullmatch(r"\$\{var\.(\w+)\}", value)
    if whole:
        return variables[whole.group(1)]["default"]
    return re.sub(r"\$\{var\.(\w+)\}", lambda m: str(variables[m.group(1)]["default"]), value)


# -- the worker image ------------------------------------------------------------------------------


def test_the_image_runs_as_an_unprivileged_user() -> None:
    (user,) = instruction("USER")
    assert user.split(":")[0] not in ("root", "0")
    # The interpreter the pinned versions are tested on.
    assert instruction("FROM")[-1].startswith("python:3.11")


def test_the_image_default_command_is_a_valid_worker_command() -> None:
    (entrypoint,) = instruction("ENTRYPOINT")
    assert exec_form(entrypoint) == ["flowcraft"]
    (command,) = instruction("CMD")
    args = parse(exec_form(command), "Dockerfile CMD")
    assert args.command == "worker"
    # SIGINT is what the worker drains on, and what `reconcile --every` stops on.
    assert instruction("STOPSIGNAL") == ["SIGINT"]


def test_the_build_context_keeps_everything_the_dockerfile_copies() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    kept = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    for copy in instruction("COPY"):
        for source in shlex.split(copy)[:-1]:
            assert any(source == k or source.startswith(k + "/") for k in kept), (
                f"COPY {source}: excluded by Dockerfile.dockerignore")
            assert list(ROOT.glob(source)), f"COPY {source}: no such file in the repository"


def test_the_healthcheck_is_the_shipped_process_check() -> None:
    (healthcheck,) = instruction("HEALTHCHECK")
    command = exec_form(healthcheck.split("CMD", 1)[1].strip())
    assert command[0] == "python"
    copies = {shlex.split(c)[-1]: shlex.split(c)[0] for c in instruction("COPY")}
    assert copies[command[1]] == "deploy/healthcheck.py"


def fake_process(proc: Path, pid: int, state: str, argv: list[str]) -> None:
    directory = proc / str(pid)
    directory.mkdir(parents=True)
    (directory / "stat").write_text(f"{pid} (python3 (odd) name) {state} 1 1 1 0 -1\n")
    (directory / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")


def healthcheck(proc: Path) -> int:
    return subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py"), str(proc)],
                          capture_output=True, timeout=30, check=False).returncode


WORKER_ARGV = ["/usr/local/bin/python", "/usr/local/bin/flowcraft", "worker", "aws"]


@pytest.mark.parametrize(("processes", "status"), [
    ([(1, "S", WORKER_ARGV)], 0),
    ([(1, "R", ["/usr/local/bin/python", "/usr/local/bin/flowcraft", "reconcile", "aws"])], 0),
    ([(1, "S", ["/sbin/docker-init", "--", "flowcraft", "worker"]), (7, "S", WORKER_ARGV)], 0),
    ([(1, "Z", WORKER_ARGV)], 1),
    ([(1, "T", WORKER_ARGV)], 1),
    ([(1, "S", ["/usr/local/bin/python", "/usr/local/bin/flowcraft-healthcheck"])], 1),
    ([(1, "S", ["/bin/sh", "-c", "echo flowcraft"])], 1),
    ([], 1),
], ids=["worker", "reconciler", "under-init", "zombie", "stopped", "only-itself", "other",
        "nothing"])
def test_healthcheck_reports_a_live_flowcraft_process(
        tmp_path: Path, processes: list[tuple[int, str, list[str]]], status: int) -> None:
    for pid, state, argv in processes:
        fake_process(tmp_path, pid, state, argv)
    (tmp_path / "self").mkdir()  # /proc has non-process entries too
    assert healthcheck(tmp_path) == status


@pytest.mark.parametrize(("answer", "status"), [(200, 0), (503, 1), (None, 1)],
                         ids=["healthy", "stuck", "not-listening"])
def test_healthcheck_asks_a_worker_with_a_health_port(tmp_path: Path, answer: int | None,
                                                      status: int) -> None:
    import http.server
    import socket
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(answer if self.path == "/healthz" and answer else 404)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    if answer is None:  # a port nobody listens on
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = None
    else:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        port = server.server_address[1]
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        fake_process(tmp_path, 1, "S", [*WORKER_ARGV, "--health-port", str(port)])
        assert healthcheck(tmp_path) == status
    finally:
        if server is not None:
            server.shutdown()


def test_the_image_runs_its_worker_with_a_health_port() -> None:
    (command,) = instruction("CMD")
    assert "--health-port" in exec_form(command)


def test_healthcheck_finds_a_real_flowcraft_process(tmp_path: Path) -> None:
    script = tmp_path / "flowcraft"
    script.write_text("import time\ntime.sleep(60)\n")
    process = subprocess.Popen([sys.executable, str(script)])
    try:
        assert healthcheck(Path("/proc")) == 0
    finally:
        process.kill()
        process.wait()


# -- the Compose stacks ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_compose_commands_parse_as_flowcraft_commands(backend: str) -> None:
    from flowcraft import load_blueprints
    from flowcraft.blueprint import check_registry
    from flowcraft.cli import load_registry
    from flowcraft.examples import EXAMPLES_DIR
    from flowcraft.nodes.builtins import BUILTIN_NODES

    copied_blueprints = {shlex.split(c)[-1].rstrip("/") for c in instruction("COPY")}
    commands = {}
    for name, service in flowcraft_services(backend).items():
        args = parse(service["command"], f"compose.{backend}.yml service {name}")
        assert args.backend == backend, name
        commands[name] = args
        if args.command in ("worker", "reconcile"):
            assert args.blueprints in copied_blueprints, f"{name}: no blueprints at that path"
            registry = {**BUILTIN_NODES, **load_registry(args.registry)}
            for blueprint in load_blueprints(EXAMPLES_DIR).values():
                check_registry(blueprint, registry)
    by_command = {args.command: name for name, args in commands.items()}
    assert set(by_command) == {"provision", "worker", "reconcile"}
    services = compose(backend)["services"]
    assert services[by_command["worker"]]["deploy"]["replicas"] == 3
    assert "replicas" not in services[by_command["reconcile"]].get("deploy", {})
    # Workers start once the queue and tables exist.
    for command in ("worker", "reconcile"):
        depends = services[by_command[command]]["depends_on"]
        assert depends[by_command["provision"]]["condition"] == "service_completed_successfully"


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_documented_compose_run_line_parses(backend: str) -> None:
    text = (DEPLOY / f"compose.{backend}.yml").read_text(encoding="utf-8")
    (line,) = [line for line in text.splitlines() if " run --rm " in line]
    words = shlex.split(line.lstrip("# "))
    service = words[words.index("--rm") + 1]
    assert service in flowcraft_services(backend)
    args = parse(words[words.index("--rm") + 2:], f"compose.{backend}.yml comment")
    assert args.command == "start" and args.wait
    assert isinstance(json.loads(args.context), dict)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compose_variables_are_the_ones_flowcraft_reads(backend: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    settings_class = SETTINGS[backend]
    read = set(settings_class.ENVIRONMENT.values()) | SDK_VARIABLES[backend]
    if backend == "azure":
        read.add("COSMOS_DB_VERIFY_TLS")
    defaults = settings_class()
    for name, service in flowcraft_services(backend).items():
        environment = {key: str(value) for key, value in service["environment"].items()}
        assert set(environment) <= read, f"{name}: {set(environment) - read} is read by nobody"
        # Names given explicitly are the defaults `flowcraft provision` creates; the claim
        # check's bucket or container has none (it is off unless named): the stack names it.
        for field in fields(settings_class):
            variable = settings_class.ENVIRONMENT.get(field.name, "")
            if getattr(defaults, field.name) is None and variable.startswith("FLOWCRAFT_"):
                assert environment.get(variable), f"{name}: {variable} is not set"
            elif variable.startswith("FLOWCRAFT_") and variable in environment:
                assert environment[variable] == getattr(defaults, field.name), variable


def service_environment(backend: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    services = flowcraft_services(backend)
    environments = [{k: str(v) for k, v in s["environment"].items()} for s in services.values()]
    assert all(e == environments[0] for e in environments), "services disagree on settings"
    for key in [*AwsSettings.ENVIRONMENT.values(), *AzureSettings.ENVIRONMENT.values(),
                "AWS_DEFAULT_REGION", "COSMOS_DB_VERIFY_TLS"]:
        monkeypatch.delenv(key, raising=False)
    for key, value in environments[0].items():
        monkeypatch.setenv(key, value)
    return environments[0]


def option(command: list[str], flag: str) -> str:
    """The value of the last ``flag`` (``npx -p PACKAGE server -p PORT``: the server's)."""
    return command[len(command) - 1 - command[::-1].index(flag) + 1]


def test_aws_compose_points_the_workers_at_its_moto_server(
        monkeypatch: pytest.MonkeyPatch) -> None:
    service_environment("aws", monkeypatch)
    settings = AwsSettings.resolve()
    endpoint = urlsplit(settings.endpoint_url or "")
    moto = compose("aws")["services"][endpoint.hostname]
    assert str(endpoint.port) == option(moto["command"], "-p")
    # The image is the moto release the tests run against.
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().split())
    assert moto["image"] == f"motoserver/moto:{pins['moto']}"


def test_azure_compose_reaches_the_emulators_on_loopback(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from flowcraft.local import AZURITE_ACCOUNT, AZURITE_KEY, COSMOS_EMULATOR_KEY

    service_environment("azure", monkeypatch)
    settings = AzureSettings.resolve()
    settings.require()
    # Certificate checks may be off only for a Cosmos server on this machine: the services
    # share the emulators' network namespace, so it is on 127.0.0.1.
    assert settings.cosmos_verify() is False
    services = compose("azure")["services"]
    for name in [*flowcraft_services("azure"), "cosmos", "redis"]:
        assert services[name]["network_mode"] == "service:azurite", name
    azurite, cosmos, redis = services["azurite"], services["cosmos"], services["redis"]
    assert settings.storage_connection_string == (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
        f"QueueEndpoint=http://127.0.0.1:{option(azurite['command'], '--queuePort')}/"
        f"{AZURITE_ACCOUNT};"
        f"BlobEndpoint=http://127.0.0.1:{option(azurite['command'], '--blobPort')}/"
        f"{AZURITE_ACCOUNT};")
    assert settings.cosmos_connection_string == (
        f"AccountEndpoint=https://127.0.0.1:{option(cosmos['command'], '-p')}/;"
        f"AccountKey={COSMOS_EMULATOR_KEY};")
    assert settings.redis_url == f"redis://127.0.0.1:{option(redis['command'], '--port')}/0"
    # The emulators are the versions the tests run against.
    versions = json.loads((ROOT / "tools" / "local-services" / "package.json").read_text())
    versions = versions["dependencies"]
    assert azurite["image"].endswith(f"/azurite:{versions['azurite']}")
    assert f"@vercel/cosmosdb-server@{versions['@vercel/cosmosdb-server']}" in cosmos["command"]


# -- the Terraform modules -------------------------------------------------------------------------

# IAM grants a batch request under the single request's action, and HeadObject under
# GetObject.
IAM_ACTION = {"SendMessageBatch": "SendMessage", "DeleteMessageBatch": "DeleteMessage",
              "ChangeMessageVisibilityBatch": "ChangeMessageVisibility",
              "HeadObject": "GetObject"}


def aws_requests_of_the_workers() -> set[str]:
    """Every SQS / DynamoDB / S3 request the worker, client and reconciler code makes, as
    IAM actions (provisioning excluded: it is not the workers' job), and s3:ListBucket for
    reading objects: without it S3 answers 403 instead of 404 for one that is missing."""
    import botocore.session
    from botocore import xform_name

    code = "\n".join(
        path.read_text(encoding="utf-8")
        for path in [*(ROOT / "src" / "flowcraft" / "adapters" / "aws").glob("*.py"),
                     ROOT / "src" / "flowcraft" / "adapters" / "connect.py"]
        if path.name != "provision.py")
    session = botocore.session.get_session()
    actions = set()
    for service in ("sqs", "dynamodb", "s3"):
        for operation in session.get_service_model(service).operation_names:
            if re.search(rf"\.{xform_name(operation)}\(", code):
                actions.add(f"{service}:{IAM_ACTION.get(operation, operation)}")
    if "s3:GetObject" in actions:
        actions.add("s3:ListBucket")
    return actions


def test_aws_worker_policy_allows_exactly_the_requests_the_code_makes() -> None:
    module = terraform("aws")
    (document,) = module["data"]["aws_iam_policy_document"].values()
    granted = {action for statement in document["statement"] for action in statement["actions"]}
    assert granted == aws_requests_of_the_workers()
    scans = [s for s in document["statement"] if "dynamodb:Scan" in s["actions"]]
    assert [s["resources"] for s in scans] == [["${aws_dynamodb_table.statuses.arn}"]]
    # Objects only under the claim check's prefix; listing only in its bucket.
    from flowcraft.adapters.claimcheck import DEFAULT_PREFIX

    objects = [s for s in document["statement"]
               if any(a in s["actions"] for a in ("s3:GetObject", "s3:PutObject"))]
    assert [s["resources"] for s in objects] == [
        [f"${{aws_s3_bucket.payloads.arn}}/{DEFAULT_PREFIX}/*"]]
    listing = [s for s in document["statement"] if "s3:ListBucket" in s["actions"]]
    assert [s["resources"] for s in listing] == [["${aws_s3_bucket.payloads.arn}"]]


async def test_aws_module_matches_what_provision_creates(aws: Any) -> None:
    from flowcraft.adapters.aws import AwsNames

    module = terraform("aws")
    variables = module["variable"]
    tables = module["resource"]["aws_dynamodb_table"]
    queues = module["resource"]["aws_sqs_queue"]
    defaults = AwsNames()
    provisioned = {"contexts": aws.context_table, "statuses": aws.status_table,
                   "coordination": aws.coordination_table}
    assert resolve(queues["jobs"]["name"], variables) == defaults.queue_name
    for resource, default in (("contexts", defaults.context_table),
                              ("statuses", defaults.status_table),
                              ("coordination", defaults.coordination_table)):
        table = tables[resource]
        assert resolve(table["name"], variables) == default
        described = (await aws.dynamodb.describe_table(TableName=provisioned[resource]))["Table"]
        (key,) = described["KeySchema"]
        assert table["hash_key"] == key["AttributeName"] and key["KeyType"] == "HASH"
        assert [{"name": a["AttributeName"], "type": a["AttributeType"]}
                for a in described["AttributeDefinitions"]] == table["attribute"]
        assert table["billing_mode"] == described["BillingModeSummary"]["BillingMode"]
        ttl = (await aws.dynamodb.describe_time_to_live(TableName=provisioned[resource]))
        ttl = ttl["TimeToLiveDescription"]
        if ttl.get("TimeToLiveStatus") == "ENABLED":  # provision sets it where it is used
            assert table["ttl"] == [{"attribute_name": ttl["AttributeName"], "enabled": True}]
    # Expiry: contexts through their own attribute (a context's keys are attributes), the
    # rest through `ttl`; the status index as provision creates it; a DLQ takes poison.
    from flowcraft.adapters.aws.provision import CONTEXT_TTL_ATTRIBUTE, STATUS_INDEX

    assert tables["contexts"]["ttl"][0]["attribute_name"] == CONTEXT_TTL_ATTRIBUTE
    assert {tables[t]["ttl"][0]["attribute_name"] for t in ("statuses", "coordination")} == {
        "ttl"}
    described = (await aws.dynamodb.describe_table(TableName=aws.status_table))["Table"]
    (index,) = described["GlobalSecondaryIndexes"]
    (declared,) = tables["statuses"]["global_secondary_index"]
    keys = {k["KeyType"]: k["AttributeName"] for k in index["KeySchema"]}
    assert (declared["name"], declared["hash_key"], declared["range_key"],
            declared["projection_type"]) == (STATUS_INDEX, keys["HASH"], keys["RANGE"],
                                             index["Projection"]["ProjectionType"])
    assert "deadLetterTargetArn = aws_sqs_queue.dead_letter.arn" in queues["jobs"][
        "redrive_policy"]


async def test_aws_payload_bucket_matches_what_provision_creates(aws: Any) -> None:
    """The claim check's bucket: the lifecycle rule provision writes is the module's, and
    both expire the objects with the runs (the status store's retention)."""
    import uuid

    from flowcraft.adapters.aws import AwsNames, provision_aws
    from flowcraft.adapters.aws.statuses import DynamoDbStatusStore
    from flowcraft.adapters.connect import AwsSettings, aws_s3_client

    module = terraform("aws")
    variables = module["variable"]
    assert "default" not in variables["payload_bucket_name"]  # global names: no default
    (bucket,) = module["resource"]["aws_s3_bucket"].values()
    assert bucket["bucket"] == "${var.payload_bucket_name}"
    (lifecycle,) = module["resource"]["aws_s3_bucket_lifecycle_configuration"].values()
    (declared,) = lifecycle["rule"]
    name = f"payloads-{uuid.uuid4().hex[:8]}"
    names = AwsNames(aws.queue_name, aws.context_table, aws.status_table,
                     aws.coordination_table, name)
    async with aws_s3_client(AwsSettings(region="us-east-1",
                                         endpoint_url=aws.endpoint.url)) as s3:
        first = await provision_aws(aws.sqs, aws.dynamodb, names, s3)
        assert f"bucket {name}" in first["created"]
        again = await provision_aws(aws.sqs, aws.dynamodb, names, s3)
        assert again["created"] == []
        (rule,) = (await s3.get_bucket_lifecycle_configuration(Bucket=name))["Rules"]
    assert (declared["id"], declared["status"]) == (rule["ID"], rule["Status"])
    assert declared["filter"] == [{"prefix": rule["Filter"]["Prefix"]}]
    days = resolve(declared["expiration"][0]["days"], variables)
    assert days == rule["Expiration"]["Days"]
    assert days * 24 * 3600 == DynamoDbStatusStore.retention_seconds


async def test_azure_module_matches_what_provision_creates(azure: Any) -> None:
    from flowcraft.adapters.azure import AzureNames

    module = terraform("azure")
    variables = module["variable"]
    resources = module["resource"]
    defaults = AzureNames()
    queues = {resolve(q["name"], variables) for q in resources["azurerm_storage_queue"].values()}
    provisioned = sorted([q.name async for q in azure.queue_service.list_queues(
        name_starts_with=azure.queue_name)])
    assert queues == {name.replace(azure.queue_name, defaults.queue_name)
                      for name in provisioned}
    (database,) = resources["azurerm_cosmosdb_sql_database"].values()
    assert resolve(database["name"], variables) == defaults.database
    containers = {resolve(c["name"], variables): c
                  for c in resources["azurerm_cosmosdb_sql_container"].values()}
    assert set(containers) == {defaults.context_container, defaults.status_container}
    database_client = azure.cosmos.get_database_client(azure.database)
    for name, container in containers.items():
        properties = await database_client.get_container_client(name).read()
        assert container["partition_key_paths"] == properties["partitionKey"]["paths"]
    assert resources["azurerm_redis_cache"]["main"]["non_ssl_port_enabled"] is False


async def test_azure_payload_container_matches_what_provision_creates(azure: Any) -> None:
    """The claim check's container is private; the module's management policy deletes its
    blobs under the claim check's prefix with the runs (the status store's retention)."""
    import uuid

    from flowcraft.adapters.azure import AzureNames, provision_azure
    from flowcraft.adapters.azure.statuses import CosmosDbStatusStore
    from flowcraft.adapters.claimcheck import DEFAULT_PREFIX
    from flowcraft.adapters.connect import AzureSettings, azure_blob_service

    module = terraform("azure")
    variables, resources = module["variable"], module["resource"]
    (container,) = resources["azurerm_storage_container"].values()
    assert container["container_access_type"] == "private"
    assert container["name"] == "${var.payload_container_name}"
    (policy,) = resources["azurerm_storage_management_policy"].values()
    (rule,) = policy["rule"]
    (filters,) = rule["filters"]
    assert filters["prefix_match"] == [f"${{var.payload_container_name}}/{DEFAULT_PREFIX}/"]
    (actions,) = rule["actions"]
    days = resolve(actions["base_blob"][0][
        "delete_after_days_since_modification_greater_than"], variables)
    assert days * 24 * 3600 == CosmosDbStatusStore.retention_seconds
    name = f"payloads-{uuid.uuid4().hex[:8]}"
    names = AzureNames(azure.queue_name, azure.database, azure.context_container,
                       azure.status_container, name)
    settings = AzureSettings(
        storage_connection_string=azure.services.endpoints.storage_connection_string)
    async with azure_blob_service(settings) as blobs:
        first = await provision_azure(azure.queue_service, azure.cosmos, names, blobs)
        assert f"blob container {name}" in first["created"]
        again = await provision_azure(azure.queue_service, azure.cosmos, names, blobs)
        assert again["created"] == []
        properties = await blobs.get_container_client(name).get_container_properties()
    assert properties.public_access is None  # private


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_variables_name_the_settings_workers_read(backend: str) -> None:
    """Each name variable's description names the environment variable that carries it to
    the workers, so a renamed resource is configured on the workers too."""
    variables = terraform(backend)["variable"]
    environment = set(SETTINGS[backend].ENVIRONMENT.values())
    for name, variable in variables.items():
        if name.endswith("_name") and "default" in variable:
            mentioned = set(re.findall(r"[A-Z_]{6,}", variable["description"]))
            assert mentioned & environment, f"{backend} variable {name}"

