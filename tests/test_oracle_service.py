"""The similarity oracle, started for real: `fl-sim oracle serve` in a subprocess on
127.0.0.1 (a free port), spoken to over HTTP, stopped by the test.

What must hold: keys and roles are enforced; enrolled ORL identities score their own held-out
images above other people's (AUC); every bad request gets its 4xx and the service keeps
answering; usage counts exactly the images scored and a rejected request costs nothing;
an enrollment acknowledged with 201 survives a SIGKILL, and none is left half-written.
"""
from __future__ import annotations

import base64
import os
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from oracle_process import OracleProcess, array_payload, assert_error, client, new_key, png
from server.oracle.store import Store

pytestmark = pytest.mark.timeout(300)

MAX_BATCH = 16
MAX_BODY = 4 * 1024 * 1024
RATE = 20.0


# ---------------------------------------------------------------------------------------
# the service, for real


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("oracle")
    server = OracleProcess(folder, max_batch=MAX_BATCH, max_body_bytes=MAX_BODY, max_pixels=1_000_000,
                           rate_per_second=RATE, query_budget=None, threads=2)
    Store(server.db)  # create it so keys can be made before the server starts
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def orl() -> tuple[np.ndarray, np.ndarray]:
    """ORL at 112 px as (400, 112, 112, 3) uint8 (grey replicated to RGB) and person ids."""
    import torch

    from fl_sim.data import DataSpec, load_dataset

    ds = load_dataset(DataSpec(name="orl", image_size=112))
    images = (ds.images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return np.ascontiguousarray(images), ds.identities.numpy()


@pytest.fixture(scope="module")
def enrolled(oracle, orl) -> str:
    """Identity 'orl-s1' enrolled from ORL person 0's first four images; the admin key."""
    admin = new_key(oracle, "admin")
    images, ids = orl
    with client(oracle, admin) as c:
        r = c.post("/v1/identities", json={"id": "orl-s1", "images": [png(x) for x in images[ids == 0][:4]]})
        assert r.status_code == 201, r.text
        assert r.json() == {"id": "orl-s1", "images": 4}
    return admin


# ---------------------------------------------------------------------------------------
# auth, roles, identities


def test_health_and_openapi(oracle):
    r = httpx.get(f"{oracle.url}/v1/health")
    assert r.status_code == 200
    assert r.json()["status"] == "ok" and r.json()["backend"] == "sface-bf16"
    assert isinstance(r.json()["identities"], int)
    spec = httpx.get(f"{oracle.url}/openapi.json").json()
    assert "/v1/identities/{identity}/similarity" in spec["paths"]


def test_keys_and_roles(oracle, enrolled, orl):
    query = new_key(oracle, "query")
    body = {"id": "someone", "images": [png(orl[0][0])]}
    with client(oracle) as anonymous:
        assert_error(anonymous.post("/v1/identities", json=body), 401, "unauthorized")
        assert_error(anonymous.get("/v1/usage"), 401, "unauthorized")
    with client(oracle, "orc_not-a-key") as wrong:
        assert_error(wrong.post("/v1/identities", json=body), 401, "unauthorized")
        assert_error(wrong.post("/v1/identities/orl-s1/similarity", json={"images": [png(orl[0][0])]}), 401)
    with client(oracle, query) as q:
        assert_error(q.post("/v1/identities", json=body), 403, "forbidden")
        assert_error(q.get("/v1/identities"), 403, "forbidden")
        assert_error(q.delete("/v1/identities/orl-s1"), 403, "forbidden")
        assert q.get("/v1/usage").json()["role"] == "query"
    with client(oracle, enrolled) as admin:
        listed = admin.get("/v1/identities").json()["identities"]
    assert "someone" not in {i["id"] for i in listed}
    [s1] = [i for i in listed if i["id"] == "orl-s1"]
    assert set(s1) == {"id", "images", "created"} and s1["images"] == 4  # never the template
    # only hashes of keys are stored
    raw = oracle.db.read_bytes() + (oracle.db.with_name(oracle.db.name + "-wal").read_bytes()
                                    if oracle.db.with_name(oracle.db.name + "-wal").exists() else b"")
    assert query.encode() not in raw


def test_enroll_conflict_and_delete(oracle, enrolled, orl):
    images = orl[0][orl[1] == 3][:2]
    with client(oracle, enrolled) as admin:
        assert admin.post("/v1/identities", json={"id": "temp-1", "images": [png(x) for x in images]}).status_code == 201
        assert_error(admin.post("/v1/identities", json={"id": "temp-1", "images": [png(images[0])]}), 409)
        assert_error(admin.post("/v1/identities", json={"id": "bad id!", "images": [png(images[0])]}), 422)
        assert admin.delete("/v1/identities/temp-1").status_code == 204
        assert_error(admin.delete("/v1/identities/temp-1"), 404, "unknown_identity")
        assert "temp-1" not in {i["id"] for i in admin.get("/v1/identities").json()["identities"]}


def test_cli_creates_a_working_key(oracle, capsys):
    from fl_sim.cli import main

    assert main(["oracle", "keys", "create", "--role", "query", "--db", str(oracle.db)]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    with client(oracle, key) as q:
        assert q.get("/v1/usage").json()["role"] == "query"


# ---------------------------------------------------------------------------------------
# scores mean something: ORL


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve by ranks (Mann-Whitney U / (n+ n-)), ties counted half."""
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([positive, negative]))
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_orl_identities_score_their_own_held_out_faces_higher(oracle, enrolled, orl):
    images, ids = orl
    people = [4, 9, 14, 19, 24, 29, 34, 39]  # ORL s5, s10, ... s40
    enroll_n, held_n = 4, 5
    with client(oracle, enrolled) as admin:
        for p in people:
            own = images[ids == p]
            r = admin.post("/v1/identities", json={"id": f"t-s{p + 1}", "images": [png(x) for x in own[:enroll_n]]})
            assert r.status_code == 201, r.text
    held = np.concatenate([images[ids == p][enroll_n:enroll_n + held_n] for p in people])
    held_ids = np.repeat(people, held_n)
    query = new_key(oracle, "query")
    pos, neg = [], []
    with client(oracle, query) as q:
        for p in people:
            scores = []
            for start in range(0, len(held), MAX_BATCH):
                r = q.post(f"/v1/identities/t-s{p + 1}/similarity", json=array_payload(held[start:start + MAX_BATCH]))
                assert r.status_code == 200, r.text
                scores += r.json()["scores"]
            scores = np.array(scores)
            pos += list(scores[held_ids == p])
            neg += list(scores[held_ids != p])
        # the same image as PNG and as a raw array scores the same (PNG is lossless)
        a = q.post(f"/v1/identities/t-s{people[0] + 1}/similarity", json={"images": [png(held[0])]}).json()
        b = q.post(f"/v1/identities/t-s{people[0] + 1}/similarity", json=array_payload(held[:1])).json()
        assert a["scores"][0] == pytest.approx(b["scores"][0], abs=1e-5)
    pos, neg = np.array(pos), np.array(neg)
    value = auc(pos, neg)
    print(f"ORL via the oracle: AUC {value:.4f}, same person {pos.mean():.3f}, different {neg.mean():.3f}")
    # Measured here (SFace, 8 people, 4 enrolled + 5 held-out images each, 40 same-person and
    # 280 different-person scores): AUC 0.9999, same-person mean 0.733, different 0.119 (a gap
    # of 0.61). The bounds leave room for another onnxruntime build; a broken template, a
    # scrambled image layout or scores against the wrong identity fall to AUC ~0.5, gap ~0.
    assert value > 0.97
    assert pos.mean() - neg.mean() > 0.4


def test_service_and_in_process_oracle_agree(oracle, enrolled, orl):
    """attacks.oracle.InProcessOracle is the service's scoring path without HTTP: same scores
    for the same enrollment, at the backend's size and for smaller images (resized alike)."""
    import torch

    from attacks.oracle import InProcessOracle

    images, ids = orl
    to_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float() / 255  # noqa: E731
    local = InProcessOracle(to_tensor(images[ids == 0][:4]), backend="sface-bf16")
    probe = images[[0, 5, 17, 200]]
    small = np.stack([np.asarray(Image.fromarray(x).resize((64, 64), Image.Resampling.BILINEAR)) for x in probe])
    with client(oracle, new_key(oracle, "query")) as q:
        for batch in (probe, small):
            by_array = q.post("/v1/identities/orl-s1/similarity", json=array_payload(batch)).json()["scores"]
            by_png = q.post("/v1/identities/orl-s1/similarity", json={"images": [png(x) for x in batch]}).json()
            np.testing.assert_allclose(by_array, by_png["scores"], atol=1e-5)
            np.testing.assert_allclose(by_array, local.score(to_tensor(batch)), atol=1e-4)


def test_http_client_batches_retries_and_counts_as_the_service_does(oracle, enrolled, orl):
    """attacks.oracle.HttpOracle: a batch over the service's limit is split, a 429 for the
    rate is retried (after Retry-After), and the client's query count equals the service's
    usage counter; a spent budget is BudgetExhausted, with nothing counted."""
    import torch

    from attacks.oracle import BudgetExhausted, HttpOracle, InProcessOracle, SimilarityOracle

    images, ids = orl
    to_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float() / 255  # noqa: E731
    probe = to_tensor(images[:35])  # more than MAX_BATCH: three requests
    local = InProcessOracle(to_tensor(images[ids == 0][:4]), backend="sface-bf16")
    key = new_key(oracle, "query")
    with HttpOracle(oracle.url, key, "orl-s1", max_batch=MAX_BATCH) as remote:
        assert isinstance(remote, SimilarityOracle)
        np.testing.assert_allclose(remote.score(probe), local.score(probe), atol=1e-4)
        with client(oracle, key) as q:
            # spend the key's rate: the client's next request is answered 429 and retried
            spent = [q.get("/v1/usage").status_code for _ in range(int(RATE) * 2)]
            assert 429 in spent
            assert len(remote.score(probe[:1])) == 1
            usage = q.get("/v1/usage")
            while usage.status_code == 429:
                time.sleep(float(usage.headers["Retry-After"]))
                usage = q.get("/v1/usage")
        assert remote.queries == 36 and usage.json()["queries"] == remote.queries

    with HttpOracle(oracle.url, new_key(oracle, "query", budget=3), "orl-s1") as remote:
        remote.score(probe[:2])
        with pytest.raises(BudgetExhausted):
            remote.score(probe[:2])
        assert remote.queries == 2 and remote.budget_left == 1


# ---------------------------------------------------------------------------------------
# bad input


def test_bad_requests_get_their_4xx_and_the_service_keeps_answering(oracle, enrolled, orl):
    key = new_key(oracle, "query")
    good = orl[0][:1]
    truncated = base64.b64decode(png(good[0]))[:200]
    huge = base64.b64encode(os.urandom(20 * 1024 * 1024)).decode()  # a "20 MB image"
    big_pixels = png(np.zeros((1000, 1200, 3), np.uint8))  # over max_pixels = 1e6
    url = "/v1/identities/orl-s1/similarity"
    cases = [
        ("empty body", dict(content=b"", headers={"Content-Type": "application/json"}), 422, None),
        ("not JSON", dict(content=b"{not json", headers={"Content-Type": "application/json"}), 422, None),
        ("not JSON, no type", dict(content=b"hello"), 422, None),
        ("JSON, wrong schema", dict(json={"pictures": []}), 422, None),
        ("both images and array", dict(json={"images": [png(good[0])], **array_payload(good)}), 422, None),
        ("truncated PNG", dict(json={"images": [base64.b64encode(truncated).decode()]}), 415, "undecodable_image"),
        ("not base64", dict(json={"images": ["%%%"]}), 415, "undecodable_image"),
        ("text as an image", dict(json={"images": [base64.b64encode(b"GIF89a nope").decode()]}), 415, None),
        ("20 MB image", dict(json={"images": [huge]}), 413, "body_too_large"),
        ("too many pixels", dict(json={"images": [big_pixels]}), 413, "image_too_large"),
        ("batch over max_batch", dict(json={"images": [png(good[0])] * (MAX_BATCH + 1)}), 413, "batch_too_large"),
        ("array over max_batch", dict(json=array_payload(np.zeros((MAX_BATCH + 1, 112, 112, 3), np.uint8))), 413, None),
        ("wrong dtype", dict(json=array_payload(good.astype(np.float32), dtype="float32")), 422, "bad_dtype"),
        ("no batch axis", dict(json=array_payload(good[0])), 422, "bad_shape"),
        ("four channels", dict(json=array_payload(np.zeros((1, 112, 112, 4), np.uint8))), 422, "bad_shape"),
        ("channels first", dict(json=array_payload(good.transpose(0, 3, 1, 2))), 422, "bad_shape"),
        ("array too large", dict(json=array_payload(np.zeros((1, 1000, 1001, 3), np.uint8))), 413, None),
        ("short data", dict(json=array_payload(good[:, :100], shape=[1, 112, 112, 3])), 422, "bad_array"),
    ]
    with client(oracle, key) as q:
        for what, request, status, error in cases:
            r = q.post(url, **request)
            assert r.status_code == status, f"{what}: {r.status_code} {r.text[:300]}"
            assert_error(r, status, error)
            assert httpx.get(f"{oracle.url}/v1/health", timeout=10).status_code == 200, what
        assert_error(q.post("/v1/identities/nobody/similarity", json=array_payload(good)), 404, "unknown_identity")
        assert_error(q.get("/v1/no-such-route"), 404)
        rejected = len(cases) + 2
        # nothing rejected cost budget; the service still scores
        usage = q.get("/v1/usage").json()
        assert usage["queries"] == 0 and usage["rejected"] == rejected
        ok = q.post(url, json=array_payload(good))
        assert ok.status_code == 200 and len(ok.json()["scores"]) == 1 and ok.json()["queries_used"] == 1


# ---------------------------------------------------------------------------------------
# usage, budget, rate


def test_usage_counts_the_images_scored(oracle, enrolled, orl):
    key = new_key(oracle, "query")
    images = orl[0][:7]
    with client(oracle, key) as q:
        used = 0
        for batch in (images[:1], images[1:4], images[4:7]):
            r = q.post("/v1/identities/orl-s1/similarity", json=array_payload(batch)).json()
            used += len(batch)
            assert len(r["scores"]) == len(batch) and r["queries_used"] == used and r["budget_left"] is None
        r = q.post("/v1/identities/orl-s1/similarity", json={"images": [png(x) for x in images[:2]]}).json()
        used += 2
        assert r["queries_used"] == used
        usage = q.get("/v1/usage").json()
    assert usage["queries"] == used == 9
    assert usage["requests"] == 5 and usage["rejected"] == 0 and usage["budget_left"] is None
    rows = [r for r in Store(oracle.db).audit_rows() if r[1] == usage["key_id"]]
    assert len(rows) == 5 and sum(r[4] for r in rows if r[2].endswith("/similarity")) == 9


def test_query_budget_is_enforced_and_rejections_cost_nothing(oracle, enrolled, orl):
    key = new_key(oracle, "query", budget=5)
    images = orl[0][:3]
    url = "/v1/identities/orl-s1/similarity"
    with client(oracle, key) as q:
        r = q.post(url, json=array_payload(images)).json()
        assert r["queries_used"] == 3 and r["budget_left"] == 2
        over = q.post(url, json=array_payload(images))
        assert_error(over, 429, "budget_exhausted")
        assert int(over.headers["Retry-After"]) >= 1
        assert q.get("/v1/usage").json()["queries"] == 3
        r = q.post(url, json=array_payload(images[:2])).json()
        assert r["queries_used"] == 5 and r["budget_left"] == 0
        assert_error(q.post(url, json=array_payload(images[:1])), 429, "budget_exhausted")
        assert q.get("/v1/usage").json()["budget_left"] == 0


def test_rate_limit_answers_429_with_retry_after(oracle):
    key = new_key(oracle, "query")
    with client(oracle, key) as q:
        answers = [q.get("/v1/usage") for _ in range(int(RATE) * 3)]
        limited = [r for r in answers if r.status_code == 429]
        assert limited, "no request was rate limited"
        assert all(r.status_code in (200, 429) for r in answers)
        assert_error(limited[0], 429, "rate_limited")
        assert int(limited[0].headers["Retry-After"]) >= 1
        time.sleep(1.1)
        assert q.get("/v1/usage").status_code == 200  # the bucket refills
    assert httpx.get(f"{oracle.url}/v1/health").status_code == 200


def test_token_bucket():
    from server.oracle.ratelimit import TokenBuckets

    now = [0.0]
    buckets = TokenBuckets(2.0, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(2)] == [0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)
    assert buckets.take("b") == 0.0  # per key
    now[0] += 0.5
    assert buckets.take("a") == 0.0


# ---------------------------------------------------------------------------------------
# a deployment with its defenses switched on


def perturbation_stream(base: np.ndarray, n: int, std: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = base[None].astype(np.float32) / 255 + rng.normal(0, std, (n,) + base.shape)
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def defended(tmp_path_factory, orl):
    """A second service: rounding, hashed noise, the detector (block), an identity budget, the face gate."""
    folder = tmp_path_factory.mktemp("defended")
    server = OracleProcess(folder, max_batch=MAX_BATCH, rate_per_second=1000.0, threads=2, defenses={
        "noise": {"std": 0.02, "mode": "hashed"}, "rounding": {"decimals": 2},
        "detector": {"k": 10, "threshold": 1.5, "action": "block"}, "identity_budget": 40,
        "face_gate": {"min_score": 0.6}})
    admin = Store(server.db).create_key("admin")[1]
    server.start()
    images, ids = orl
    with client(server, admin) as c:
        for person in (0, 1):
            r = c.post("/v1/identities", json={"id": f"p{person}", "images": [png(x) for x in images[ids == person][:4]]})
            assert r.status_code == 201, r.text
    yield server, admin
    server.stop()


def test_defended_service_noises_rounds_budgets_and_blocks(defended, orl):
    from attacks.oracle import HttpOracle, KeyBlocked

    server, admin = defended
    images, ids = orl
    url = "/v1/identities/p0/similarity"
    probe = images[ids == 0][4:8]
    with client(server, new_key(server, "query")) as q:
        first = q.post(url, json=array_payload(probe)).json()
        again = q.post(url, json=array_payload(probe)).json()
        assert first["scores"] == again["scores"] and first["output"] == "similarity"
        assert all(abs(s * 100 - round(s * 100)) < 1e-6 for s in first["scores"])  # 2 decimals
        noise = np.random.default_rng(0).integers(0, 256, (1, 112, 112, 3), dtype=np.uint8)
        assert_error(q.post(url, json=array_payload(noise)), 422, "no_face")
        assert q.get("/v1/usage").json()["queries"] == 8  # the refused image cost nothing
    # the identity budget (40 images) holds across keys: 8 used above, 32 fit, then 429
    with client(server, new_key(server, "query")) as other:
        strangers = images[ids >= 2]
        assert other.post(url, json=array_payload(strangers[:16])).status_code == 200
        assert other.post(url, json=array_payload(strangers[16:32])).status_code == 200
        assert_error(other.post(url, json=array_payload(strangers[32:33])), 429, "identity_budget_exhausted")
        assert other.post("/v1/identities/p1/similarity", json=array_payload(images[ids == 4][:1])).status_code == 200

    # a search's queries crowd together: the detector blocks the key, and nothing refused is counted
    key = new_key(server, "query")
    stream = perturbation_stream(images[ids == 1][5], 32, std=0.05)
    with HttpOracle(server.url, key, "p1", max_batch=8) as attacker:
        attacker.score(torch_images(stream[:8]))  # fewer than k earlier queries: no verdict yet
        with pytest.raises(KeyBlocked):
            attacker.score(torch_images(stream[8:16]))
        with pytest.raises(KeyBlocked):  # blocked for good, whatever it sends next
            attacker.score(torch_images(images[ids == 5][:2]))
        assert attacker.queries == 8
    with client(server, key) as q:
        usage = q.get("/v1/usage").json()
    assert usage["queries"] == 8 and usage["rejected"] == 2
    with client(server, admin) as c:
        stats = c.get("/v1/stats").json()
    assert set(stats["defenses"]) == {"noise", "rounding", "detector", "identity_budget", "face_gate"}
    assert stats["rejections"] == {"key_blocked": 2, "identity_budget_exhausted": 1, "no_face": 1}
    [flag] = stats["flags"]
    assert flag["blocked"] and flag["queries"] == 16 and flag["distance"] < 1.5
    logged = [r for r in Store(server.db).audit_rows() if r[5] == 403]
    assert len(logged) == 2 and {r[6] for r in logged} == {"key_blocked"}


def torch_images(crops: np.ndarray):
    import torch

    return torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255


# ---------------------------------------------------------------------------------------
# durability


def test_acknowledged_enrollments_survive_sigkill(tmp_path, orl):
    server = OracleProcess(tmp_path, rate_per_second=1000, threads=2)
    admin = Store(server.db).create_key("admin")[1]
    server.start()
    faces = [png(x) for x in orl[0][::40][:10]]
    acked: set[str] = set()
    attempted: set[str] = set()
    lock = threading.Lock()
    stop = threading.Event()

    def stream(worker: int) -> None:
        with client(server, admin) as c:
            for i in range(10_000):
                if stop.is_set():
                    return
                ident = f"d{worker}-{i:04d}"
                with lock:
                    attempted.add(ident)
                try:
                    r = c.post("/v1/identities", json={"id": ident, "images": faces[i % 5: i % 5 + 2]}, timeout=30)
                except httpx.TransportError:
                    return  # the server is gone
                assert r.status_code == 201, r.text
                with lock:
                    acked.add(ident)

    threads = [threading.Thread(target=stream, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acked) < 12 and time.monotonic() < deadline:
        time.sleep(0.02)
    server.kill()  # mid-stream: requests are in flight
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert len(acked) >= 12, "enrollments were too slow to test durability"

    server.start()
    try:
        with client(server, admin) as c:
            listed = {i["id"]: i["images"] for i in c.get("/v1/identities").json()["identities"]}
            assert acked <= set(listed), f"acknowledged but lost: {sorted(acked - set(listed))}"
            assert set(listed) <= attempted
            assert all(n == 2 for n in listed.values())
            assert c.get("/v1/health").json()["identities"] == len(listed)
            # every identity present is whole: its template scores its own face highly
            some = sorted(listed)[-1]
            i = int(some.split("-")[1])
            r = c.post(f"/v1/identities/{some}/similarity", json={"images": [faces[i % 5]]})
            assert r.status_code == 200 and r.json()["scores"][0] > 0.5
    finally:
        server.stop()
    store = Store(server.db)
    assert store._db().execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    for ident in listed:
        t = store.template(ident)
        assert t is not None and t.shape == (128,) and abs(float(np.linalg.norm(t)) - 1) < 1e-4


# ---------------------------------------------------------------------------------------
# settings and the offline CLI


def test_settings_errors_are_one_line_naming_the_key(tmp_path):
    from server.oracle.settings import OracleSettingsError, load_settings

    bad = tmp_path / "bad.yaml"
    bad.write_text("max_bach: 3\n")
    with pytest.raises(OracleSettingsError, match="unknown key 'oracle.max_bach'; allowed keys: host, port"):
        load_settings(bad)
    bad.write_text("backend: nope\n")
    with pytest.raises(OracleSettingsError, match=r"oracle.backend: unknown .* 'nope'; allowed: .*sface"):
        load_settings(bad)
    bad.write_text("rate_per_second: 0\n")
    with pytest.raises(OracleSettingsError, match="oracle.rate_per_second"):
        load_settings(bad)
    s = load_settings(None, port=9000)
    assert (s.host, s.port, s.backend, s.query_budget) == ("127.0.0.1", 9000, "sface-bf16", None)


def test_cli_enrolls_files_and_folders_offline(tmp_path, orl, capsys):
    from fl_sim.cli import main

    images, ids = orl
    for p in (0, 1):
        (tmp_path / "faces" / f"p{p}").mkdir(parents=True)
        for k, x in enumerate(images[ids == p][:2]):
            Image.fromarray(x).save(tmp_path / "faces" / f"p{p}" / f"{k}.png")
    db = str(tmp_path / "o.sqlite")
    files = [str(f) for f in sorted((tmp_path / "faces" / "p0").glob("*.png"))]
    assert main(["oracle", "enroll", "--db", db, "--images", *files, "--id", "alice"]) == 0
    assert main(["oracle", "enroll", "--db", db, "--images", *files, "--id", "alice"]) == 2  # exists
    assert main(["oracle", "enroll", "--db", db, "--folder", str(tmp_path / "faces")]) == 0
    assert main(["oracle", "enroll", "--db", db, "--images", *files]) == 2  # --id missing
    store = Store(db)
    assert {(r.id, r.images) for r in store.identities()} == {("alice", 2), ("p0", 2), ("p1", 2)}
    assert float(store.template("alice") @ store.template("p0")) == pytest.approx(1.0, abs=1e-5)
    assert float(store.template("p0") @ store.template("p1")) < 0.5


def test_schema_driven_fuzzing_finds_no_server_error(tmp_path):
    """schemathesis generates requests from /openapi.json (coverage, fuzzing and stateful
    phases, a few hundred cases with an admin key and one identity enrolled): not one 5xx.
    The seed is fixed so every machine runs the same cases."""
    server = OracleProcess(tmp_path, max_batch=MAX_BATCH, max_body_bytes=MAX_BODY, max_pixels=1_000_000,
                           rate_per_second=1e6, query_budget=None, threads=2)
    admin = Store(server.db).create_key("admin")[1]
    server.start()
    try:
        with client(server, admin) as c:
            image = np.zeros((112, 112, 3), np.uint8)
            assert c.post("/v1/identities", json={"id": "fuzz", "images": [png(image)]}).status_code == 201
        done = subprocess.run([sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json",
                               "--checks", "not_a_server_error", "--header", f"Authorization: Bearer {admin}",
                               "--max-examples", "25", "--seed", "1", "--no-color"],
                              capture_output=True, text=True, timeout=600, cwd=tmp_path)  # its cache goes there
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
        assert "passed" in done.stdout
    finally:
        server.stop()
    assert "Traceback" not in server.log.read_text()
