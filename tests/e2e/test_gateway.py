"""End-to-end tests of capy's gateway: API keys, limits, usage records and replicas.

Real components only: `capy serve` processes, the official `openai` and `ollama` clients, a
PostgreSQL server from Debian's packages started here on loopback (as the `postgres` user
when run as root: PostgreSQL refuses root) and nginx from Debian's packages in front of two
replicas. Run by scripts/test.sh; alone: `python3 tests/e2e/test_gateway.py` with CAPY_BIN
pointing at the binary (default target/release/capy). Prints a cargo-style `test result:`
line.
"""

import concurrent.futures
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.error
import urllib.request

import ollama
import openai
from e2e_server import wait_ready

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CAPY = os.environ.get("CAPY_BIN", os.path.join(ROOT, "target", "release", "capy"))
MODEL = "smollm2-135m"
TMP = None
PG = None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    """A PostgreSQL cluster in a temporary directory on a free loopback port."""

    def __init__(self):
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not bins:
            raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql")
        self.bin = os.path.dirname(bins[-1])
        self.root = os.geteuid() == 0
        self.dir = tempfile.mkdtemp(prefix="capy-e2e-pg-", dir="/tmp")
        if self.root:
            shutil.chown(self.dir, "postgres", "postgres")
        self.port = free_port()
        data = os.path.join(self.dir, "data")
        self.run("initdb", "-D", data, "-A", "trust", "-U", "capy", "--no-sync", "-E", "UTF8")
        opts = f"-h 127.0.0.1 -p {self.port} -k {self.dir} -F -c max_connections=200"
        self.run("pg_ctl", "-D", data, "-o", opts, "-l", os.path.join(self.dir, "log"), "-w",
                 "start")

    def run(self, prog, *args):
        cmd = [os.path.join(self.bin, prog), *args]
        if self.root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, cwd=self.dir, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)

    def database(self, name):
        self.run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "capy", name)
        return f"postgres://capy@127.0.0.1:{self.port}/{name}"

    def stop(self):
        try:
            self.run("pg_ctl", "-D", os.path.join(self.dir, "data"), "-m", "immediate", "-w",
                     "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class Server:
    """`capy serve` on a free port with a database; stopped by `stop`."""

    def __init__(self, db_url, *extra, replica=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = db_url
        args = [CAPY, "serve", "--port", str(self.port), "-t", "1", "--parallel", "16", "-c",
                "1024", "-m", MODEL, "--database-url", db_url, *extra]
        if replica:
            args += ["--replica", replica]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=sys.stderr)
        wait_ready(self.url, self.proc)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def http(base, method, path, body=None, key=None, timeout=60):
    """(status, headers, parsed JSON or text) of a plain request."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, status, h = r.read().decode(), r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        raw, status, h = e.read().decode(), e.code, dict(e.headers)
    h = {k.lower(): v for k, v in h.items()}
    try:
        return status, h, json.loads(raw)
    except ValueError:
        return status, h, raw


def capy(*args, db):
    """Runs a capy command against database `db`; returns its stdout."""
    r = subprocess.run([CAPY, *args, "--database-url", db], check=True, capture_output=True,
                       text=True)
    return r.stdout


def create_key(db, name, *flags):
    return capy("keys", "create", name, *flags, db=db).strip()


def records(server, admin, key=None):
    q = "/admin/usage?records=true&limit=100000" + (f"&key={key}" if key else "")
    status, _, v = http(server.url, "GET", q, key=admin)
    assert status == 200, v
    return v["data"]


def setUpModule():
    global TMP, PG
    TMP = tempfile.mkdtemp(prefix="capy-e2e-gw-")
    PG = Postgres()


def tearDownModule():
    if PG:
        PG.stop()
    shutil.rmtree(TMP, ignore_errors=True)


class Usage(unittest.TestCase):
    """1,000 requests across two keys, both APIs, streaming and not, n > 1, errors and
    disconnects: the records sum to what the responses reported."""

    def run_mix(self, db_url):
        server = Server(db_url)
        try:
            admin = create_key(db_url, "admin", "--admin")
            keys = [create_key(db_url, "alpha"), create_key(db_url, "beta")]
            time.sleep(1.2)  # the server reloads keys twice a second
            reported = {0: [0, 0, 0], 1: [0, 0, 0]}  # requests, prompt, completion
            cut = {0: [], 1: []}  # tokens seen by the client before it went away
            lock = threading.Lock()

            def one(i):
                k = i % 2
                key = keys[k]
                kind = (i // 2) % 10
                o = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
                ol = ollama.Client(host=server.url, headers={"Authorization": f"Bearer {key}"})
                msgs = [{"role": "user", "content": f"Say something about {i}."}]
                p = c = 0
                if kind == 0:
                    r = o.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4)
                    p, c = r.usage.prompt_tokens, r.usage.completion_tokens
                elif kind == 1:
                    s = o.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4,
                                                  stream=True,
                                                  stream_options={"include_usage": True})
                    for ch in s:
                        if ch.usage:
                            p, c = ch.usage.prompt_tokens, ch.usage.completion_tokens
                elif kind == 2:
                    r = o.chat.completions.create(model=MODEL, messages=msgs, max_tokens=3,
                                                  n=3, seed=i)
                    p, c = r.usage.prompt_tokens, r.usage.completion_tokens
                elif kind == 3:
                    r = o.completions.create(model=MODEL, prompt=["One", "Two two"],
                                             max_tokens=3, n=2)
                    p, c = r.usage.prompt_tokens, r.usage.completion_tokens
                elif kind == 4:
                    s = o.completions.create(model=MODEL, prompt=f"Count to {i}:",
                                             max_tokens=5, stream=True,
                                             stream_options={"include_usage": True})
                    for ch in s:
                        if ch.usage:
                            p, c = ch.usage.prompt_tokens, ch.usage.completion_tokens
                elif kind == 5:
                    r = ol.chat(model=MODEL, messages=msgs, options={"num_predict": 4})
                    p, c = r.prompt_eval_count, r.eval_count
                elif kind == 6:
                    for part in ol.generate(model=MODEL, prompt=f"Hi {i}", stream=True,
                                            options={"num_predict": 4}):
                        if part.done:
                            p, c = part.prompt_eval_count, part.eval_count
                elif kind == 7:
                    # an error: no tokens, still a record
                    try:
                        o.chat.completions.create(model=MODEL, messages=msgs, max_tokens=-1)
                        raise AssertionError("accepted max_tokens=-1")
                    except openai.BadRequestError:
                        pass
                elif kind == 8:
                    try:
                        ol.chat(model="no-such-model", messages=msgs)
                        raise AssertionError("accepted an unknown model")
                    except ollama.ResponseError:
                        pass
                else:
                    # a client that goes away mid-stream
                    s = o.chat.completions.create(model=MODEL, messages=msgs, max_tokens=200,
                                                  stream=True)
                    seen = 0
                    for ch in s:
                        if ch.choices and ch.choices[0].delta.content:
                            seen += 1
                        if seen >= 3:
                            break
                    s.close()
                    with lock:
                        cut[k].append(seen)
                        reported[k][0] += 1
                    return
                with lock:
                    reported[k][0] += 1
                    reported[k][1] += p
                    reported[k][2] += c

            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                list(pool.map(one, range(1000)))
            # every record written (the writer flushes within 200 ms; disconnects end
            # when the engine notices)
            names = ["alpha", "beta"]
            for _ in range(100):
                rows = {k: records(server, admin, names[k]) for k in (0, 1)}
                if all(len(rows[k]) == reported[k][0] for k in (0, 1)):
                    break
                time.sleep(0.2)
            for k in (0, 1):
                done = [r for r in rows[k] if not r["disconnected"]]
                gone = [r for r in rows[k] if r["disconnected"]]
                self.assertEqual(len(rows[k]), reported[k][0])
                self.assertEqual(len(gone), len(cut[k]))
                # the completed requests sum exactly; cut ones record what was generated,
                # at least what the client read
                full_p = sum(r["prompt_tokens"] for r in done)
                full_c = sum(r["completion_tokens"] for r in done)
                self.assertEqual(full_p, reported[k][1], names[k])
                self.assertEqual(full_c, reported[k][2], names[k])
                self.assertGreaterEqual(sum(r["completion_tokens"] for r in gone), sum(cut[k]))
                self.assertTrue(all(r["completion_tokens"] < 200 for r in gone))
                self.assertEqual(sum(1 for r in rows[k] if r["status"] == 400), 50)
                self.assertEqual(sum(1 for r in rows[k] if r["status"] == 404), 50)
            # the report agrees with the rows
            totals = json.loads(capy("usage", "--by", "key", "--json", db=db_url))
            by = {t["group"]: t for t in totals}
            for k in (0, 1):
                self.assertEqual(by[names[k]]["requests"], reported[k][0])
            return [admin, *keys]
        finally:
            server.stop()

    def test_thousand_requests_on_sqlite(self):
        path = os.path.join(TMP, "usage.db")
        secrets = self.run_mix(f"sqlite://{path}")
        # the database files hold no secret (only each one's first 9 characters)
        for f in glob.glob(path + "*"):
            with open(f, "rb") as fh:
                data = fh.read()
            for s in secrets:
                self.assertNotIn(s[9:].encode(), data)

    def test_thousand_requests_on_postgres(self):
        self.run_mix(PG.database("usage"))


class Limits(unittest.TestCase):
    def test_sixty_rpm_in_a_minute_long_burst(self):
        db = f"sqlite://{os.path.join(TMP, 'rpm.db')}"
        server = Server(db)
        try:
            key = create_key(db, "burst", "--rpm", "60")
            time.sleep(1.2)
            ok, limited, bad = 0, 0, []
            start = time.time()
            lock = threading.Lock()

            def loop():
                nonlocal ok, limited
                while time.time() - start < 58:
                    s, h, v = http(server.url, "POST", "/v1/chat/completions",
                                   {"model": MODEL, "max_tokens": 1,
                                    "messages": [{"role": "user", "content": "x"}]}, key=key)
                    with lock:
                        if s == 200:
                            ok += 1
                        elif s == 429:
                            limited += 1
                            if not (h.get("retry-after", "").isdigit()
                                    and h.get("x-ratelimit-limit-requests") == "60"
                                    and h.get("x-ratelimit-remaining-requests") == "0"
                                    and "x-ratelimit-reset-requests" in h
                                    and v["error"]["code"] == "rate_limit_exceeded"):
                                bad.append((h, v))
                        else:
                            bad.append((s, v))
                    time.sleep(0.05)

            threads = [threading.Thread(target=loop) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            print(f"\n60 rpm burst of 58 s: {ok} admitted, {limited} refused", file=sys.stderr)
            self.assertEqual(ok, 60)
            self.assertGreater(limited, 100)
            self.assertEqual(bad, [])
        finally:
            server.stop()


NGINX_CONF = os.path.join(ROOT, "deploy", "nginx", "capy.conf")


class Replicas(unittest.TestCase):
    """Two servers sharing one PostgreSQL behind nginx."""

    @classmethod
    def setUpClass(cls):
        cls.db = PG.database("replicas")
        cls.a = Server(cls.db, "--shared-limits", replica="a")
        cls.b = Server(cls.db, "--shared-limits", replica="b")
        cls.nginx_dir = tempfile.mkdtemp(prefix="capy-e2e-nginx-", dir=TMP)
        cls.port = free_port()
        cls.url = f"http://127.0.0.1:{cls.port}"
        cls.nginx = cls.start_nginx(cls.port, sticky=False)

    @classmethod
    def start_nginx(cls, port, sticky):
        """nginx with the README's config (deploy/nginx/capy.conf) for the two replicas."""
        with open(NGINX_CONF) as f:
            site = f.read()
        site = site.replace("127.0.0.1:11434", f"127.0.0.1:{cls.a.port}")
        site = site.replace("127.0.0.1:11435", f"127.0.0.1:{cls.b.port}")
        site = site.replace("listen 8080;", f"listen 127.0.0.1:{port};")
        if sticky:
            site = site.replace("# hash $http_authorization consistent;",
                                "hash $http_authorization consistent;")
        d = os.path.join(cls.nginx_dir, str(port))
        os.makedirs(d)
        conf = os.path.join(d, "nginx.conf")
        user = "user root;\n" if os.geteuid() == 0 else ""
        with open(conf, "w") as f:
            f.write(f"""{user}worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
{site}
}}
""")
        exe = shutil.which("nginx") or "/usr/sbin/nginx"
        proc = subprocess.Popen([exe, "-c", conf, "-p", d, "-e", f"{d}/error.log"],
                                stderr=subprocess.PIPE)
        for _ in range(100):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return proc
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError("nginx failed: " + proc.stderr.read().decode())
                time.sleep(0.05)
        raise RuntimeError("nginx did not start")

    @classmethod
    def tearDownClass(cls):
        cls.nginx.terminate()
        cls.nginx.wait()
        cls.a.stop()
        cls.b.stop()

    def burst(self, url, key, seconds, threads=6):
        counts = {"ok": 0, "limited": 0, "other": 0}
        lock = threading.Lock()
        start = time.time()

        def loop():
            while time.time() - start < seconds:
                s, _, _ = http(url, "POST", "/v1/chat/completions",
                               {"model": MODEL, "max_tokens": 1,
                                "messages": [{"role": "user", "content": "x"}]}, key=key)
                with lock:
                    counts["ok" if s == 200 else "limited" if s == 429 else "other"] += 1
                time.sleep(0.02)

        ts = [threading.Thread(target=loop) for _ in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return counts

    def test_rpm_holds_across_replicas_and_usage_lands_in_one_table(self):
        key = create_key(self.db, "shared", "--rpm", "60")
        admin = create_key(self.db, "root", "--admin")
        time.sleep(1.2)
        c = self.burst(self.url, key, 20)
        print(f"\n60 rpm burst of 20 s at two replicas: {c}", file=sys.stderr)
        self.assertEqual(c["other"], 0, c)
        self.assertGreaterEqual(c["ok"], 57, c)
        self.assertLessEqual(c["ok"], 63, c)
        self.assertGreater(c["limited"], 50, c)
        time.sleep(0.5)
        rows = records(self.a, admin, "shared")
        self.assertEqual(len(rows), c["ok"] + c["limited"])
        self.assertEqual({r["replica"] for r in rows}, {"a", "b"})
        self.assertEqual(sum(1 for r in rows if r["status"] == 200), c["ok"])

    def test_revocation_reaches_both_replicas_within_two_seconds(self):
        key = create_key(self.db, "doomed")
        time.sleep(1.2)
        for s in (self.a, self.b):
            self.assertEqual(http(s.url, "GET", "/v1/models", key=key)[0], 200)
        capy("keys", "revoke", "doomed", db=self.db)
        t0 = time.time()
        pending = {self.a.url, self.b.url}
        while pending and time.time() - t0 < 5:
            for u in list(pending):
                if http(u, "GET", "/v1/models", key=key)[0] == 401:
                    pending.discard(u)
            time.sleep(0.05)
        elapsed = time.time() - t0
        print(f"\nrevocation seen by both replicas after {elapsed:.2f} s", file=sys.stderr)
        self.assertEqual(pending, set())
        self.assertLess(elapsed, 2.0)

    def test_sticky_routing_by_key(self):
        port = free_port()
        proc = self.start_nginx(port, sticky=True)
        try:
            key = create_key(self.db, "sticky")
            admin = create_key(self.db, "root2", "--admin")
            time.sleep(1.2)
            for i in range(10):
                s, _, v = http(f"http://127.0.0.1:{port}", "POST", "/v1/chat/completions",
                               {"model": MODEL, "max_tokens": 1,
                                "messages": [{"role": "user", "content": f"x{i}"}]}, key=key)
                self.assertEqual(s, 200, v)
            time.sleep(0.5)
            rows = records(self.a, admin, "sticky")
            self.assertEqual(len(rows), 10)
            self.assertEqual(len({r["replica"] for r in rows}), 1)
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    suite = unittest.defaultTestLoader.loadTestsFromModule(sys.modules[__name__])
    result = unittest.TextTestRunner(verbosity=2).run(suite)
    failed = len(result.failures) + len(result.errors)
    passed = result.testsRun - failed
    print(f"test result: {'ok' if failed == 0 else 'FAILED'}. {passed} passed; {failed} failed")
    sys.exit(0 if failed == 0 else 1)
