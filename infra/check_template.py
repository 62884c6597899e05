#!/usr/bin/env python3
"""Static checks of infra/tradeeon.yaml that cfn-lint and checkov cannot know about: the
properties the architecture promises (docs/security.md, infra/README.md), and agreement with the
code (every environment variable the stack sets is one the service reads; every metric the alarms
watch is one the worker publishes).

Runs in .venv-cfn (it parses the template with cfn-lint's CloudFormation YAML loader).

Usage: check_template.py [--checkov-report REPORT.json ...]
  With reports (checkov -o json), also checks that checkov failed nothing and that every
  `checkov: skip:` in the template suppressed a real finding, with a written reason.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from cfnlint.decode import decode

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "infra" / "tradeeon.yaml"
RUST_DIRS = ["src", "shared/src", "api/src", "worker/src"]

EXCHANGES = ["binance", "coinbase", "kraken", "zerodha"]
STATUSES = ["pending", "connected", "degraded", "error", "expired"]
SECRET_VARIABLES = {"DATABASE_URL", "ENCRYPTION_KEY", "SUPABASE_JWT_SECRET"}
# Read by libraries rather than by a string literal in our code.
VARIABLES_READ_BY_LIBRARIES = {"RUST_LOG", "AWS_REGION"}

failures: list[str] = []


def check(condition: bool, message: str) -> None:
    if not condition:
        failures.append(message)


def ref(name: str) -> dict:
    return {"Ref": name}


def container(template: dict, task_definition: str) -> dict:
    """The task's service container; the only other one allowed is the conditional `migrate`."""
    definitions = entries(template["Resources"][task_definition]["Properties"]["ContainerDefinitions"])
    services = [d for d in definitions if d.get("Name") != "migrate"]
    check(len(services) == 1, f"{task_definition} should have exactly one service container besides `migrate`")
    return services[0]


def migrate_container(template: dict, task_definition: str) -> dict | None:
    definitions = entries(template["Resources"][task_definition]["Properties"]["ContainerDefinitions"])
    found = [d for d in definitions if d.get("Name") == "migrate"]
    return found[0] if found else None


def environment(definition: dict) -> dict:
    return {entry["Name"]: entry["Value"] for entry in definition.get("Environment", [])}


def rust_sources() -> str:
    return "\n".join(
        path.read_text(encoding="utf-8") for d in RUST_DIRS for path in sorted((ROOT / d).rglob("*.rs"))
    )


def resources_of(template: dict, kind: str) -> dict[str, dict]:
    return {name: r for name, r in template["Resources"].items() if r["Type"] == kind}


def entries(items: list) -> list:
    """A list's entries, an `!If [condition, a, b]` entry counting as whichever of a and b is there."""
    out = []
    for item in items:
        if isinstance(item, dict) and "Fn::If" in item:
            out += [branch for branch in item["Fn::If"][1:] if branch != {"Ref": "AWS::NoValue"}]
        else:
            out.append(item)
    return out


