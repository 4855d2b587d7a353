"""Live routing and precision in /metrics on refmoe-25m, scraped by a real Prometheus running
every PromQL expression of the Grafana dashboard; the dashboard checked against Grafana's schema."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import DATA
from mxserve.schemes import get_scheme

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "mxserve.json"
STATS_ARGS = ["--stats-interval", "0.2", "--stats-window", "3", "--stats-halflife", "2"]


def scrape(base: str) -> dict[str, dict[tuple, float]]:
    """name -> {sorted label items: value}."""
    out: dict[str, dict[tuple, float]] = {}
    text = httpx.get(base + "/metrics", timeout=30).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def layer_values(m: dict, name: str, layer: int, **labels) -> dict[int, float]:
    """expert -> value of ``name`` in ``layer``, for the given extra labels."""
    out = {}
    for key, v in m.get(name, {}).items():
        d = dict(key)
        if d.get("layer") == str(layer) and all(d.get(k) == val for k, val in labels.items()):
            out[int(d["expert"])] = v
    return out


def prompts(path: Path, n: int, chars: int = 300) -> list[str]:
    text = path.read_text()
    step = len(text) // (n + 1)
    return [text[i * step : i * step + chars] for i in range(n)]


def complete_all(base: str, texts: list[str], max_tokens: int = 6) -> int:
    """Greedy completions, 4 at a time; returns tokens through each MoE layer (prefill + decode)."""

    def one(p: str) -> int:
        r = httpx.post(base + "/v1/completions", timeout=300,
                       json={"model": "refmoe-25m", "prompt": p, "max_tokens": max_tokens, "temperature": 0})
        assert r.status_code == 200, r.text
        u = r.json()["usage"]
        return u["prompt_tokens"] + u["completion_tokens"] - 1  # the last token is sampled, never fed

    with ThreadPoolExecutor(4) as pool:
        return sum(pool.map(one, texts))


def test_metrics_follow_the_routing_and_show_the_served_plan(served_refmoe):
    base = served_refmoe
    m0 = scrape(base)
    t_s = complete_all(base, prompts(DATA / "shakespeare-dev.txt", 8))
    time.sleep(0.6)  # a few folds
    m1 = scrape(base)
    counts = lambda m: layer_values(m, "mxserve_expert_routed_tokens_total", 0)  # noqa: E731
    shake = {e: counts(m1)[e] - counts(m0).get(e, 0) for e in counts(m1)}
    # every token went through layer 0 and took top-2 routed experts
    tokens = lambda m: m["mxserve_layer_tokens_total"][(("layer", "0"),)]  # noqa: E731
    assert tokens(m1) - tokens(m0) == t_s
    assert sum(shake.values()) == 2 * t_s
    time.sleep(3.5)  # the sliding window (3 s) now holds only Shakespeare
    share_s = layer_values(scrape(base), "mxserve_expert_load_share", 0, window="sliding")
    assert abs(sum(share_s.values()) - 1) < 1e-6

    t_p = complete_all(base, prompts(DATA / "python-dev.txt", 8))
    time.sleep(3.5)  # the window now holds only Python
    m2 = scrape(base)
    py = {e: counts(m2)[e] - counts(m1)[e] for e in counts(m2)}
    assert sum(py.values()) == 2 * t_p
    share_p = layer_values(m2, "mxserve_expert_load_share", 0, window="sliding")
    # the window holds Python traffic only, and the experts Shakespeare used most lose share to it
    assert all(share_p[e] == 0 for e in py if py[e] == 0)
    assert py[max(share_p, key=share_p.get)] > 0 and abs(sum(share_p.values()) - 1) < 1e-6
    top_s = sorted(shake, key=shake.get, reverse=True)[:2]
    assert sum(share_p[e] for e in top_s) < sum(share_s[e] for e in top_s) - 0.1, (share_s, share_p)
    ewma = layer_values(m2, "mxserve_expert_load_share", 0, window="ewma")
    assert sum(ewma[e] for e in top_s) < sum(share_s[e] for e in top_s)
    hist = m2["mxserve_forward_tokens_count"][()]
    assert hist >= 16  # every request's prefill and decode steps, in at most one forward each

    # the precision series are the served plan, block by block
    plan = httpx.get(base + "/mxserve/plan", timeout=30).json()
    in_use = {(k, v) for k, v in m2["mxserve_expert_block_scheme"].items() if v == 1}
    expected = set()
    for lay in plan["layers"]:
        for ep in lay["experts"]:
            for block, scheme in (("gate_up", ep["gate"]), ("down", ep["down"])):
                labels = (("block", block), ("expert", str(ep["expert"])), ("layer", str(lay["layer"])))
                expected.add((tuple(sorted(labels + (("scheme", scheme),))), 1.0))
                k = get_scheme(scheme).bits_per_weight(REFMOE_K[block])
                assert m2["mxserve_expert_block_bits"][labels] == pytest.approx(k)
    assert in_use == expected
    assert m2["mxserve_plan_avg_bits"][()] == pytest.approx(plan["summary"]["avg_bits"], abs=1e-6)
    stats = httpx.get(base + "/mxserve/stats", timeout=30).json()
    assert stats["precision"]["plan_id"] in {dict(k)["plan_id"] for k, v in m2["mxserve_plan_info"].items() if v == 1}


REFMOE_K = {"gate_up": 256, "down": 256}  # refmoe-25m: hidden 256, expert width 256


def test_stats_command_prints_load_and_precision(served_refmoe, capsys, tmp_path):
    from mxserve.cli import main
    from mxserve.served_stats import parse_metrics

    # traffic, then a fold: the live decode read is exported
    httpx.post(served_refmoe + "/v1/completions", json={"model": "refmoe-25m", "prompt": "To be", "max_tokens": 4},
               timeout=60).raise_for_status()  # fmt: skip
    deadline = time.time() + 20
    while "sliding" not in parse_metrics(httpx.get(served_refmoe + "/metrics", timeout=30).text).decode_bytes:
        assert time.time() < deadline, "no mxserve_decode_bytes_per_token after traffic"
        time.sleep(0.5)
    png = tmp_path / "served.png"
    assert main(["stats", "--url", served_refmoe, "--plot", str(png)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "MB of expert weights (sliding)" in out[0]
    rows = [ln.split() for ln in out if ln.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == [str(i) for i in range(6)]  # one row per MoE layer
    plan = httpx.get(served_refmoe + "/mxserve/plan", timeout=30).json()
    legend = next(ln for ln in out if ln.startswith("schemes: "))
    for scheme in plan["summary"]["schemes"]:
        assert f"= {scheme}" in legend
    assert_png(png)


def assert_png(path: Path) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 800 and im.size[1] > 300
        assert len(im.convert("RGB").getcolors(1 << 20)) > 8  # a picture, not a blank canvas


def test_plan_plot_writes_a_png(tmp_path):
    from test_planner import synthetic_profile

    from mxserve.cli import main

    calib_profile_path = tmp_path / "profile.json"
    synthetic_profile().save(str(calib_profile_path))
    png = tmp_path / "plan.png"
    assert main(["plan", "--profile", str(calib_profile_path), "--budget", "3.25bit", "--out",
                 str(tmp_path / "plan.json"), "--plot", str(png)]) == 0
    assert_png(png)


def test_stats_command_errors_clearly(capsys):
    from mxserve.cli import main

    assert main(["stats", "--url", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mxserve: error:") and err.count("\n") == 1


# -- Prometheus ---------------------------------------------------------------------------


def _prometheus() -> str:
    """Debian's prometheus binary, installed with apt-get when missing and possible."""
    path = shutil.which("prometheus") or ("/usr/bin/prometheus" if os.path.exists("/usr/bin/prometheus") else None)
    if path:
        return path
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("needs Debian's prometheus package: not installed, and apt-get is not available as root here")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "prometheus"]
    if subprocess.run(cmd, env=env, capture_output=True, timeout=900).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            pytest.skip(f"apt-get could not install prometheus: {r.stderr.strip().splitlines()[-1:]}")
    return shutil.which("prometheus") or "/usr/bin/prometheus"


