"""Soak run: `xgen serve` on the tiny fixture model for a fixed time under a mixed load, on
loopback. Python standard library only.

    python3 tests/soak/soak.py --minutes 30 [--binary target/release/xgen] [--report soak.json]

The load, from --workers threads drawing request kinds at random (seeded), plus one thread that
scrapes /metrics twice a second:
- chat:       streamed chat completions with short messages, greedy;
- long:       completions over 1500-3000-token documents (several questions per document, so
              prompts share prefixes), greedy;
- sampled:    completions with temperature 0.8 and a seed;
- disconnect: a streamed request whose client closes the connection after sending it or after
              the first chunk;
- bad:        malformed bodies and out-of-range parameters;
- over:       a request that fits the context but not the KV budget.
Before the load starts, every greedy request and every bad body is run alone; during the load
each must give the same status and the same text. Resident memory (VmRSS) is read every 10 s.

Passes (exit 0) when no request got a 5xx or a transport error (other than the deliberate
disconnects), every greedy answer equals its answer alone, and every reading of resident memory
after the warm-up (5 minutes, or a third of a shorter run) is within 10% of the reading at its
end. Prints a summary and writes a JSON report.
"""

import argparse
import collections
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
MODEL = os.path.join(ROOT, "tests", "fixtures", "models", "tiny-xgen-8k-st")
WORDS = ("river stone market winter signal harbor lantern engine orchard copper thread valley "
         "archive meadow circuit ledger beacon canyon velvet summit quarry timber compass").split()
KV_BUDGET = 6 << 20  # bytes: the fixture's f32 KV is 1 KiB per position, so 6144 positions


def document(i):
    rng = random.Random(i)
    n = rng.randint(1500, 3000)
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def greedy_requests():
    """(name, path, body) of every request whose answer is checked against its answer alone."""
    reqs = []
    for i, msg in enumerate(["Hi", "Name a color.", "What is 2+2?", "Tell me a story.", "Summarize: rivers flow.", "Why?"]):
        body = {"messages": [{"role": "user", "content": msg}], "max_tokens": 24, "temperature": 0, "stream": True}
        reqs.append((f"chat-{i}", "/v1/chat/completions", body))
    for d in range(4):
        for q, question in enumerate(["Question: which word comes first?", "Question: summarize the text."]):
            prompt = f"{document(d)}\n\n{question}\nAnswer:"
            reqs.append((f"long-{d}-{q}", "/v1/completions", {"prompt": prompt, "max_tokens": 12, "temperature": 0}))
    return reqs


BAD_BODIES = [
    ("/v1/completions", b"{"),
    ("/v1/completions", b"[]"),
    ("/v1/completions", b'{"prompt": 5}'),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": -1}'),
    ("/v1/completions", b'{"prompt": "x", "logprobs": 1000}'),
    ("/v1/completions", b'{"prompt": "x", "temperature": "hot"}'),
    ("/v1/completions", b'{"prompt": "x", "n": 100000}'),
    ("/v1/completions", b'{"prompt": [99999999]}'),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 100000}'),
    ("/v1/chat/completions", b'{"messages": "x"}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "x"}]}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "bogus"}}}}'),
    ("/tokenize", b'{"content": 7}'),
    ("/detokenize", b'{"tokens": [-1]}'),
    ("/v1/completions", bytes(range(256))),
]


class Server:
    def __init__(self, binary, port, log):
        cmd = [binary, "serve", "--model", MODEL, "--dtype", "f32", "--port", str(port), "--max-batch", "4",
               "--kv-budget", str(KV_BUDGET), "--no-ui"]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        self.port = port
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if self.request("GET", "/health", None)[0] == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise SystemExit(f"soak: xgen serve exited with {self.proc.returncode} (log: {log.name})")
            time.sleep(0.1)
        raise SystemExit("soak: the server never became healthy")

    def request(self, method, path, body, timeout=300):
        """(status, body bytes) of one request on a fresh connection."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            c.request(method, path, body=data, headers={"Content-Type": "application/json"})
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def rss_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def answer_text(path, raw):
    """The generated text of a response: streamed deltas joined, or the choice's text."""
    if raw.startswith(b"data: "):
        parts = []
        for line in raw.decode().splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                for ch in chunk.get("choices", []):
                    parts.append(ch.get("delta", {}).get("content") or ch.get("text") or "")
        return "".join(parts)
    v = json.loads(raw)
    ch = v["choices"][0]
    return ch["message"]["content"] if "message" in ch else ch["text"]