def check_containers(template: dict, rust: str) -> None:
    api = container(template, "ApiTaskDefinition")
    worker = container(template, "WorkerTaskDefinition")
    check(api.get("Command") == ["api"], "the api container must run `tradeeon api`")
    check(worker.get("Command") == ["worker"], "the worker container must run `tradeeon worker`")
    check(api["Image"] == worker["Image"] == ref("ContainerImage"), "both services must run the one ContainerImage")

    for name, definition in (("api", api), ("worker", worker)):
        env = environment(definition)
        leaked = SECRET_VARIABLES & env.keys()
        check(not leaked, f"{name}: {sorted(leaked)} must come from Secrets Manager, not Environment")
        for variable, value in env.items():
            check(
                not re.search(r"SECRET|PASSWORD|ENCRYPTION_KEY", variable),
                f"{name}: {variable} looks like a secret set as a plain environment value",
            )
            check(
                variable in VARIABLES_READ_BY_LIBRARIES or re.search(rf'"{variable}(=[^"]*)?"', rust),
                f"{name}: the stack sets {variable}, which no Rust source reads (typo, or renamed?)",
            )
        check(env.get("LOG_FORMAT") == "json", f"{name}: LOG_FORMAT must be json in AWS")
        check(
            env.get("EGRESS_IPS") == template["Outputs"]["EgressIps"]["Value"],
            f"{name}: EGRESS_IPS must be exactly the EgressIps output",
        )
        check(definition.get("ReadonlyRootFilesystem") is True, f"{name}: the root filesystem should be read-only")
        check(int(definition.get("StopTimeout", 0)) >= 30, f"{name}: StopTimeout too short to drain on SIGTERM")
        log = definition.get("LogConfiguration", {})
        check(log.get("LogDriver") == "awslogs", f"{name}: logs must go to CloudWatch Logs")

    secrets = {s["Name"] for s in entries(api.get("Secrets", []))}
    check(secrets == SECRET_VARIABLES, f"api: Secrets must be exactly {sorted(SECRET_VARIABLES)}, got {sorted(secrets)}")
    secrets = {s["Name"] for s in entries(worker.get("Secrets", []))}
    check(
        secrets == {"DATABASE_URL", "ENCRYPTION_KEY"},
        f"worker: Secrets must be exactly DATABASE_URL and ENCRYPTION_KEY, got {sorted(secrets)}",
    )

    # Migrations run as the tables' owner in a container of their own that finishes before the
    # service starts; the service connects as a role that owns nothing (docs/operations.md).
    for task, name, definition in (("ApiTaskDefinition", "api", api), ("WorkerTaskDefinition", "worker", worker)):
        migrate = migrate_container(template, task)
        check(migrate is not None, f"{task}: a `migrate` container must run before {name}")
        if migrate is None:
            continue
        check(migrate.get("Command") == ["migrate"], f"{task}: the migrate container must run `tradeeon migrate`")
        check(migrate.get("Essential") is False, f"{task}: the migrate container exits; it must not be essential")
        check(migrate.get("ReadonlyRootFilesystem") is True, f"{task}: migrate: the root filesystem should be read-only")
        migrate_secrets = {s["Name"]: s["ValueFrom"] for s in migrate.get("Secrets", [])}
        check(
            set(migrate_secrets) == {"DATABASE_URL", "DATABASE_APP_URL"},
            f"{task}: migrate gets exactly DATABASE_URL (owner) and DATABASE_APP_URL, got {sorted(migrate_secrets)}",
        )
        service_url = {s["Name"]: s["ValueFrom"] for s in entries(definition.get("Secrets", []))}.get("DATABASE_URL")
        check(
            migrate_secrets.get("DATABASE_APP_URL") == service_url,
            f"{task}: DATABASE_APP_URL must be the {name}'s DATABASE_URL (the login role migrate provisions)",
        )
        check(
            migrate_secrets.get("DATABASE_URL") != service_url,
            f"{task}: {name} must not connect with the owner's DATABASE_URL",
        )
        check(
            definition.get("DependsOn")
            == {"Fn::If": ["RunsMigrations", [{"ContainerName": "migrate", "Condition": "SUCCESS"}], {"Ref": "AWS::NoValue"}]},
            f"{task}: {name} must start only after migrate succeeded",
        )

    env = environment(api)
    for variable, value in {"API_HOST": "0.0.0.0", "API_PORT": "8000", "API_METRICS_PORT": "9101", "TRUST_PROXY": "true"}.items():
        check(env.get(variable) == value, f"api: {variable} must be {value}")
    check(
        api.get("PortMappings") == [{"ContainerPort": 8000, "Protocol": "tcp"}, {"ContainerPort": 9101, "Protocol": "tcp"}],
        "api: only the API port 8000 and the metrics port 9101 are mapped",
    )
    check(
        api.get("HealthCheck", {}).get("Command") == ["CMD", "/usr/local/bin/tradeeon", "healthcheck"],
        "api: the container health check must be `tradeeon healthcheck` (GET /health)",
    )

    env = environment(worker)
    check(env.get("METRICS_PUBLISHER") == "cloudwatch", "worker: METRICS_PUBLISHER must be cloudwatch")
    check(env.get("CLOUDWATCH_NAMESPACE") == ref("MetricsNamespace"), "worker: CLOUDWATCH_NAMESPACE must be MetricsNamespace")
    check(
        env.get("HEALTH_SWEEP_INTERVAL") == {"Fn::Sub": "${HealthSweepIntervalSeconds}s"},
        "worker: HEALTH_SWEEP_INTERVAL must come from HealthSweepIntervalSeconds (the missing-sweep alarm uses it)",
    )
    check(
        env.get("API_HOST") == "0.0.0.0" and env.get("WORKER_METRICS_PORT") == "9100",
        "worker: its metrics listener must be on 0.0.0.0:9100 (API_HOST, WORKER_METRICS_PORT), the port its security group opens to scrapers",
    )
    check(worker.get("PortMappings") == [{"ContainerPort": 9100, "Protocol": "tcp"}], "worker: only the metrics port 9100 is mapped")


