"""End-to-end tests of `capy serve` with the official `openai` and `ollama` Python clients.

Starts the server on a free port with both real models in the warm set, drives it as users
would, and stops it. Run by scripts/test.sh (which installs the clients into a virtual
environment); alone: `python3 tests/e2e/test_server.py` with CAPY_BIN pointing at the
binary (default target/release/capy). Prints a cargo-style `test result:` line.
"""

import concurrent.futures
import json
import os
import re
import subprocess
import sys
import time
import unittest
import urllib.request

import jsonschema
import ollama
import openai

from e2e_server import CAPY, MODELS, Server, free_port
from e2e_server import http as http_at

SERVER = None
URL = None


def http(method, path, body=None):
    """(status, parsed JSON or text) of a plain request to the test server."""
    return http_at(URL, method, path, body)


def metric(name):
    _, text = http("GET", "/metrics")
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def setUpModule():
    global SERVER, URL
    SERVER = Server("server", ["-c", "2048"])
    URL = SERVER.url


def tearDownModule():
    for c in CLIENTS.values():
        c.close() if hasattr(c, "close") else c._client.close()
    if SERVER:
        SERVER.stop()


CLIENTS = {}


def oai():
    if "openai" not in CLIENTS:
        CLIENTS["openai"] = openai.OpenAI(base_url=URL + "/v1", api_key="none", max_retries=0)
    return CLIENTS["openai"]