@pytest.fixture(scope="module")
def prometheus(served_refmoe, tmp_path_factory):
    from conftest import free_port

    binary = _prometheus()
    work = tmp_path_factory.mktemp("prometheus")
    target = served_refmoe.removeprefix("http://")
    (work / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: mxserve\n    static_configs:\n      - targets: ['{target}']\n"
    )
    port = free_port()
    log = open(work / "log.txt", "w")
    proc = subprocess.Popen([binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'db'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(base + "/-/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            pytest.fail(f"prometheus exited: {(work / 'log.txt').read_text()}")
        time.sleep(0.3)
    yield base
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def _stream(base: str, i: int) -> tuple[int, bool]:
    body = {"model": "refmoe-25m", "max_tokens": 12, "temperature": 0.7, "seed": i, "stream": True}
    if i % 2:
        url, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": f"Speak, sweet {i}."}]
    else:
        url, body["prompt"] = "/v1/completions", f"def f{i}(x):\n    return"
    with httpx.stream("POST", base + url, json=body, timeout=300) as r:
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
        return r.status_code, bool(lines) and lines[-1] == "data: [DONE]"


def dashboard_queries() -> list[str]:
    d = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    return [e.replace("$layer", ".*") for e in exprs]  # what Grafana sends for "All"


def test_prometheus_runs_every_dashboard_query_under_load(served_refmoe, prometheus):
    # 32 concurrent streams while Prometheus scrapes every second: no failure
    before = time.time()
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda i: _stream(served_refmoe, i), range(32)))
    assert results == [(200, True)] * 32
    time.sleep(max(0.0, 5 - (time.time() - before)) + 3)  # enough scrapes for rate() windows
    up = httpx.get(prometheus + "/api/v1/query", params={"query": 'up{job="mxserve"}'}).json()
    assert [r["value"][1] for r in up["data"]["result"]] == ["1"]
    queries = dashboard_queries()
    assert len(queries) >= 15
    empty = []
    for expr in queries:
        r = httpx.get(prometheus + "/api/v1/query", params={"query": expr}, timeout=30).json()
        assert r["status"] == "success", (expr, r)
        if not r["data"]["result"]:
            empty.append(expr)
    assert not empty, f"dashboard queries without data: {empty}"
    # the layer variable's query (label_values) through the same API
    layers = httpx.get(prometheus + "/api/v1/label/layer/values",
                       params={"match[]": "mxserve_expert_load_share"}).json()["data"]
    assert sorted(layers, key=int) == [str(i) for i in range(6)]
    # scrapes during the load were answered: no failed scrape in the window
    missed = 'count_over_time(up{job="mxserve"}[1m]) - sum_over_time(up{job="mxserve"}[1m])'
    failed = httpx.get(prometheus + "/api/v1/query", params={"query": missed})
    assert failed.json()["data"]["result"][0]["value"][1] == "0"


# -- the dashboard against Grafana's schema ------------------------------------------------


def test_dashboard_is_built_by_grafana_sdk_and_round_trips():
    pytest.importorskip("grafana_foundation_sdk")
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    sys.path.insert(0, str(ROOT / "deploy" / "grafana"))
    import build_dashboard

    committed = DASHBOARD.read_text()
    assert build_dashboard.render() == committed, "run python deploy/grafana/build_dashboard.py"
    data = json.loads(committed)
    again = json.loads(json.dumps(Dashboard.from_json(data), cls=JSONEncoder, sort_keys=True))
    assert again == data  # every field is one the schema knows, with the type it declares
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids))
    assert {p["type"] for p in data["panels"]} >= {"heatmap", "table", "timeseries", "row"}


def test_deploy_files_fit_together():
    import yaml

    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    assert set(compose["services"]) == {"mxserve", "prometheus", "grafana"}
    for svc in compose["services"].values():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("./"):
                assert (ROOT / "deploy" / src).exists(), src
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:")  # published on the host's loopback only
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == ["mxserve:8000"]
    ds = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    d = json.loads(DASHBOARD.read_text())
    uids = {t["datasource"]["uid"] for p in d["panels"] for t in p.get("targets", [])}
    assert uids == {uid}