def check_roles(template: dict) -> None:
    api_role = template["Resources"]["ApiTaskRole"]["Properties"]
    check(
        not api_role.get("Policies") and not api_role.get("ManagedPolicyArns"),
        "ApiTaskRole must have no permissions (the api calls no AWS API)",
    )
    policies = template["Resources"]["WorkerTaskRole"]["Properties"].get("Policies", [])
    statements = [s for p in policies for s in p["PolicyDocument"]["Statement"]]
    check(
        template["Resources"]["WorkerTaskRole"]["Properties"].get("ManagedPolicyArns") is None,
        "WorkerTaskRole: no managed policies",
    )
    check(
        len(statements) == 1
        and statements[0]["Action"] == "cloudwatch:PutMetricData"
        and statements[0]["Condition"] == {"StringEquals": {"cloudwatch:namespace": ref("MetricsNamespace")}},
        "WorkerTaskRole may only PutMetricData, conditioned on the MetricsNamespace",
    )
    for name in ("ApiTaskDefinition", "WorkerTaskDefinition"):
        props = template["Resources"][name]["Properties"]
        check(props["ExecutionRoleArn"] != props["TaskRoleArn"], f"{name}: execution and task roles must differ")


def rules(group: dict, key: str) -> list[dict]:
    return list(group["Properties"].get(key, []))


def check_network(template: dict) -> None:
    res = template["Resources"]
    internet = "0.0.0.0/0"

    alb_in = {(r["IpProtocol"], r["FromPort"], r["ToPort"], r.get("CidrIp")) for r in rules(res["AlbSecurityGroup"], "SecurityGroupIngress")}
    check(
        alb_in == {("tcp", 443, 443, internet), ("tcp", 80, 80, internet)},
        f"ALB security group: inbound must be exactly 443 and 80 from the internet, got {alb_in}",
    )
    alb_out = rules(res["AlbSecurityGroup"], "SecurityGroupEgress")
    check(
        len(alb_out) == 1
        and alb_out[0]["FromPort"] == alb_out[0]["ToPort"] == 8000
        and alb_out[0].get("DestinationSecurityGroupId") == ref("ApiTaskSecurityGroup"),
        "ALB security group: outbound must be only 8000 to the api tasks",
    )

    for name in ("ApiTaskSecurityGroup", "WorkerTaskSecurityGroup", "MetricsScraperSecurityGroup"):
        check(not rules(res[name], "SecurityGroupIngress"), f"{name}: no inline inbound rules")
    scraper_out = {
        (r["IpProtocol"], r["FromPort"], r["ToPort"], json.dumps(r.get("DestinationSecurityGroupId")), r.get("CidrIp"))
        for r in rules(res["MetricsScraperSecurityGroup"], "SecurityGroupEgress")
    }
    check(
        scraper_out
        == {
            ("tcp", 9101, 9101, json.dumps(ref("ApiTaskSecurityGroup")), None),
            ("tcp", 9100, 9100, json.dumps(ref("WorkerTaskSecurityGroup")), None),
        },
        f"MetricsScraperSecurityGroup: outbound must be exactly the two metrics ports of the tasks, got {scraper_out}",
    )
    for name in ("ApiTaskSecurityGroup", "WorkerTaskSecurityGroup"):
        out = rules(res[name], "SecurityGroupEgress")
        check(
            [(r["IpProtocol"], r["FromPort"], r["ToPort"], r.get("CidrIp")) for r in out] == [("tcp", 443, 443, internet)],
            f"{name}: inline outbound must be exactly 443 to the internet",
        )

    ingress = resources_of(template, "AWS::EC2::SecurityGroupIngress")
    to_tasks = {n: r["Properties"] for n, r in ingress.items() if r["Properties"]["GroupId"] in (ref("ApiTaskSecurityGroup"), ref("WorkerTaskSecurityGroup"))}
    inbound = sorted(
        (r["GroupId"]["Ref"], r["IpProtocol"], r["FromPort"], r["ToPort"], r["SourceSecurityGroupId"]["Ref"], "CidrIp" in r)
        for r in to_tasks.values()
    )
    check(
        inbound
        == [
            ("ApiTaskSecurityGroup", "tcp", 8000, 8000, "AlbSecurityGroup", False),
            ("ApiTaskSecurityGroup", "tcp", 9101, 9101, "MetricsScraperSecurityGroup", False),
            ("WorkerTaskSecurityGroup", "tcp", 9100, 9100, "MetricsScraperSecurityGroup", False),
        ],
        "task security groups: inbound is only 8000 from the ALB to the api tasks, and the metrics ports "
        f"(api 9101, worker 9100) from MetricsScraperSecurityGroup, got {inbound}",
    )
    egress = resources_of(template, "AWS::EC2::SecurityGroupEgress")
    for name, r in egress.items():
        props = r["Properties"]
        database_port = props["FromPort"] == props["ToPort"] and props["FromPort"] in (ref("ExternalDatabasePort"), 5432)
        check(database_port, f"{name}: extra task egress may only open the database port")
        if props.get("CidrIp") == internet:
            check(r.get("Condition") == "UseExternalDatabase", f"{name}: internet egress on the database port only for an external database")

    for name in ("ApiService", "WorkerService"):
        vpc = res[name]["Properties"]["NetworkConfiguration"]["AwsvpcConfiguration"]
        check(vpc["AssignPublicIp"] == "DISABLED", f"{name}: tasks must not get public IPs")
        check(vpc["Subnets"] == [ref("PrivateSubnetA"), ref("PrivateSubnetB")], f"{name}: tasks must run in the private subnets")
    check("LoadBalancers" not in res["WorkerService"]["Properties"], "WorkerService: not behind the load balancer")

    for table, nat in (("PrivateDefaultRouteA", ref("NatGatewayA")), ("PrivateDefaultRouteB", {"Fn::If": ["PerAzNat", ref("NatGatewayB"), ref("NatGatewayA")]})):
        check(res[table]["Properties"].get("NatGatewayId") == nat, f"{table}: private subnets must leave through the NAT gateway")
    for subnet in ("PublicSubnetA", "PublicSubnetB", "PrivateSubnetA", "PrivateSubnetB"):
        check(res[subnet]["Properties"].get("MapPublicIpOnLaunch") is False, f"{subnet}: no automatic public IPs")
    for eip in ("EgressIpA", "EgressIpB"):
        check(res[eip].get("DeletionPolicy") == "Retain", f"{eip}: users whitelist it; it must survive the stack")
    check(
        template["Outputs"]["EgressIps"]["Value"]
        == {"Fn::If": ["PerAzNat", {"Fn::Join": [",", [ref("EgressIpA"), ref("EgressIpB")]]}, ref("EgressIpA")]},
        "EgressIps must list every NAT gateway's Elastic IP",
    )


