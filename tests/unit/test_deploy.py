"""The deployment files under deploy/: they parse, and the fields that matter are right.

No container engine, Kubernetes, Grafana or Prometheus runs in CI, so these files cannot be
exercised end to end; this test checks them by construction instead: the dashboard only
queries metrics that ternpool exports (and always filters on the job), every Ray process runs
with token authentication, the head never takes a worker, the KubeRay cluster of the RayJob is
the RayCluster's, and the Dockerfile copies what pyproject.toml packages.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from ternpool.cluster import metrics

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
MODEL_DIR = "/models/bitnet-b1.58-2B-4T"
TOKEN_SECRET = "ternpool-ray-auth"
TOKEN_KEY = "auth_token"
IMAGE = "ternpool:latest"


def load_yaml(path: Path) -> list:
    yaml = pytest.importorskip("yaml")
    with open(path, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    assert docs, f"{path} has no YAML document"
    return docs


def one_doc(path: Path) -> dict:
    docs = load_yaml(path)
    assert len(docs) == 1, f"{path}: expected one YAML document, found {len(docs)}"
    return docs[0]


def kube_docs(kind: str) -> list[dict]:
    """Every document of this kind in deploy/kuberay/*.yaml."""
    return [d for p in sorted((DEPLOY / "kuberay").glob("*.yaml")) for d in load_yaml(p) if d.get("kind") == kind]


# -- every file ------------------------------------------------------------------------------------

def test_every_yaml_and_json_file_parses():
    yaml_files = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    json_files = sorted(DEPLOY.rglob("*.json"))
    names = {p.relative_to(DEPLOY).as_posix() for p in [*yaml_files, *json_files]}
    assert {"prometheus/prometheus.yml", "grafana/ternpool.json", "ray/cluster.yaml",
            "kuberay/raycluster.yaml", "kuberay/rayjob.yaml"} <= names
    for p in yaml_files:
        load_yaml(p)
    for p in json_files:
        json.loads(p.read_text(encoding="utf-8"))


def test_no_paths_of_this_machine():
    home = str(Path.home())
    for p in DEPLOY.rglob("*"):
        if p.is_file():
            text = p.read_text(encoding="utf-8")
            assert str(ROOT) not in text, f"{p} contains the checkout path {ROOT}"
            assert home == "/" or home + "/" not in text, f"{p} contains this machine's home {home}"


def test_readme_describes_every_file():
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    for p in DEPLOY.rglob("*"):
        if p.is_file() and p.name != "README.md":
            assert p.relative_to(DEPLOY).as_posix() in readme, f"deploy/README.md does not mention {p.name}"


# -- Prometheus ------------------------------------------------------------------------------------

def test_prometheus_scrapes_ternpool_and_ray():
    cfg = one_doc(DEPLOY / "prometheus" / "prometheus.yml")
    assert cfg["global"]["scrape_interval"] == "5s"
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert len(jobs) == len(cfg["scrape_configs"]), "job names must be unique"

    targets = [t for sc in jobs["ternpool"]["static_configs"] for t in sc["targets"]]
    assert "localhost:9469" in targets
    assert metrics.DEFAULT_PORT == 9469
    assert all(re.fullmatch(r"[\w.-]+:\d+", t) for t in targets), targets

    files = [f for sd in jobs["ray"]["file_sd_configs"] for f in sd["files"]]
    assert "/tmp/ray/prom_metrics_service_discovery.json" in files


# -- Grafana ---------------------------------------------------------------------------------------

METRIC_RE = re.compile(r"ternpool_[a-z_]+")
JOB_FILTER = 'job_id=~"$job_id"'


def unknown_metrics(expr: str) -> set[str]:
    """ternpool_* sample names in a PromQL expression that ternpool does not export."""
    return set(METRIC_RE.findall(expr)) - metrics.exported_names()


def unfiltered_metrics(expr: str) -> list[str]:
    """ternpool_* selectors in an expression that do not filter on the dashboard's job_id."""
    bad = []
    for m in METRIC_RE.finditer(expr):
        rest = expr[m.end():]
        selector = re.match(r"\s*\{([^}]*)\}", rest)
        if selector is None or JOB_FILTER not in selector.group(1):
            bad.append(m.group())
    return bad


def test_checkers_catch_bad_queries():
    assert unknown_metrics('sum(rate(ternpool_generated_tokens_total{job_id=~"$job_id"}[1m]))') == set()
    # a misspelt name, and a counter without the _total that Prometheus adds
    assert unknown_metrics('sum(rate(ternpool_tokens_generated_total{job_id=~"$job_id"}[1m]))') == \
        {"ternpool_tokens_generated_total"}
    assert unknown_metrics('ternpool_rows_done{job_id=~"$job_id"}') == {"ternpool_rows_done"}
    assert unknown_metrics("sum by (instance) (ray_node_mem_used)") == set()
    assert unfiltered_metrics('sum(ternpool_rows_total{job_id=~"$job_id"})') == []
    assert unfiltered_metrics("sum(ternpool_rows_total)") == ["ternpool_rows_total"]
    assert unfiltered_metrics('ternpool_rows_done_total{worker="a"} / ternpool_rows_total{job_id=~"$job_id"}') \
        == ["ternpool_rows_done_total"]


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "ternpool.json").read_text(encoding="utf-8"))


def test_dashboard_model(dashboard):
    assert dashboard["uid"] == "ternpool"
    assert isinstance(dashboard["title"], str) and dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] == 39
    assert dashboard["refresh"] == "5s"
    assert {"from", "to"} <= set(dashboard["time"])

    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    job = variables["job_id"]
    assert job["type"] == "query"
    query = job["query"]["query"] if isinstance(job["query"], dict) else job["query"]
    assert query == "label_values(ternpool_rows_total, job_id)"
    assert job.get("definition", query) == query
    assert not unknown_metrics(query)
    # "All" must turn into a regex that matches every job for job_id=~"$job_id"
    assert job["includeAll"] and job.get("allValue") == ".*"


def test_dashboard_panels(dashboard):
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for p in panels:
        where = f"panel {p.get('id')} {p.get('title')!r}"
        assert isinstance(p["id"], int), where
        assert p["type"] in {"timeseries", "stat", "gauge", "bargauge"}, where
        assert isinstance(p["title"], str) and p["title"], where
        assert isinstance(p.get("description"), str) and len(p["description"]) > 20, where
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        grid = p["gridPos"]
        assert set(grid) == {"h", "w", "x", "y"} and all(type(grid[k]) is int for k in "hwxy"), where
        assert grid["h"] > 0 and grid["w"] > 0 and grid["x"] >= 0 and grid["y"] >= 0, where
        assert grid["x"] + grid["w"] <= 24, f"{where} is wider than the 24-column grid"
        mine = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not mine & cells, f"{where} overlaps another panel"
        cells |= mine
        assert p["targets"], where
        ref_ids = [t["refId"] for t in p["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), where
        for t in p["targets"]:
            assert isinstance(t["expr"], str) and t["expr"].strip(), where
            assert "legendFormat" in t, where
            assert not unknown_metrics(t["expr"]), f"{where}: {unknown_metrics(t['expr'])} are not exported"
            assert not unfiltered_metrics(t["expr"]), f"{where}: {t['expr']} does not filter on job_id"


def test_dashboard_shows_what_matters(dashboard):
    exprs = {t["expr"]: p for p in dashboard["panels"] for t in p["targets"]}
    used = {name for e in exprs for name in METRIC_RE.findall(e)}
    required = {
        "ternpool_generated_tokens_total", "ternpool_tokens_per_second", "ternpool_rows_done_total",
        "ternpool_rows_total", "ternpool_eta_seconds", "ternpool_rows_failed_total",
        "ternpool_shard_retries_total", "ternpool_worker_restarts_total", "ternpool_shards_queued",
        "ternpool_shards_in_flight", "ternpool_active_workers", "ternpool_request_latency_seconds_bucket",
        "ternpool_time_to_first_token_seconds_bucket", "ternpool_shard_duration_seconds_bucket",
        "ternpool_kv_slots_in_use", "ternpool_kv_slots", "ternpool_model_resident_bytes",
    }
    assert required <= used, f"not on the dashboard: {sorted(required - used)}"
    assert 'sum(rate(ternpool_generated_tokens_total{job_id=~"$job_id"}[1m]))' in exprs
    assert any(e.startswith("sum by (worker) (rate(ternpool_generated_tokens_total") for e in exprs)
    for metric in ("ternpool_request_latency_seconds_bucket", "ternpool_time_to_first_token_seconds_bucket",
                   "ternpool_shard_duration_seconds_bucket"):
        for q in ("0.5", "0.95", "0.99"):
            assert any(e.startswith(f"histogram_quantile({q},") and metric in e for e in exprs), (metric, q)

    def unit_of(metric: str) -> set:
        return {p["fieldConfig"]["defaults"].get("unit") for e, p in exprs.items() if metric in e}

    assert unit_of("ternpool_eta_seconds") == {"s"}
    assert unit_of("ternpool_model_resident_bytes") == {"bytes"}
    assert unit_of("ray_node_mem_used") == {"bytes"}
    assert any("ray_node_mem_used" in e and "instance" in e for e in exprs)
    progress = [p for p in dashboard["panels"] if p["type"] == "stat" and p["fieldConfig"]["defaults"].get("unit")
                == "percent"]
    assert any("ternpool_rows_done_total" in t["expr"] and "ternpool_rows_total" in t["expr"]
               for p in progress for t in p["targets"]), "no progress (done/total %) stat"


# -- Ray cluster launcher --------------------------------------------------------------------------

def ray_start_commands(cfg: dict) -> list[str]:
    return [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in cfg[key]
            if "ray start" in c]


def test_cluster_launcher_config():
    cfg = one_doc(DEPLOY / "ray" / "cluster.yaml")
    assert cfg["cluster_name"] == "ternpool"
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"]["CPU"] == 0, "the head must take no ternpool worker"
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert workers, "no worker node type"
    for name, t in workers.items():
        assert t["resources"].get("CPU", 0) >= 1, name
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"], name
        assert t["node_config"]["InstanceType"], name

    setup = "\n".join(cfg["setup_commands"])
    assert re.search(r"pip install .*\bternpool\b", setup), "setup_commands do not install ternpool"
    assert MODEL_DIR in setup, "setup_commands do not put the model at the same path on every node"

    for key, flags in (("head_start_ray_commands", ["--head", "--port=6379", "--num-cpus=0",
                                                    "--metrics-export-port=8080",
                                                    "--autoscaling-config=~/ray_bootstrap_config.yaml"]),
                       ("worker_start_ray_commands", ["--address=$RAY_HEAD_IP:6379",
                                                      "--metrics-export-port=8080"])):
        cmds = cfg[key]
        assert cmds[0].strip() == "ray stop", key
        starts = [c for c in cmds if "ray start" in c]
        assert len(starts) == 1, key
        for flag in flags:
            assert flag in starts[0].split(), (key, flag)

    # token auth: each `ray start` runs in its own shell, so the variables are set in the same command
    token_files = {remote for remote in cfg["file_mounts"] if remote.endswith("/.ray/auth_token")}
    assert token_files, "the token file is not copied to the nodes"
    for cmd in ray_start_commands(cfg):
        assert "RAY_AUTH_MODE=token" in cmd, cmd
        m = re.search(r'RAY_AUTH_TOKEN="?\$\(cat ([^)]+)\)', cmd)
        assert m and m.group(1) in token_files, cmd
        assert cmd.index("RAY_AUTH_TOKEN") < cmd.index("ray start"), cmd


def test_cluster_launcher_config_matches_rays_schema():
    spec = importlib.util.find_spec("ray")  # finds the package without importing (starting) Ray
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("ray is not installed")
    jsonschema = pytest.importorskip("jsonschema")
    schema_path = Path(spec.submodule_search_locations[0]) / "autoscaler" / "ray-schema.json"
    if not schema_path.exists():
        pytest.skip("this Ray has no autoscaler/ray-schema.json")
    schema = json.loads(schema_path.read_text(encoding="utf-8"))
    jsonschema.validate(one_doc(DEPLOY / "ray" / "cluster.yaml"), schema)


# -- KubeRay ---------------------------------------------------------------------------------------

def pod_groups(cluster_spec: dict) -> list[tuple[str, dict, dict]]:
    """(group name, rayStartParams, pod spec) for the head and every worker group."""
    out = [("head", cluster_spec["headGroupSpec"].get("rayStartParams", {}),
            cluster_spec["headGroupSpec"]["template"]["spec"])]
    for g in cluster_spec["workerGroupSpecs"]:
        out.append((g["groupName"], g.get("rayStartParams", {}), g["template"]["spec"]))
    return out


def assert_token_env(container: dict, where: str) -> None:
    env = {e["name"]: e for e in container.get("env", [])}
    assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: RAY_AUTH_MODE is not token"
    ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
    assert ref.get("name") == TOKEN_SECRET and ref.get("key") == TOKEN_KEY, \
        f"{where}: RAY_AUTH_TOKEN does not come from secret {TOKEN_SECRET}/{TOKEN_KEY}"


def check_cluster_spec(spec: dict, where: str) -> None:
    groups = pod_groups(spec)
    head_params = groups[0][1]
    assert head_params["num-cpus"] == "0", "the head must take no ternpool worker"
    assert head_params["dashboard-host"] == "0.0.0.0"
    assert head_params["metrics-export-port"] == "8080"
    pvcs = {d["metadata"]["name"] for d in kube_docs("PersistentVolumeClaim")}
    for name, params, pod in groups:
        w = f"{where} {name}"
        assert all(isinstance(v, str) for v in params.values()), f"{w}: rayStartParams values must be strings"
        ray_containers = [c for c in pod["containers"] if c["name"].startswith("ray-")] or pod["containers"][:1]
        for c in pod["containers"]:
            assert c["image"] == IMAGE, f"{w}: image {c['image']}"
        for c in ray_containers:
            assert_token_env(c, w)
            ports = c.get("ports", [])
            for p in ports:  # Kubernetes port names: IANA_SVC_NAME, at most 15 characters
                assert re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?", p["name"]) and \
                    re.search("[a-z]", p["name"]), f"{w}: invalid port name {p['name']!r}"
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
            for m in mounts.values():
                assert m["name"] in volumes, f"{w}: mount of undeclared volume {m['name']}"
            models = mounts["/models"]
            assert models.get("readOnly") is True, f"{w}: /models is not read-only"
            assert volumes[models["name"]]["persistentVolumeClaim"]["claimName"] == "ternpool-models", w
            for v in volumes.values():
                if "persistentVolumeClaim" in v:
                    assert v["persistentVolumeClaim"]["claimName"] in pvcs, f"{w}: unknown PVC"
            res = c["resources"]
            assert res["requests"] and res["limits"], w
            if name == "head":
                assert {6379, 8265, 10001, 8080, 9469} <= {p["containerPort"] for p in ports}, w
            else:
                assert res["requests"] == res["limits"], f"{w}: requests != limits"
                assert "cpu" in res["requests"] and "memory" in res["requests"], w
    workers = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    cpu = workers["cpu-workers"]
    assert (cpu["replicas"], cpu["minReplicas"], cpu["maxReplicas"]) == (2, 1, 10)


def test_raycluster():
    clusters = kube_docs("RayCluster")
    assert len(clusters) == 1
    rc = clusters[0]
    assert rc["apiVersion"] == "ray.io/v1" and rc["metadata"]["name"] == "ternpool"
    check_cluster_spec(rc["spec"], "RayCluster")


def test_rayjob():
    jobs = kube_docs("RayJob")
    assert len(jobs) == 1
    job = jobs[0]
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"] == "ternpool-batch"
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["ternpool", "submit"]
    pairs = set(zip(argv, argv[1:]))
    assert ("--address", "auto") in pairs and ("--model", MODEL_DIR) in pairs
    assert ("--metrics-host", "0.0.0.0") in pairs
    assert any(a == "--output" for a in argv)
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int)
    check_cluster_spec(spec["rayClusterSpec"], "RayJob")
    assert spec["rayClusterSpec"] == kube_docs("RayCluster")[0]["spec"], \
        "the RayJob's cluster differs from raycluster.yaml"
    submitter = spec["submitterPodTemplate"]["spec"]["containers"]
    assert submitter
    for c in submitter:
        assert c["image"] == IMAGE
        assert_token_env(c, "RayJob submitter")


def test_token_secret_example():
    secrets = [d for d in kube_docs("Secret") if d["metadata"]["name"] == TOKEN_SECRET]
    assert len(secrets) == 1
    s = secrets[0]
    assert s["apiVersion"] == "v1"
    assert TOKEN_KEY in s.get("stringData", {}) or TOKEN_KEY in s.get("data", {})


# -- Dockerfile ------------------------------------------------------------------------------------

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, current = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        word, _, args = current.strip().partition(" ")
        out.append((word.upper(), " ".join(args.split())))
        current = ""
    assert not current, "Dockerfile ends in a continuation"
    return out


def test_dockerfile():
    instructions = dockerfile_instructions((DEPLOY / "Dockerfile").read_text(encoding="utf-8"))
    froms = [a for i, a in instructions if i == "FROM"]
    assert len(froms) == 1 and froms[0].startswith("python:3.11")
    runs = [a for i, a in instructions if i == "RUN"]
    assert any(re.search(r"pip install .*(\s|^)\.(\s|$)", r) for r in runs), "no pip install of the repo"
    env = " ".join(a for i, a in instructions if i == "ENV")
    assert "NUMBA_CACHE_DIR=/tmp/numba-cache" in env
    assert any("9469" in a.split() for i, a in instructions if i == "EXPOSE")
    for i, a in instructions:
        if i in ("CMD", "ENTRYPOINT"):
            assert "ternpool" not in a, f"{i} must not run a job"

    copied = []
    for i, a in instructions:
        if i in ("COPY", "ADD"):
            args = [x for x in a.split() if not x.startswith("--")]
            copied += args[:-1]
    for src in copied:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    needed = {"pyproject.toml", project["project"]["readme"],
              *project["tool"]["setuptools"]["package-dir"].values()}
    assert needed <= {s.rstrip("/") for s in copied}, f"not copied: {needed - {s.rstrip('/') for s in copied}}"

    ignore = DEPLOY / "Dockerfile.dockerignore"
    if ignore.exists():  # every copied path must be re-included after the leading "*"
        kept = {line[1:].strip().rstrip("/") for line in ignore.read_text(encoding="utf-8").splitlines()
                if line.startswith("!")}
        assert {s.rstrip("/") for s in copied} <= kept


def test_promtool_accepts_the_prometheus_config():
    import shutil
    import subprocess

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (it comes with Debian's package 'prometheus', which .ci/run installs)")
    r = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
