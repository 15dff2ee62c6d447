"""A Keel external worker in 30 lines (stdlib only): leases calls of a
`worker: <queue>` tool, runs them, reports the result. Usage:
    python3 python_worker.py http://127.0.0.1:8080 <queue> [--once]
(with KEEL_API_TOKEN set, it sends that token: the server's first one)
"""
import json, os, sys, time, urllib.error, urllib.request

if len(sys.argv) < 3:
    sys.exit(__doc__)
KEEL, QUEUE = sys.argv[1].rstrip("/"), sys.argv[2]
TOKEN = os.environ.get("KEEL_API_TOKEN", "").split(",")[0].strip()
HEADERS = {"content-type": "application/json", **({"authorization": "Bearer " + TOKEN} if TOKEN else {})}

def post(path, body):
    req = urllib.request.Request(KEEL + path, json.dumps(body).encode(), HEADERS)
    with urllib.request.urlopen(req, timeout=90) as r:
        return json.loads(r.read() or "null") if r.status == 200 else None

def handle(tool, args):  # your tool goes here
    return {"tool": tool, "echo": args, "worker": "python"}

while True:
    try:
        task = post("/v1/worker/tasks/lease", {"queue": QUEUE, "worker": "py", "wait": "20s", "lease": "30s"})
    except urllib.error.URLError as e:
        print("keel unreachable:", e, file=sys.stderr); time.sleep(1); continue
    if task is None:
        continue  # nothing within 20 s: ask again
    base, token = f"/v1/worker/tasks/{task['task_id']}", task["lease_token"]
    try:  # long work: POST base + "/heartbeat" {"lease_token": token} before lease_until
        post(base + "/complete", {"lease_token": token, "output": handle(task["tool"], task["arguments"])})
    except urllib.error.HTTPError as e:  # 409: the lease expired, another worker has the call
        print("complete refused:", e.code, file=sys.stderr)
    except Exception as e:  # the tool failed: Keel retries it (attempts, backoff), then tells the model
        post(base + "/fail", {"lease_token": token, "error": str(e), "retryable": True})
    if "--once" in sys.argv:
        break