def check_load_balancer(template: dict) -> None:
    res = template["Resources"]
    group = res["ApiTargetGroup"]["Properties"]
    check(group["Port"] == 8000 and group["HealthCheckPath"] == "/health", "target group: port 8000, health check /health")
    https = res["HttpsListener"]["Properties"]
    check(
        https["Port"] == 443 and https["Protocol"] == "HTTPS" and https["Certificates"] == [{"CertificateArn": ref("ApiCertificateArn")}],
        "HTTPS listener on 443 with the ApiCertificateArn certificate",
    )
    # The load balancer reaches the API port only: the metrics listeners are on other ports, which
    # no target group, listener rule or ALB egress rule names.
    check(
        https["DefaultActions"] == [{"Type": "forward", "TargetGroupArn": ref("ApiTargetGroup")}],
        "HTTPS listener: its default action forwards to ApiTargetGroup",
    )
    groups = resources_of(template, "AWS::ElasticLoadBalancingV2::TargetGroup")
    check(list(groups) == ["ApiTargetGroup"], f"the only target group is ApiTargetGroup, got {sorted(groups)}")
    forwarded = [
        action
        for rule in resources_of(template, "AWS::ElasticLoadBalancingV2::ListenerRule").values()
        for action in rule["Properties"]["Actions"]
        if action["Type"] == "forward" and action.get("TargetGroupArn") != ref("ApiTargetGroup")
    ]
    check(not forwarded, f"listener rules forward only to ApiTargetGroup, got {forwarded}")
    balanced = [(b["ContainerName"], b["ContainerPort"]) for b in res["ApiService"]["Properties"]["LoadBalancers"]]
    check(balanced == [("api", 8000)], f"ApiService: the load balancer reaches container port 8000 only, got {balanced}")
    http = res["HttpRedirectListener"]["Properties"]
    actions = http["DefaultActions"]
    check(
        http["Port"] == 80
        and len(actions) == 1
        and actions[0]["Type"] == "redirect"
        and actions[0]["RedirectConfig"]["Protocol"] == "HTTPS",
        "HTTP listener: its only action is the redirect to HTTPS",
    )