class OpenAIClient(unittest.TestCase):
    def test_chat_streaming_and_not_agree(self):
        for model in MODELS:
            with self.subTest(model=model):
                msgs = [{"role": "user", "content": "Name three colors."}]
                r = oai().chat.completions.create(model=model, messages=msgs, max_tokens=16,
                                                  temperature=0)
                text = r.choices[0].message.content
                self.assertTrue(text)
                self.assertEqual(r.choices[0].message.role, "assistant")
                self.assertIn(r.choices[0].finish_reason, ("stop", "length"))
                self.assertLessEqual(r.usage.completion_tokens, 16)
                self.assertGreater(r.usage.prompt_tokens, 5)
                self.assertEqual(r.model, model)

                parts, usage, finish = [], None, None
                for chunk in oai().chat.completions.create(
                        model=model, messages=msgs, max_tokens=16, temperature=0, stream=True,
                        stream_options={"include_usage": True}):
                    if chunk.usage:
                        usage = chunk.usage
                    for c in chunk.choices:
                        parts.append(c.delta.content or "")
                        finish = c.finish_reason or finish
                self.assertEqual("".join(parts), text)
                self.assertEqual(usage.completion_tokens, r.usage.completion_tokens)
                self.assertEqual(finish, r.choices[0].finish_reason)
                # the same prompt again comes largely from the prefix cache
                self.assertGreater(usage.prompt_tokens_details.cached_tokens, 0)

    def test_greedy_completion_equals_capy_generate(self):
        prompt = "The three most common metals in the Earth's crust are"
        out = subprocess.run([CAPY, "generate", "-m", "smollm2-135m", "--prompt", prompt,
                              "-n", "24", "--temp", "0", "-t", "2", "--json"],
                             check=True, capture_output=True, text=True).stdout
        want = json.loads(out)
        r = oai().completions.create(model="smollm2-135m", prompt=prompt, max_tokens=24,
                                     temperature=0)
        self.assertEqual(r.choices[0].text, want["text"])
        # the same through token ids, with logprobs
        r = oai().completions.create(model="smollm2-135m", prompt=want["prompt_token_ids"],
                                     max_tokens=24, temperature=0, logprobs=2)
        self.assertEqual(r.choices[0].text, want["text"])
        lp = r.choices[0].logprobs
        self.assertEqual(len(lp.tokens), len(want["tokens"]))
        for got, ref in zip(lp.token_logprobs, want["tokens"]):
            self.assertAlmostEqual(got, ref["logprob"], delta=1e-3)
        self.assertTrue(all(len(t) == 2 for t in lp.top_logprobs))

    def test_echo_with_logprobs_scores_the_prompt(self):
        r = oai().completions.create(model="smollm2-135m", prompt="Paris is the capital of",
                                     max_tokens=1, temperature=0, echo=True, logprobs=1)
        c = r.choices[0]
        self.assertTrue(c.text.startswith("Paris is the capital of"))
        self.assertIsNone(c.logprobs.token_logprobs[0])
        self.assertTrue(all(x is not None and x <= 0 for x in c.logprobs.token_logprobs[1:]))
        self.assertEqual(len(c.logprobs.tokens), r.usage.prompt_tokens + 1)

    def test_sampling_parameters_n_seed_stop(self):
        kw = dict(model="smollm2-135m", prompt="Once upon a time", max_tokens=12,
                  temperature=1.0, seed=42, n=3, presence_penalty=0.5, frequency_penalty=0.5,
                  top_p=0.9, user="tester")
        a = oai().completions.create(**kw)
        b = oai().completions.create(**kw)
        self.assertEqual(len(a.choices), 3)
        self.assertEqual([c.text for c in a.choices], [c.text for c in b.choices])
        r = oai().completions.create(model="smollm2-135m", prompt="1, 2, 3, 4,", max_tokens=20,
                                     temperature=0, stop=[" 7"])
        self.assertEqual(r.choices[0].finish_reason, "stop")
        self.assertNotIn(" 7", r.choices[0].text)
        r = oai().chat.completions.create(model="smollm2-135m", max_completion_tokens=5,
                                          messages=[{"role": "user", "content": "Hi"}],
                                          extra_body={"ignore_eos": True}, temperature=0)
        self.assertEqual(r.usage.completion_tokens, 5)
        self.assertEqual(r.choices[0].finish_reason, "length")

    def test_chat_logprobs(self):
        r = oai().chat.completions.create(model="gemma3-270m", max_tokens=4, temperature=0,
                                          messages=[{"role": "user", "content": "Hello"}],
                                          logprobs=True, top_logprobs=3)
        content = r.choices[0].logprobs.content
        self.assertEqual(len(content), r.usage.completion_tokens)
        for t in content:
            self.assertEqual(len(t.top_logprobs), 3)
            self.assertAlmostEqual(t.logprob, t.top_logprobs[0].logprob, delta=1e-4)

    def test_none_arguments_mean_defaults(self):
        # the client sends explicit None as JSON null; capy answered 400 invalid_json
        r = oai().chat.completions.create(model="smollm2-135m", max_tokens=3, temperature=0,
                                          messages=[{"role": "user", "content": "Hi"}],
                                          logprobs=None, top_logprobs=None, stream=None,
                                          seed=None, stop=None, n=None)
        self.assertEqual(r.choices[0].message.refusal, None)
        self.assertTrue(r.choices[0].message.content)
        c = oai().completions.create(model="smollm2-135m", prompt="Hello", max_tokens=3,
                                     echo=None, logprobs=None, stream=None, suffix=None)
        self.assertEqual(c.usage.completion_tokens, 3)
        with self.assertRaises(openai.BadRequestError) as e:
            oai().chat.completions.create(model="smollm2-135m", max_tokens=-1,
                                          messages=[{"role": "user", "content": "Hi"}])
        self.assertEqual(e.exception.body["param"], "max_tokens")

    def test_models(self):
        ids = [m.id for m in oai().models.list().data]
        self.assertEqual(sorted(ids), sorted(MODELS))
        self.assertEqual(oai().models.retrieve("gemma3-270m").id, "gemma3-270m")
        with self.assertRaises(openai.NotFoundError):
            oai().models.retrieve("no-such-model")

    def test_errors_in_openai_shape(self):
        with self.assertRaises(openai.NotFoundError) as e:
            oai().chat.completions.create(model="no-such-model",
                                          messages=[{"role": "user", "content": "x"}])
        self.assertEqual(e.exception.body["code"], "model_not_found")
        with self.assertRaises(openai.BadRequestError) as e:
            oai().completions.create(model="smollm2-135m", prompt=[1] * 2100, max_tokens=4)
        self.assertEqual(e.exception.body["code"], "context_length_exceeded")
        status, body = http("POST", "/v1/chat/completions", None)
        self.assertEqual(status, 400)
        self.assertEqual(body["error"]["type"], "invalid_request_error")

    def test_sixteen_concurrent_streams_all_complete(self):
        def one(i):
            n, usage = 0, None
            for chunk in oai().completions.create(
                    model="smollm2-135m", prompt=f"Story number {i}: once upon a time",
                    max_tokens=64, temperature=0.7, seed=i, stream=True,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
                if chunk.usage:
                    usage = chunk.usage
                n += sum(1 for c in chunk.choices if c.finish_reason is None)
            return usage.completion_tokens, n

        with concurrent.futures.ThreadPoolExecutor(16) as ex:
            results = list(ex.map(one, range(16)))
        for tokens, chunks in results:
            self.assertEqual(tokens, 64)
            self.assertGreater(chunks, 32)

    def test_disconnect_frees_the_sequence(self):
        before = metric("capy_generated_tokens_total")
        # alone, this runs for seconds: the server must stop it when the client leaves
        client = openai.OpenAI(base_url=URL + "/v1", api_key="none", max_retries=0)
        stream = client.completions.create(model="smollm2-135m", prompt="Count to a million:",
                                           max_tokens=2000, stream=True,
                                           extra_body={"ignore_eos": True})
        got = 0
        for _ in stream:
            got += 1
            if got == 3:
                break
        stream.close()
        client.close()
        deadline = time.time() + 1
        while time.time() < deadline and metric("capy_running_sequences") != 0:
            time.sleep(0.02)
        self.assertEqual(metric("capy_running_sequences"), 0)
        self.assertLess(metric("capy_generated_tokens_total") - before, 1000)


def sse(path, body):
    """The JSON events of a streamed response, without the final [DONE]."""
    req = urllib.request.Request(URL + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    events, done = [], False
    with urllib.request.urlopen(req, timeout=60) as r:
        for line in r:
            line = line.decode().strip()
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert done, "the stream ends with [DONE]"
    return events


SCHEMAS = json.load(open(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                      "openai-schemas.json")))


def _completion_chunk_schema():
    """OpenAI's spec has no schema of its own for streamed completions and uses the response's,
    whose `finish_reason` is not nullable, yet its API sends null until a choice ends; and its
    legacy echo logprobs carry null for the first prompt token, which the spec's
    `token_logprobs`/`top_logprobs` items do not allow. The streamed chunks are checked against
    the response schema with exactly those two nulls allowed."""
    s = json.loads(json.dumps(SCHEMAS["components"]["schemas"]["CreateCompletionResponse"]))
    choice = s["properties"]["choices"]["items"]["properties"]
    choice["finish_reason"] = {"anyOf": [choice["finish_reason"], {"type": "null"}]}
    for lp in choice["logprobs"]["anyOf"]:
        if lp.get("type") == "object":
            for k in ("token_logprobs", "top_logprobs"):
                items = lp["properties"][k]["items"]
                lp["properties"][k]["items"] = {"anyOf": [items, {"type": "null"}]}
    return s


SCHEMAS["components"]["schemas"]["CompletionChunk (capy)"] = _completion_chunk_schema()


def check_schema(name, value):
    """Validates a response against a schema of OpenAI's own OpenAPI spec (vendored)."""
    schema = {"$ref": f"#/components/schemas/{name}", "components": SCHEMAS["components"]}
    jsonschema.Draft202012Validator(schema).validate(value)


class OpenAISchemas(unittest.TestCase):
    """Every response and stream chunk of the OpenAI routes against OpenAI's spec: chat
    responses lacked the required `message.refusal` and `logprobs.refusal`."""

    def test_chat_responses_and_chunks(self):
        base = {"model": "smollm2-135m", "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "user", "content": "Hello"}]}
        for extra in [{}, {"logprobs": True, "top_logprobs": 2}, {"n": 2, "seed": 3,
                                                                   "temperature": 0.7}]:
            with self.subTest(**extra):
                status, body = http("POST", "/v1/chat/completions", {**base, **extra})
                self.assertEqual(status, 200, body)
                check_schema("CreateChatCompletionResponse", body)
                chunks = sse("/v1/chat/completions", {**base, **extra, "stream": True,
                                                      "stream_options": {"include_usage": True}})
                self.assertGreater(len(chunks), 2)
                for c in chunks:
                    check_schema("CreateChatCompletionStreamResponse", c)
                self.assertTrue(chunks[-1]["usage"])

    def test_completion_responses_and_chunks(self):
        base = {"model": "smollm2-135m", "max_tokens": 4, "temperature": 0, "prompt": "Hello"}
        for extra in [{}, {"logprobs": 2, "echo": True}, {"prompt": ["A", "B"], "n": 2}]:
            with self.subTest(**extra):
                status, body = http("POST", "/v1/completions", {**base, **extra})
                self.assertEqual(status, 200, body)
                # echo's first prompt token has no logprob (null, as OpenAI's legacy API)
                check_schema("CompletionChunk (capy)" if "echo" in extra
                             else "CreateCompletionResponse", body)
                chunks = sse("/v1/completions", {**base, **extra, "stream": True})
                self.assertGreater(len(chunks), 2)
                for c in chunks:
                    check_schema("CompletionChunk (capy)", c)

    def test_models_and_errors(self):
        status, body = http("GET", "/v1/models")
        check_schema("ListModelsResponse", body)
        status, body = http("GET", "/v1/models/smollm2-135m")
        check_schema("Model", body)
        for path, req in [("/v1/chat/completions", {"model": "nope", "messages": []}),
                          ("/v1/chat/completions", {"model": "smollm2-135m", "max_tokens": -1,
                                                    "messages": [{"role": "user", "content": "x"}]}),
                          ("/v1/completions", {"model": "smollm2-135m", "prompt": "x", "n": 99}),
                          ("/v1/nothing", {})]:
            status, body = http("POST", path, req)
            self.assertGreaterEqual(status, 400)
            check_schema("ErrorResponse", body)


class OllamaClient(unittest.TestCase):
    def client(self):
        if "ollama" not in CLIENTS:
            CLIENTS["ollama"] = ollama.Client(host=URL)
        return CLIENTS["ollama"]

    def test_generate_and_chat_streaming_and_not(self):
        for model in MODELS:
            with self.subTest(model=model):
                opts = {"num_predict": 12, "temperature": 0, "top_k": 40, "top_p": 0.9,
                        "min_p": 0.05, "repeat_penalty": 1.1, "seed": 1, "num_ctx": 1024,
                        "stop": ["\n\n\n"]}
                r = self.client().generate(model=model, prompt="Why is the sky blue?",
                                           options=opts)
                self.assertTrue(r.done)
                self.assertTrue(r.response)
                self.assertLessEqual(r.eval_count, 12)
                self.assertGreater(r.prompt_eval_count, 0)
                self.assertGreater(r.total_duration, 0)
                self.assertTrue(r.context)
                parts = list(self.client().generate(model=model, prompt="Why is the sky blue?",
                                                    options=opts, stream=True))
                self.assertTrue(parts[-1].done)
                self.assertEqual("".join(p.response for p in parts), r.response)

                msgs = [{"role": "user", "content": "Say hello."}]
                c = self.client().chat(model=model, messages=msgs, options=opts)
                self.assertEqual(c.message.role, "assistant")
                self.assertTrue(c.message.content)
                parts = list(self.client().chat(model=model, messages=msgs, options=opts,
                                                stream=True))
                self.assertTrue(parts[-1].done)
                self.assertIn(parts[-1].done_reason, ("stop", "length"))
                self.assertEqual("".join(p.message.content for p in parts), c.message.content)

    def test_list_show_ps_version_pull(self):
        c = self.client()
        names = sorted(m.model for m in c.list().models)
        self.assertEqual(names, sorted(f"{m}:latest" for m in MODELS))
        s = c.show("gemma3-270m")
        self.assertEqual(s.details.family, "gemma3")
        self.assertEqual(s.details.format, "gguf")
        self.assertIn("general.architecture", s.modelinfo)
        loaded = [m.model for m in c.ps().models]
        self.assertIn("smollm2-135m:latest", loaded)
        status, body = http("GET", "/api/version")
        self.assertEqual(status, 200)
        self.assertTrue(body["version"])
        # already in the store: pull ends at once with success
        self.assertEqual(c.pull("smollm2-135m").status, "success")
        steps = [p.status for p in c.pull("smollm2-135m", stream=True)]
        self.assertEqual(steps[-1], "success")

    def test_errors(self):
        with self.assertRaises(ollama.ResponseError) as e:
            self.client().generate(model="no-such-model", prompt="hi")
        self.assertEqual(e.exception.status_code, 404)
        with self.assertRaises(ollama.ResponseError) as e:
            self.client().delete("no-such-model")
        self.assertEqual(e.exception.status_code, 404)


class Plain(unittest.TestCase):
    def test_health_metrics_tokenize(self):
        self.assertEqual(http("GET", "/health"), (200, {"status": "ok"}))
        status, body = http("POST", "/tokenize", {"content": "Hello world",
                                                  "model": "smollm2-135m"})
        self.assertEqual(status, 200)
        self.assertEqual(len(body["tokens"]), 2)
        status, body = http("POST", "/detokenize", {"tokens": body["tokens"],
                                                    "model": "smollm2-135m"})
        self.assertEqual(body["content"], "Hello world")
        # after the other tests, the histograms have counts
        oai().completions.create(model="smollm2-135m", prompt="Hi", max_tokens=3)
        self.assertGreater(metric("capy_time_to_first_token_seconds_count"), 0)
        self.assertGreater(metric("capy_generated_tokens_total"), 0)
        self.assertEqual(metric("capy_models_loaded"), 2)
        # the paged KV cache: idle now, the blocks requests wrote kept for the prefix cache
        cached = metric("capy_kv_cache_blocks_cached")
        self.assertGreater(cached, 0)
        self.assertLessEqual(cached + metric("capy_kv_cache_blocks_used"),
                             metric("capy_kv_cache_blocks"))
        self.assertGreaterEqual(metric("capy_kv_cache_used_bytes"), 0)

    def test_zz_ps_and_stop(self):
        # runs last in its class: it unloads a model
        env = dict(os.environ, CAPY_HOST=URL.removeprefix("http://"))
        ps = subprocess.run([CAPY, "ps"], env=env, capture_output=True, text=True, timeout=60)
        self.assertEqual(ps.returncode, 0, ps.stderr)
        for m in MODELS:
            self.assertIn(m, ps.stdout)
        stop = subprocess.run([CAPY, "stop", "gemma3-270m"], env=env, capture_output=True,
                              text=True, timeout=60)
        self.assertEqual(stop.returncode, 0, stop.stderr)
        ps = subprocess.run([CAPY, "ps"], env=env, capture_output=True, text=True, timeout=60)
        self.assertNotIn("gemma3-270m", ps.stdout)
        self.assertIn("smollm2-135m", ps.stdout)
        again = subprocess.run([CAPY, "stop", "gemma3-270m"], env=env, capture_output=True,
                               text=True, timeout=60)
        self.assertNotEqual(again.returncode, 0)
        self.assertIn("not loaded", again.stderr)
        # the next request loads it again
        r = oai().completions.create(model="gemma3-270m", prompt="Hi", max_tokens=2)
        self.assertEqual(r.usage.completion_tokens, 2)
        down = subprocess.run([CAPY, "ps"], env=dict(os.environ, CAPY_HOST="127.0.0.1:9"),
                              capture_output=True, text=True, timeout=60)
        self.assertNotEqual(down.returncode, 0)
        self.assertIn("no capy server", down.stderr)


CONFIG = """
[models.assistant]
source = "smollm2-135m"
ctx_size = 512
parallel = 2
system = "You are a helpful assistant who answers in one sentence."
aliases = ["gpt-4o-mini"]
options = { temperature = 0, top_k = 1 }

[models.cold]
source = "gemma3-270m"
warm = false
keep_alive = "0"
"""


class PerModelConfig(unittest.TestCase):
    """A second server from a config file with `[models.NAME]` tables, as the README shows."""

    @classmethod
    def setUpClass(cls):
        import tempfile
        cls.dir = tempfile.mkdtemp(prefix="capy-e2e-config-")
        cfg = os.path.join(cls.dir, "capy.toml")
        with open(cfg, "w") as f:
            f.write(CONFIG)
        port = free_port()
        cls.url = f"http://127.0.0.1:{port}"
        cls.server = subprocess.Popen(
            [CAPY, "serve", "--config", cfg, "--port", str(port), "-t", "2", "--auth", "off",
             "--no-usage"],
            stdout=subprocess.DEVNULL, stderr=sys.stderr)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(cls.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if cls.server.poll() is not None:
                raise RuntimeError(f"capy serve --config exited with {cls.server.returncode}")
            time.sleep(0.2)
        cls.oai = openai.OpenAI(base_url=cls.url + "/v1", api_key="none", max_retries=0)
        cls.oll = ollama.Client(host=cls.url)

    @classmethod
    def tearDownClass(cls):
        cls.oai.close()
        cls.oll._client.close()
        cls.server.terminate()
        cls.server.wait(timeout=30)

    def test_names_aliases_system_and_options(self):
        ids = [m.id for m in self.oai.models.list().data]
        self.assertEqual(ids, ["assistant", "cold"])
        with urllib.request.urlopen(self.url + "/api/ps", timeout=30) as r:
            ps = json.load(r)
        self.assertEqual([(m["model"], m["context_length"]) for m in ps["models"]],
                         [("assistant:latest", 512)])
        q = [{"role": "user", "content": "What is the capital of France?"}]
        a = self.oai.chat.completions.create(model="gpt-4o-mini", messages=q, max_tokens=16)
        self.assertEqual(a.model, "assistant")
        # the configured options are greedy: the same as asking the model greedily with the
        # configured system message written out
        sys_msg = {"role": "system",
                   "content": "You are a helpful assistant who answers in one sentence."}
        c = self.oai.chat.completions.create(model="assistant", messages=[sys_msg] + q,
                                             max_tokens=16)
        self.assertEqual(a.usage.prompt_tokens, c.usage.prompt_tokens)
        self.assertEqual(a.choices[0].message.content, c.choices[0].message.content)
        self.assertGreater(len(a.choices[0].message.content), 0)
        show = self.oll.show("gpt-4o-mini")
        self.assertIn("temperature", show.parameters)
        self.assertIn("one sentence", show.modelfile)
        # the cold model loads on request and unloads after it (keep_alive "0")
        r = self.oll.generate(model="cold", prompt="Hi", options={"num_predict": 2})
        self.assertEqual(r.eval_count, 2)
        self.assertEqual([m.model for m in self.oll.ps().models], ["assistant:latest"])
        with self.assertRaises(openai.NotFoundError):
            self.oai.chat.completions.create(model="smollm2-135m", messages=q, max_tokens=1)
        # capy stop takes an alias, as clients use it
        env = dict(os.environ, CAPY_HOST=self.url.removeprefix("http://"))
        stop = subprocess.run([CAPY, "stop", "gpt-4o-mini"], env=env, capture_output=True,
                              text=True, timeout=60)
        self.assertEqual(stop.returncode, 0, stop.stderr)
        self.assertIn("stopped assistant", stop.stdout)
        self.assertEqual(self.oll.ps().models, [])


if __name__ == "__main__":
    result = unittest.main(exit=False, verbosity=2).result
    failed = len(result.failures) + len(result.errors)
    passed = result.testsRun - failed - len(result.skipped)
    print(f"test result: {'ok' if failed == 0 else 'FAILED'}. {passed} passed; {failed} failed")
    sys.exit(1 if failed else 0)
