"""The rating server's JSON API, its auth and safety rules, and durability under SIGKILL."""

import http.client
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ouroboros_jax.rate import RatingAPIError, RatingClient, RatingServer, RatingStore, run_rater
from ouroboros_jax.rate.server import CONTENT_SECURITY_POLICY, TOKEN_ENV

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path):
    return RatingStore.in_run_dir(tmp_path)


@pytest.fixture
def server(store):
    with RatingServer(store, port=0, quiet=True) as running:
        yield running


def call(server, method, path, body=None, headers=None, auth=True, raw=None):
    """(status, headers, decoded JSON or bytes) of one request; `auth` sends the bearer token."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    sent = dict(headers or {})
    if auth and server.token is not None:
        sent.setdefault("Authorization", f"Bearer {server.token}")
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
        sent.setdefault("Content-Type", "application/json")
    conn.request(method, path, body=data, headers=sent)
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    if response.getheader("Content-Type", "").startswith("application/json") and payload:
        payload = json.loads(payload)
    return response.status, response.headers, payload


# ---------------------------------------------------------------------------
# The API through the Python client


def test_client_round_trip(server, store):
    pairwise = store.enqueue("p", ["a", "b"], priority=1.0, step=3, metadata={"gold": 0})
    pointwise = store.enqueue("q", ["x"], mode="pointwise", score_range=(0, 4))
    client = RatingClient(server.url, server.token)
    item = client.next_item("ann")
    assert (item.id, item.completions, item.step, item.metadata) == (pairwise, ("a", "b"), 3, {"gold": 0})
    assert item == store.get_item(pairwise)
    rating = client.rate(pairwise, "ann", choice=1, order=[1, 0])
    assert (rating["item_id"], rating["choice"], rating["order"]) == (pairwise, 1, [1, 0])
    assert client.next_item("ann").id == pointwise
    client.rate(pointwise, "ann", scores=[4])
    assert client.next_item("ann") is None
    assert client.counts("ann") == {"items": 2, "open": 0, "ratings": 2, "skipped": 0, "raters": 1,
                                    "waiting": 0, "rated_by_rater": 2}
    assert client.get_item(pointwise).n_ratings == 1
    stored = store.ratings()
    assert [(r.item_id, r.rater, r.choice, r.scores) for r in stored] == [
        (pairwise, "ann", 1, None), (pointwise, "ann", None, (4.0,))]


@pytest.mark.parametrize("body, status, field", [
    ({"item_id": 1, "rater": "ann", "choice": 2}, 400, "choice"),  # out of range
    ({"item_id": 1, "rater": "ann", "choice": "0"}, 400, "choice"),  # wrong type
    ({"item_id": 1, "rater": "ann", "scores": [1, 2]}, 400, "scores"),  # wrong kind for a pairwise item
    ({"item_id": 1, "rater": "ann"}, 400, "choice"),  # no rating at all
    ({"item_id": 1, "choice": 0}, 400, "rater"),  # missing field
    ({"rater": "ann", "choice": 0}, 400, "item_id"),
    ({"item_id": "1", "rater": "ann", "choice": 0}, 400, "item_id"),
    ({"item_id": 1.0, "rater": "ann", "choice": 0}, 400, "item_id"),
    ({"item_id": 1, "rater": "", "choice": 0}, 400, "rater"),
    ({"item_id": 1, "rater": "ann", "choise": 0}, 400, "choise"),  # a typo is not ignored
    ({"item_id": 99, "rater": "ann", "choice": 0}, 404, "item_id"),
    ([1, 2], 400, "body"),
])
def test_malformed_ratings_are_rejected(server, store, body, status, field):
    store.enqueue("p", ["a", "b"])
    code, headers, payload = call(server, "POST", "/api/ratings", body=body)
    assert (code, payload["field"]) == (status, field)
    assert headers["Content-Type"].startswith("application/json") and payload["error"]
    assert store.ratings() == []


def test_body_rules(server, store):
    store.enqueue("p", ["a", "b"])
    assert call(server, "POST", "/api/ratings", raw=b'{"item_id": 1', headers={
        "Content-Type": "application/json"})[2]["field"] == "body"  # truncated JSON
    code, _, payload = call(server, "POST", "/api/ratings", headers={"Content-Type": "application/json"},
                            raw=b'{"item_id": 1, "rater": "a", "choice": NaN}')
    assert (code, payload["field"]) == (400, "body")
    code, _, payload = call(server, "POST", "/api/ratings", raw=b'{"item_id": 1, "rater": "a", "choice": 0}',
                            headers={"Content-Type": "text/plain"})  # a cross-site form could send this
    assert (code, payload["field"]) == (415, "Content-Type")
    big = json.dumps({"item_id": 1, "rater": "a", "choice": 0, "order": [0] * 40_000}).encode()
    code, _, payload = call(server, "POST", "/api/ratings", raw=big,
                            headers={"Content-Type": "application/json"})
    assert (code, payload["field"]) == (413, "body")
    assert store.ratings() == []


def test_duplicate_rating_is_409_and_first_one_stays(server, store):
    item = store.enqueue("p", ["a", "b"])
    client = RatingClient(server.url, server.token)
    client.rate(item, "ann", choice=0)
    with pytest.raises(RatingAPIError) as e:
        client.rate(item, "ann", choice=1)
    assert (e.value.status, e.value.field) == (409, "rater")
    assert "already rated" in e.value.message
    assert [(r.rater, r.choice) for r in store.ratings()] == [("ann", 0)]


def test_routes_and_static_files(server, store):
    assert call(server, "GET", "/api/nothing")[0] == 404
    assert call(server, "POST", "/api/next", body={})[0] == 404
    assert call(server, "GET", "/api/items/12")[2]["field"] == "item_id"
    assert call(server, "GET", "/api/next")[2]["field"] == "rater"
    assert call(server, "GET", "/static/../store.py")[0] == 404  # only the three files are served
    for method in ("PUT", "DELETE", "OPTIONS"):
        code, headers, payload = call(server, method, "/api/ratings")
        assert (code, payload["field"], headers["Allow"]) == (405, "method", "GET, HEAD, POST")
        assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    code, headers, body = call(server, "HEAD", "/")
    assert code == 200 and body == b"" and int(headers["Content-Length"]) > 0
    code, headers, page = call(server, "GET", "/")
    assert code == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert b'<script src="/static/app.js" defer></script>' in page
    for path, kind in (("/static/app.js", "text/javascript"), ("/static/style.css", "text/css")):
        code, headers, _ = call(server, "GET", path)
        assert code == 200 and headers["Content-Type"].startswith(kind)
    assert call(server, "GET", "/api/next?rater=ann")[2] == {"item": None, "counts": {
        "items": 0, "open": 0, "ratings": 0, "skipped": 0, "raters": 0, "waiting": 0, "rated_by_rater": 0}}


def test_security_headers_on_every_answer(server):
    for method, path in (("GET", "/"), ("GET", "/api/counts"), ("GET", "/nope"), ("POST", "/api/ratings")):
        _, headers, _ = call(server, method, path, body={} if method == "POST" else None)
        assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        assert headers["X-Content-Type-Options"] == "nosniff" and headers["X-Frame-Options"] == "DENY"
    assert "script-src 'self';" in CONTENT_SECURITY_POLICY and "unsafe-inline" not in CONTENT_SECURITY_POLICY
    assert "require-trusted-types-for 'script'" in CONTENT_SECURITY_POLICY


# ---------------------------------------------------------------------------
# Auth


def test_token_required_everywhere(server, store):
    item = store.enqueue("p", ["a", "b"])
    for method, path in (("GET", "/"), ("GET", "/static/app.js"), ("GET", "/api/counts"),
                         ("GET", "/api/next?rater=a"), ("POST", "/api/ratings")):
        body = {"item_id": item, "rater": "eve", "choice": 0} if method == "POST" else None
        for headers in ({}, {"Authorization": "Bearer " + "x" * len(server.token)},
                        {"Cookie": f"{server.cookie_name}=wrong"}):
            code, _, payload = call(server, method, path, body=body, headers=headers, auth=False)
            assert code == 401 and payload["field"] == "token", (method, path, headers)
    assert store.ratings() == []


def test_token_in_url_sets_cookie_and_redirects(server):
    code, headers, _ = call(server, "GET", f"/?token={server.token}", auth=False)
    assert code == 303 and headers["Location"] == "/"
    cookie = headers["Set-Cookie"]
    assert cookie.startswith(f"{server.cookie_name}={server.token};")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert call(server, "GET", "/api/counts", headers={"Cookie": cookie.split(";")[0]}, auth=False)[0] == 200
    assert call(server, "GET", "/?token=" + "y" * 32, auth=False)[0] == 401


def test_loopback_checks_host_and_origin(server, store):
    item = store.enqueue("p", ["a", "b"])
    code, _, payload = call(server, "GET", "/api/counts", headers={"Host": "evil.example:80"})
    assert (code, payload["field"]) == (403, "Host")  # DNS rebinding
    assert call(server, "GET", "/api/counts", headers={"Host": "localhost:9999"})[0] == 200  # an ssh tunnel
    code, _, payload = call(server, "POST", "/api/ratings", body={"item_id": item, "rater": "a", "choice": 0},
                            headers={"Origin": "http://evil.example"})
    assert (code, payload["field"]) == (403, "Origin")
    code, _, _ = call(server, "POST", "/api/ratings", body={"item_id": item, "rater": "a", "choice": 0},
                      headers={"Origin": f"http://127.0.0.1:{server.port}"})
    assert code == 201


def test_no_token_mode_only_on_loopback(store):
    with pytest.raises(ValueError, match="without a token"):
        RatingServer(store, host="0.0.0.0", port=0, require_token=False)
    with pytest.raises(ValueError, match="16 characters"):
        RatingServer(store, port=0, token="short")
    with RatingServer(store, port=0, require_token=False, quiet=True) as open_server:
        assert open_server.token is None and open_server.page_url == f"{open_server.url}/"
        assert call(open_server, "GET", "/api/counts", auth=False)[0] == 200
        assert call(open_server, "GET", "/api/counts", auth=False, headers={"Host": "evil.example"})[0] == 403


def test_non_loopback_bind_needs_token(store):
    with RatingServer(store, host="0.0.0.0", port=0, quiet=True) as public:
        assert public.token and public.page_url.endswith(f"/?token={public.token}")
        assert call(public, "GET", "/api/counts", auth=False, headers={"Host": "rater-box:1"})[0] == 401
        assert call(public, "GET", "/api/counts", headers={"Host": "rater-box:1"})[0] == 200


def test_request_log_never_shows_the_token(store, tmp_path):
    log_path = tmp_path / "log.txt"
    with open(log_path, "w") as log, RatingServer(store, port=0, log=log) as logged:
        call(logged, "GET", f"/?token={logged.token}", auth=False)
        call(logged, "GET", "/api/counts")
    text = log_path.read_text()
    assert "GET / 303" in text and "GET /api/counts 200" in text
    assert logged.token not in text


# ---------------------------------------------------------------------------
# A simulated rater on the same API


def test_simulated_rater_follows_gold_with_noise(server, store):
    rng = random.Random(0)
    for i in range(120):
        gold = rng.randrange(2)
        completions = ["right", "wrong"] if gold == 0 else ["wrong", "right"]
        store.enqueue(f"p{i}", completions, metadata={"gold": gold})
    client = RatingClient(server.url, server.token)
    exact = run_rater(client, "oracle", lambda item: {"choice": item.metadata["gold"]}, limit=40)
    noise = random.Random(1)
    flip = lambda: int(noise.random() < 0.25)
    noisy = run_rater(client, "noisy", lambda item: {"choice": item.metadata["gold"] ^ flip()})
    assert (exact, noisy) == (40, 80)  # one rating per item: the oracle's 40 items are closed for "noisy"
    by_rater = {}
    for rating, item in store.rated():
        by_rater.setdefault(rating.rater, []).append(item.completions[rating.choice] == "right")
    assert all(by_rater["oracle"]) and len(by_rater["oracle"]) == 40
    agreement = sum(by_rater["noisy"]) / 80
    assert 0.6 <= agreement <= 0.9  # 0.75 expected; a binomial(80, .25) lies in this range with p > 0.99


# ---------------------------------------------------------------------------
# Durability: SIGKILL the server right after it answers


def start_server_process(run_dir: Path, token: str) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, TOKEN_ENV: token, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "ouroboros_jax.rate", str(run_dir), "--port", "0",
                                "--quiet"], stdout=subprocess.PIPE, text=True, env=env)
    for line in process.stdout:
        if line.startswith("rate: open "):
            url = line.split()[2]
            assert url.endswith(f"/?token={token}")
            return process, int(url.split(":")[2].split("/")[0])
    raise AssertionError(f"the server exited ({process.wait()}) without printing its URL")


@pytest.mark.parametrize("args, message", [
    (["{run}/missing"], "no such run directory"),
    (["{run}", "--host", "0.0.0.0", "--no-token"], "without a token"),
])
def test_command_line_errors(tmp_path, args, message):
    command = [sys.executable, "-m", "ouroboros_jax.rate", *[a.format(run=tmp_path) for a in args]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2 and message in done.stderr


def test_sigkill_after_response_loses_nothing(tmp_path):
    store = RatingStore.in_run_dir(tmp_path)
    items = [store.enqueue(f"p{i}", ["a", "b", "c"]) for i in range(3)]
    token = "t" * 24
    for round_, item in enumerate(items):
        process, port = start_server_process(tmp_path, token)
        try:
            client = RatingClient(f"http://127.0.0.1:{port}", token)
            assert client.next_item("ann").id == item
            rating = client.rate(item, "ann", choice=round_, order=[2, 0, 1])
        finally:
            process.send_signal(signal.SIGKILL)  # no shutdown, no atexit, no flush
            process.wait(timeout=10)
        assert process.returncode == -signal.SIGKILL
        with sqlite3.connect(store.path) as db:  # a plain reader, as after a crash
            rows = db.execute("SELECT id, item_id, rater, choice, shown_order FROM ratings "
                              "ORDER BY id").fetchall()
        assert rows[-1] == (rating["id"], item, "ann", round_, "[2, 0, 1]")
        assert len(rows) == round_ + 1


def test_sigkill_during_a_stream_of_ratings(tmp_path):
    store = RatingStore.in_run_dir(tmp_path)
    items = [store.enqueue(f"p{i}", ["a", "b"]) for i in range(400)]
    token = "u" * 24
    process, port = start_server_process(tmp_path, token)
    acknowledged, failures = [], []

    def rate_all():
        client = RatingClient(f"http://127.0.0.1:{port}", token, timeout_s=5)
        try:
            for item in items:
                acknowledged.append(client.rate(item, "ann", choice=item % 2)["id"])
        except (OSError, RatingAPIError) as e:  # the server died mid-request
            failures.append(e)

    worker = threading.Thread(target=rate_all)
    worker.start()
    while len(acknowledged) < 20 and worker.is_alive():
        threading.Event().wait(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    worker.join(timeout=30)
    assert failures and len(acknowledged) < len(items), "the kill landed after the last rating"
    with sqlite3.connect(store.path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = {row[0] for row in db.execute("SELECT id FROM ratings")}
        # The rating counter moves in the same transaction as the rating: they agree after the kill.
        assert db.execute("SELECT SUM(n_ratings) FROM items").fetchone()[0] == len(stored)
    assert set(acknowledged) <= stored
    assert len(stored) - len(acknowledged) <= 1  # at most the one in flight when the server died