def check_database_tls(template: dict) -> None:
    """The stack's RDS URL verifies the server (verify-full) against a CA file the image ships."""
    url = template["Resources"]["RdsDatabaseUrlSecret"]["Properties"]["SecretString"]["Fn::Sub"]
    found = re.search(r"\?sslmode=verify-full&sslrootcert=(/[\w./-]+)$", url)
    check(found is not None, f"RdsDatabaseUrlSecret: DATABASE_URL must end with ?sslmode=verify-full&sslrootcert=/PATH, got {url}")
    if found:
        dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
        copied = re.search(rf"^COPY --from=\S+ \S+ {re.escape(found.group(1))}$", dockerfile, re.M)
        check(copied is not None, f"the image must ship {found.group(1)} (the sslrootcert of the RDS DATABASE_URL)")


def check_frontend(template: dict) -> None:
    res = template["Resources"]
    bucket = res["FrontendBucket"]["Properties"]
    check(all(bucket["PublicAccessBlockConfiguration"].values()), "FrontendBucket must block all public access")
    check(bucket["VersioningConfiguration"]["Status"] == "Enabled", "FrontendBucket must be versioned")
    check("BucketEncryption" in bucket, "FrontendBucket must be encrypted")
    config = res["FrontendDistribution"]["Properties"]["DistributionConfig"]
    check(
        config["Origins"][0].get("OriginAccessControlId") == {"Fn::GetAtt": ["FrontendOriginAccessControl", "Id"]},
        "CloudFront must read the bucket through the Origin Access Control",
    )
    fallback = {(e["ErrorCode"], e["ResponseCode"], e["ResponsePagePath"]) for e in config["CustomErrorResponses"]}
    check(fallback == {(403, 200, "/index.html"), (404, 200, "/index.html")}, "SPA fallback: 403 and 404 serve /index.html")
    check(config["ViewerCertificate"].get("AcmCertificateArn") == ref("FrontendCertificateArn"), "CloudFront uses FrontendCertificateArn")


def metric_names(value: object) -> set[str]:
    """Every MetricName (and Metrics Insights metric) anywhere inside value."""
    found: set[str] = set()
    if isinstance(value, dict):
        for key, inner in value.items():
            if key == "MetricName" and isinstance(inner, str):
                found.add(inner)
            found |= metric_names(inner)
    elif isinstance(value, list):
        for inner in value:
            found |= metric_names(inner)
    elif isinstance(value, str):
        found |= set(re.findall(r"SELECT \w+\((\w+)\)", value))
    return found


def check_alarms(template: dict, rust: str) -> None:
    alarms = resources_of(template, "AWS::CloudWatch::Alarm")
    for name, alarm in alarms.items():
        props = alarm["Properties"]
        check(props.get("AlarmActions") == [ref("AlarmTopic")], f"{name}: must notify the alarm topic")
        check("docs/operations.md#" in props.get("AlarmDescription", ""), f"{name}: its description must link its runbook")
        runbook = props.get("AlarmDescription", "").split("docs/operations.md#")[-1].split()[0]
        operations = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8") if (ROOT / "docs" / "operations.md").exists() else ""
        check(f'<a id="{runbook}"></a>' in operations, f"{name}: docs/operations.md has no runbook anchor {runbook!r}")

    for exchange in EXCHANGES:
        name = f"ErrorShare{exchange.capitalize()}Alarm"
        check(name in alarms, f"missing {name}")
        if name not in alarms:
            continue
        metrics = alarms[name]["Properties"]["Metrics"]
        dims = {
            tuple((d["Name"], d["Value"]) for d in m["MetricStat"]["Metric"]["Dimensions"])
            for m in metrics
            if "MetricStat" in m
        }
        check(
            dims == {(("Exchange", exchange), ("Status", status)) for status in STATUSES},
            f"{name}: must read ConnectionsByStatus for {exchange} in every status",
        )
        for kind in ("HealthCheckFailures", "RateLimited"):
            check(f"{kind}{exchange.capitalize()}Alarm" in alarms, f"missing {kind}{exchange.capitalize()}Alarm")

    sweep = alarms["HealthSweepMissingAlarm"]["Properties"]
    check(
        sweep["TreatMissingData"] == "breaching"
        and sweep["Period"] == ref("HealthSweepIntervalSeconds")
        and sweep["EvaluationPeriods"] == 2,
        "HealthSweepMissingAlarm: two sweep intervals, missing data breaching",
    )
    for nat in ("NatGatewayA", "NatGatewayB"):
        check(
            any(a["Properties"].get("Dimensions") == [{"Name": "NatGatewayId", "Value": ref(nat)}] for a in alarms.values()),
            f"no port-allocation alarm for {nat}",
        )

    # Metrics in the workers' namespace must be ones the worker publishes.
    ours = set()
    for alarm in alarms.values():
        props = alarm["Properties"]
        if props.get("Namespace") == ref("MetricsNamespace") or "MetricsNamespace" in json.dumps(props.get("Metrics", [])):
            ours |= metric_names(props)
    ours |= {"QueueDepth"}  # the worker scaling policy
    for metric in sorted(ours):
        check(f'"{metric}"' in rust, f"alarms watch {metric}, which the worker does not publish (no \"{metric}\" in the Rust sources)")


