"""An interrupted ``kvcast store put`` (SIGKILL at random points, both backends) never leaves the store
inconsistent; a final uninterrupted ``python -m kvcast.cli store put`` succeeds and ``gc`` removes leftovers.

Starting Python with torch and transformers costs ~4 s, so the killed puts are forked from a "zygote": one
``python -c`` process that imports kvcast, torch and transformers once (no tensor work, no connections) and
forks a child per put; the child runs `kvcast.cli.main` with the put's arguments, exactly what
``python -m kvcast.cli`` runs, in a process of its own that the test kills with SIGKILL. Kill delays come from a
seeded RNG, spread over the length of one whole put measured first; nothing asserts on durations.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from kvcast.streamer.store import open_store
from tests.streamer.store.support import assert_consistent, backend_url

KILLS = 24  # 12 per backend
SEED = 20240601
BASE_TEXT = "Streams of KV chunks; " * 9  # 198 bytes = tokens of the byte-level model
LEVELS = "raw,int8,cachegen-1"
CHUNK = 16

ZYGOTE = r"""
import json, os, sys, traceback
os.environ["TOKENIZERS_PARALLELISM"] = "false"
import torch, transformers, redis
import transformers.models.llama.modeling_llama
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
import kvcast.cli, kvcast.streamer.ingest, kvcast.codec.api, kvcast.codec.hf, kvcast.codec.model
import kvcast.streamer.store.dir, kvcast.streamer.store.redis
import kvcast.codec.rangecoder
# Load the torchac extension here, once: torch's extension loader holds a lock file while it checks the build,
# and a child killed inside it would leave that file behind, hanging every later load on this machine.
kvcast.codec.rangecoder.torchac_backend()
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "run":
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                fd = os.open(cmd["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                sys.argv = ["kvcast", *cmd["args"]]
                try:
                    kvcast.cli.main()
                    code = 0
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                except BaseException:
                    traceback.print_exc()
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
    elif cmd["op"] == "wait":
        _, status = os.waitpid(cmd["pid"], 0)
        print(json.dumps({"killed": os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9,
                          "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}), flush=True)
"""


class Zygote:
    def __init__(self, log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        assert self._read() == {"ready": True}

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, f"the zygote exited with {self.proc.poll()}"
        return json.loads(line)

    def _send(self, cmd: dict) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        return self._read()

    def start(self, args: list[str]) -> int:
        return self._send({"op": "run", "args": args, "log": str(self.log)})["pid"]

    def wait(self, pid: int) -> dict:
        return self._send({"op": "wait", "pid": pid})

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _assert_no_partial_state_visible(store) -> None:
    if store.url.startswith("dir://"):
        listed = set(store.object_keys())
        on_disk = {p.name for p in (store.root / "objects").glob("*/*") if re.fullmatch(r"[0-9a-f]{64}", p.name)}
        assert listed == on_disk
        temps = {p.name for p in store.temp_files()}
        assert not temps & listed and all(name.startswith(".tmp-") for name in temps)
        assert all(p.name.endswith(".json") or p.name.startswith(".tmp-")
                   for p in (store.root / "manifests").glob("*") if (store.root / "manifests").is_dir())
    else:
        pattern = re.compile(rf"{store.prefix}:(obj:[0-9a-f]{{64}}|manifest:ctx-[ab]|generation)")
        names = [k.decode() for k in store._client.scan_iter(match=f"{store.prefix}:*")]
        assert all(pattern.fullmatch(n) for n in names), names


def test_killed_puts_leave_the_store_consistent(tmp_path, redis_server, tiny_model_dir):
    urls = {kind: backend_url(kind, tmp_path, redis_server) for kind in ("dir", "redis")}
    stores = {kind: open_store(url) for kind, url in urls.items()}
    verified: dict[str, set[str]] = {kind: set() for kind in urls}
    log = tmp_path / "puts.log"
    texts = tmp_path / "texts"
    texts.mkdir()

    def args(kind: str, context_id: str, text: str, name: str) -> list[str]:
        path = texts / f"{name}.txt"
        path.write_text(text)
        return ["store", "put", "--store", urls[kind], "--context-id", context_id, "--model", str(tiny_model_dir),
                "--levels", LEVELS, "--chunk-tokens", str(CHUNK), "--threads", "1", "--no-progress", str(path)]

    zygote = Zygote(log)
    try:
        started = time.monotonic()  # one whole put, to spread the kills over its length
        outcome = zygote.wait(zygote.start(args("dir", "ctx-a", "calibration: " + BASE_TEXT, "calibration")))
        whole_put_s = time.monotonic() - started
        assert outcome == {"killed": False, "code": 0}, log.read_text()
        rng = random.Random(SEED)
        killed = 0
        for i in range(KILLS):
            kind = ("dir", "redis")[i % 2]
            context_id = ("ctx-a", "ctx-b")[(i // 2) % 2]
            pid = zygote.start(args(kind, context_id, f"run {i}: " + BASE_TEXT, f"run-{i}"))
            time.sleep(rng.uniform(0.0, 1.1 * whole_put_s))
            os.kill(pid, signal.SIGKILL)  # a finished child is a zombie until waited for: the kill is a no-op
            outcome = zygote.wait(pid)
            killed += outcome["killed"]
            assert outcome["killed"] or outcome["code"] == 0, log.read_text()
            store = stores[kind]
            assert_consistent(store, verified[kind])
            _assert_no_partial_state_visible(store)
        assert killed >= 1  # the delays span a whole put: most runs die part-way
    finally:
        zygote.close()

    # The final, uninterrupted puts: the real entry point, both backends at once.
    final_text = "final: " + BASE_TEXT
    procs = [subprocess.Popen([sys.executable, "-m", "kvcast.cli", *args(kind, "ctx-a", final_text, f"final-{kind}")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for kind in urls]
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0, out
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for kind, store in stores.items():
        manifest = store.get_manifest("ctx-a")
        assert manifest.text_sha256 == hashlib.sha256(final_text.encode()).hexdigest()
        assert manifest.levels == ("raw", "int8", "cachegen-1")
        store.collect_garbage()
        usage = store.usage()
        assert usage.unreferenced_objects == 0 and usage.contexts == len(store.contexts())
        if kind == "dir":
            assert store.temp_files() == []  # every killed writer's temp file is gone (its pid is dead)
        assert_consistent(store, set())
        _assert_no_partial_state_visible(store)
        store.close()