class Soak:
    def __init__(self, server, seconds, workers, seed):
        self.server, self.seconds, self.workers, self.seed = server, seconds, workers, seed
        self.greedy = greedy_requests()
        self.lock = threading.Lock()
        self.statuses = collections.Counter()  # (kind, status) -> count
        self.failures = []  # what went wrong, in words
        self.rss = []  # (seconds since start, KiB)
        self.expected = {}

    def fail(self, what):
        with self.lock:
            self.failures.append(what)
            print(f"soak: FAIL {what}", file=sys.stderr, flush=True)

    def count(self, kind, status):
        with self.lock:
            self.statuses[(kind, status)] += 1
        if isinstance(status, int) and status >= 500:
            self.fail(f"{kind}: status {status}")

    def run_alone(self):
        for name, path, body in self.greedy:
            status, raw = self.server.request("POST", path, body)
            if status != 200:
                raise SystemExit(f"soak: {name} alone answered {status}: {raw[:300]!r}")
            self.expected[name] = answer_text(path, raw)
        for i, (path, body) in enumerate(BAD_BODIES):
            status, raw = self.server.request("POST", path, body)
            if not 400 <= status < 500:
                raise SystemExit(f"soak: bad body {i} alone answered {status}: {raw[:300]!r}")
            self.expected[f"bad-{i}"] = status

    def one(self, rng):
        kind = rng.choices(["chat", "long", "sampled", "disconnect", "bad", "over"], [30, 20, 15, 15, 15, 5])[0]
        try:
            if kind in ("chat", "long"):
                name, path, body = rng.choice([r for r in self.greedy if r[0].startswith(kind)])
                status, raw = self.server.request("POST", path, body)
                self.count(kind, status)
                if status == 200 and answer_text(path, raw) != self.expected[name]:
                    self.fail(f"{name}: {answer_text(path, raw)!r} != alone {self.expected[name]!r}")
                elif status != 200 and status != 503:  # 503: queue full, a legitimate refusal
                    self.fail(f"{name}: status {status}: {raw[:200]!r}")
            elif kind == "sampled":
                body = {"prompt": rng.choice(WORDS) + " " + rng.choice(WORDS), "max_tokens": rng.randint(1, 48),
                        "temperature": 0.8, "top_p": 0.95, "seed": rng.randint(0, 1 << 30)}
                status, raw = self.server.request("POST", "/v1/completions", body)
                self.count(kind, status)
            elif kind == "disconnect":
                self.disconnect(rng)
                self.count(kind, "closed")
            elif kind == "bad":
                i = rng.randrange(len(BAD_BODIES))
                status, raw = self.server.request("POST", *BAD_BODIES[i])
                self.count(kind, status)
                if status != self.expected[f"bad-{i}"]:
                    self.fail(f"bad body {i}: {status}, alone {self.expected[f'bad-{i}']}")
            else:
                body = {"prompt": document(99), "max_tokens": 6000, "temperature": 0}
                status, raw = self.server.request("POST", "/v1/completions", body)
                self.count(kind, status)
                if not 400 <= status < 500:
                    self.fail(f"over budget: status {status}: {raw[:200]!r}")
        except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
            self.count(kind, "error")
            self.fail(f"{kind}: {type(e).__name__}: {e}")

    def disconnect(self, rng):
        body = json.dumps({"prompt": document(rng.randrange(4)) + "\nQ" + str(rng.randrange(1000)),
                           "max_tokens": 64, "temperature": 0, "stream": True}).encode()
        s = socket.create_connection(("127.0.0.1", self.server.port), timeout=300)
        try:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            if rng.random() < 0.5:
                s.recv(1)  # the first bytes of the answer (the prompt has been read), then leave
        finally:
            s.close()

    def worker(self, i, deadline):
        rng = random.Random(self.seed * 1000 + i)
        while time.time() < deadline:
            self.one(rng)

    def scraper(self, deadline):
        while time.time() < deadline:
            try:
                status, raw = self.server.request("GET", "/metrics", None)
                self.count("metrics", status)
            except (OSError, http.client.HTTPException) as e:
                self.count("metrics", "error")
                self.fail(f"metrics: {e}")
            time.sleep(0.5)

    def run(self):
        self.run_alone()
        start = time.time()
        deadline = start + self.seconds
        threads = [threading.Thread(target=self.worker, args=(i, deadline)) for i in range(self.workers)]
        threads.append(threading.Thread(target=self.scraper, args=(deadline,)))
        for t in threads:
            t.start()
        next_report = 60
        while time.time() < deadline:
            time.sleep(min(10, max(0.1, deadline - time.time())))
            elapsed = time.time() - start
            self.rss.append((round(elapsed), self.server.rss_kib()))
            if elapsed >= next_report:
                done = sum(self.statuses.values())
                print(f"soak: {elapsed / 60:.0f} min, {done} requests, RSS {self.rss[-1][1] / 1024:.1f} MiB, "
                      f"{len(self.failures)} failures", flush=True)
                next_report += 60
        for t in threads:
            t.join()
        self.rss.append((round(time.time() - start), self.server.rss_kib()))

    def report(self):
        warmup = min(300, self.seconds / 3)
        base = next((kib for t, kib in self.rss if t >= warmup), None)
        after = [kib for t, kib in self.rss if t >= warmup]
        drift = max((abs(k - base) / base for k in after), default=0.0) if base else 0.0
        if drift > 0.10:
            self.fail(f"resident memory moved {drift:.1%} from its level at {warmup:.0f} s ({base} KiB)")
        by_status = collections.defaultdict(dict)
        for (kind, status), n in sorted(self.statuses.items(), key=str):
            by_status[kind][str(status)] = n
        return {
            "seconds": self.seconds,
            "requests": sum(self.statuses.values()),
            "by_kind_and_status": by_status,
            "status_5xx": sum(n for (k, s), n in self.statuses.items() if isinstance(s, int) and s >= 500),
            "rss_kib_by_minute": [kib for t, kib in self.rss if t % 60 < 10 or t == self.rss[-1][0]],
            "rss_kib_at_warmup": base,
            "rss_max_drift_after_warmup": round(drift, 4),
            "failures": self.failures,
            "passed": not self.failures,
        }


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "xgen"))
    p.add_argument("--workers", type=int, default=6)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--report", default="soak-report.json")
    p.add_argument("--log", default="soak-server.log")
    a = p.parse_args()
    with open(a.log, "w") as log:
        server = Server(a.binary, free_port(), log)
        try:
            soak = Soak(server, a.minutes * 60, a.workers, a.seed)
            soak.run()
            if server.proc.poll() is not None:
                soak.fail(f"the server exited with {server.proc.returncode}")
            report = soak.report()
        finally:
            server.stop()
    with open(a.report, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: report[k] for k in ("requests", "status_5xx", "rss_kib_at_warmup",
                                             "rss_max_drift_after_warmup", "passed")}))
    print(json.dumps(report["by_kind_and_status"]))
    sys.exit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