def check_dashboard(template: dict) -> None:
    body = template["Resources"]["Dashboard"]["Properties"]["DashboardBody"]
    text = body["Fn::Sub"] if isinstance(body, dict) else body
    variables = set(re.findall(r"\$\{([^!}][^}]*)\}", text))
    check(variables <= {"MetricsNamespace", "AWS::Region"}, f"dashboard body uses unexpected variables {variables}")
    resolved = text.replace("${MetricsNamespace}", "Tradeeon/Connections").replace("${AWS::Region}", "eu-west-1").replace("${!", "${")
    try:
        check(isinstance(json.loads(resolved).get("widgets"), list), "dashboard body has no widgets list")
    except json.JSONDecodeError as err:
        failures.append(f"dashboard body is not valid JSON after substitution: {err}")


def template_skips(template: dict) -> set[tuple[str, str]]:
    skips = set()
    for name, resource in template["Resources"].items():
        for skip in resource.get("Metadata", {}).get("checkov", {}).get("skip", []):
            check(len(str(skip.get("comment", ""))) >= 20, f"{name}: checkov skip {skip.get('id')} needs a written reason")
            skips.add((skip["id"], name))
    return skips


def check_checkov_reports(template: dict, reports: list[Path]) -> None:
    suppressed: set[tuple[str, str]] = set()
    for report in reports:
        data = json.loads(report.read_text(encoding="utf-8"))
        for run in data if isinstance(data, list) else [data]:
            summary = run.get("summary", {})
            print(
                f"checkov ({report.stem}): {summary.get('passed')} passed, {summary.get('failed')} failed, "
                f"{summary.get('skipped')} skipped with a reason in the template"
            )
            for result in run.get("results", {}).get("failed_checks", []):
                failures.append(
                    f"checkov {result['check_id']} failed on {result['resource']} "
                    f"({result['check_name']}, {result.get('file_path', '')}:{result.get('file_line_range', [''])[0]})"
                )
            check(summary.get("failed") == 0, f"{report.name}: checkov failed {summary.get('failed')} checks")
            check(summary.get("parsing_errors") == 0, f"{report.name}: checkov could not parse a template")
            check(summary.get("passed", 0) > 0, f"{report.name}: checkov checked nothing")
            for result in run.get("results", {}).get("skipped_checks", []):
                suppressed.add((result["check_id"], result["resource"].split(".")[-1]))
    for check_id, resource in sorted(template_skips(template) - suppressed):
        failures.append(f"{resource}: skip of {check_id} suppresses nothing (stale or wrong id); remove it")


def main() -> int:
    parser = argparse.ArgumentParser(description="static checks of infra/tradeeon.yaml")
    parser.add_argument("--checkov-report", type=Path, action="append", default=[])
    args = parser.parse_args()

    template, matches = decode(str(TEMPLATE))
    if matches:
        for match in matches:
            print(match, file=sys.stderr)
        return 1
    rust = rust_sources()
    check_containers(template, rust)
    check_roles(template)
    check_network(template)
    check_load_balancer(template)
    check_database_tls(template)
    check_frontend(template)
    check_alarms(template, rust)
    check_dashboard(template)
    template_skips(template)
    if args.checkov_report:
        check_checkov_reports(template, args.checkov_report)

    if failures:
        print("infra/tradeeon.yaml does not keep its promises:", file=sys.stderr)
        for failure in failures:
            print(f"  - {failure}", file=sys.stderr)
        return 1
    print("infra/tradeeon.yaml: architecture checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
