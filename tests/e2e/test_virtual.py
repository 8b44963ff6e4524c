"""End-to-end tests of virtual models (routers and ensembles) with the official `openai` and
`ollama` clients.

Starts `capy serve` with both real models, two members that are refused (`huge`: a KV cache
larger than the memory budget; `broken`: a file that is not a GGUF) and the virtual models of
CONFIG, then checks:
- listings (`/v1/models`, `/api/tags`, `/api/show`) say what each virtual model is;
- routers send code-like prompts, long prompts and tool requests where their rules say, the
  classifier sends code questions and chat to its labels' members, refused members fall back,
  and the response names the member (`model`, `x-capy-routed-to`, `x-capy-route`);
- ensembles answer through both clients, streamed and not, with members of two models and
  with several samples of one (sharing the prompt's cached blocks), by vote (the majority of
  the candidates' extracted answers), best-of and synthesize (the judge's answer streams);
- a failed or too-large member is left out and named; `on_failure = "fail"` fails; the
  deadline is honoured; what ensembles do not take is a clear 400.

Run by scripts/test.sh; alone: `target/e2e-venv/bin/python tests/e2e/test_virtual.py`
(CAPY_BIN picks the binary). Prints a cargo-style `test result:` line.
"""

import collections
import json
import os
import shutil
import tempfile
import time
import unittest
import urllib.error
import urllib.request


from e2e_server import Clients, Server, run_tests
from e2e_server import http as http_at

CONFIG = """
ctx_size = 4096
memory_budget = "3GiB"

[models.smollm2-135m]
[models.gemma3-270m]
[models.huge]
source = "smollm2-135m"
kv_cache_size = "16GiB"
warm = false
[models.broken]
path = "{broken}"
warm = false

[virtual.expert]
kind = "router"
description = "rules only"
default = "smollm2-135m"
rules = [ {{ needs = "tools", model = "gemma3-270m" }},
          {{ regex = "(?i)```|\\\\bdef |\\\\bfn ", model = "gemma3-270m" }},
          {{ min_prompt_tokens = 300, model = "gemma3-270m" }} ]

[virtual.classy]
kind = "router"
default = "huge"
classifier = {{ model = "smollm2-135m", labels = {{ code = "gemma3-270m", chat = "smollm2-135m" }} }}

[virtual.spill]
kind = "router"
default = "huge"
fallback = ["broken", "smollm2-135m"]

[virtual.nowhere]
kind = "router"
default = "huge"
fallback = ["broken"]

[virtual.lonely]
kind = "router"
default = "broken"

[virtual.counted]
kind = "router"
default = "broken"
fallback = ["smollm2-135m"]
rules = [ {{ min_prompt_tokens = 1000, model = "gemma3-270m" }} ]

[virtual.instant]
kind = "ensemble"
members = ["smollm2-135m"]
deadline = "1ms"

[virtual.council]
kind = "ensemble"
members = ["smollm2-135m"]
samples = 5
strategy = "vote"
extract = "last-number"

[virtual.panel]
kind = "ensemble"
members = ["smollm2-135m", "gemma3-270m"]
samples = 2
strategy = "best-of"
include_candidates = true

[virtual.duo]
kind = "ensemble"
members = ["smollm2-135m", "gemma3-270m"]
strategy = "synthesize"
judge = "gemma3-270m"

[virtual.brave]
kind = "ensemble"
members = ["smollm2-135m", "huge", "broken"]
samples = 2
extract = "last-number"

[virtual.strict]
kind = "ensemble"
members = ["smollm2-135m", "broken"]
on_failure = "fail"

[virtual.hasty]
kind = "ensemble"
members = ["smollm2-135m", "gemma3-270m"]
samples = 2
deadline = "2s"
"""

SERVER = None
URL = None
TMP = None
CLIENTS = Clients()
ASK = [{"role": "user", "content": "What is 12 + 30? Answer with a number."}]


def http(method, path, body=None):
    return http_at(URL, method, path, body, timeout=300)


def setUpModule():
    global SERVER, URL, TMP
    TMP = tempfile.mkdtemp(prefix="capy-virtual-")
    broken = os.path.join(TMP, "broken.gguf")
    with open(broken, "wb") as f:
        f.write(b"GGUF" + b"\x00" * 64)
    cfg = os.path.join(TMP, "config.toml")
    with open(cfg, "w") as f:
        f.write(CONFIG.format(broken=broken))
    SERVER = Server("virtual", ["--config", cfg], models=())
    URL = CLIENTS.url = SERVER.url


def tearDownModule():
    CLIENTS.close()
    if SERVER:
        SERVER.stop()
    if TMP:
        shutil.rmtree(TMP, ignore_errors=True)


oai = CLIENTS.openai
oll = CLIENTS.ollama


def routed(model, content, **kw):
    """(member, reason, completion) of a chat through router `model`."""
    raw = oai().chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=4, **kw)
    c = raw.parse()
    return raw.headers.get("x-capy-routed-to"), raw.headers.get("x-capy-route"), c


def http_raw(path, data):
    """(status, parsed JSON) of a POST of raw bytes."""
    req = urllib.request.Request(URL + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def ndjson(path, body):
    """Every line of a streamed Ollama response."""
    req = urllib.request.Request(URL + path, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=300) as r:
        return [json.loads(line) for line in r.read().decode().splitlines() if line.strip()]


def ps_cache(name):
    """(prompt_tokens, cached_tokens) of a loaded model's KV cache, from /api/ps."""
    for m in http("GET", "/api/ps")[1]["models"]:
        if m["name"] == name + ":latest":
            return m["kv_cache"]["prompt_tokens"], m["kv_cache"]["cached_tokens"]
    raise AssertionError(f"{name} is not loaded")


class Listing(unittest.TestCase):
    def test_models_and_tags_say_what_each_virtual_model_is(self):
        data = {m.id: m for m in oai().models.list().data}
        for name, kind in [("expert", "router"), ("council", "ensemble"), ("duo", "ensemble")]:
            self.assertEqual(data[name].model_extra["virtual"]["kind"], kind)
        self.assertEqual(data["duo"].model_extra["virtual"]["judge"], "gemma3-270m")
        self.assertEqual(data["expert"].model_extra["virtual"]["description"], "rules only")
        tags = {m["name"]: m for m in http("GET", "/api/tags")[1]["models"]}
        self.assertEqual(tags["council:latest"]["details"]["format"], "virtual")
        self.assertEqual(tags["council:latest"]["virtual"]["samples"], 5)
        self.assertIn("gguf", tags["smollm2-135m:latest"]["details"]["format"])
        self.assertEqual(oai().models.retrieve("spill").model_extra["virtual"]["fallback"],
                         ["broken", "smollm2-135m"])
        show = oll().show("classy")
        self.assertEqual(show.details.family, "router")
        s, body = http("POST", "/api/show", {"model": "classy"})
        self.assertEqual(body["virtual"]["classifier"]["labels"],
                         {"code": "gemma3-270m", "chat": "smollm2-135m"})


class Router(unittest.TestCase):
    def test_rules_route_code_long_prompts_and_tools(self):
        member, why, c = routed("expert", "Hello there!")
        self.assertEqual((member, why, c.model), ("smollm2-135m", "default", "smollm2-135m"))
        member, why, c = routed("expert", "Why does this fail?\n```\nprint(1/0)\n```")
        self.assertEqual((member, why, c.model), ("gemma3-270m", "rule 1", "gemma3-270m"))
        long = "Please summarise the following notes. " + "The meeting covered budgets, " * 80
        member, why, _ = routed("expert", long)
        self.assertEqual((member, why), ("gemma3-270m", "rule 2"))
        tools = [{"type": "function", "function": {
            "name": "get_weather", "parameters": {
                "type": "object", "properties": {"city": {"type": "string"}}}}}]
        member, why, _ = routed("expert", "Weather in Paris?", tools=tools)
        self.assertEqual((member, why), ("gemma3-270m", "rule 0"))
        # tool_choice none needs no tools
        member, _, _ = routed("expert", "Weather in Paris?", tools=tools, tool_choice="none")
        self.assertEqual(member, "smollm2-135m")

    def test_classifier_sends_code_and_chat_to_their_members(self):
        for text, label, member in [
            ("How do I reverse a linked list in Java?", "code", "gemma3-270m"),
            ("Why does my SQL query return duplicate rows?", "code", "gemma3-270m"),
            ("Tell me a joke about cats.", "chat", "smollm2-135m"),
            ("What should I cook for dinner tonight?", "chat", "smollm2-135m"),
        ]:
            got, why, c = routed("classy", text)
            self.assertEqual(got, member, f"{text!r}: {why}")
            self.assertTrue(why.startswith(f"classifier {label} "), why)
            self.assertEqual(c.model, member)

    def test_a_refused_member_falls_back(self):
        member, why, c = routed("spill", "Hi!")
        self.assertEqual((member, c.model), ("smollm2-135m", "smollm2-135m"))
        self.assertEqual(why, "fallback after broken")
        self.assertTrue(c.choices[0].message.content is not None)
        # every member refused: a 503 naming each and why
        s, body = http("POST", "/v1/chat/completions",
                       {"model": "nowhere", "messages": ASK, "max_tokens": 4})
        self.assertEqual(s, 503, body)
        msg = body["error"]["message"]
        self.assertIn("huge:", msg)
        self.assertIn("memory budget", msg)
        self.assertIn("broken:", msg)
        # one member, refused: the same
        s, body = http("POST", "/v1/chat/completions",
                       {"model": "lonely", "messages": ASK, "max_tokens": 4})
        self.assertEqual(s, 503, body)
        self.assertIn("router lonely", body["error"]["message"])
        self.assertIn("broken:", body["error"]["message"])

    def test_token_rules_count_with_a_fallback_and_stop_early(self):
        # the default's file is unreadable: tokens are counted with the fallback's tokenizer
        member, why, _ = routed("counted", "Hi!")
        self.assertEqual((member, why), ("smollm2-135m", "fallback after broken"))
        member, why, _ = routed("counted", "Summarise: " + "the cat sat on the mat. " * 300)
        self.assertEqual((member, why), ("gemma3-270m", "rule 0"))
        # a huge prompt is counted only as far as the rules need, then refused by the member
        t = time.time()
        s, body = http("POST", "/v1/chat/completions",
                       {"model": "expert", "max_tokens": 4,
                        "messages": [{"role": "user", "content": "word " * 1_000_000}]})
        self.assertEqual(s, 400, body)
        self.assertLess(time.time() - t, 10)
        # a repeated model key: the last wins, as for any model
        s, body = http_raw("/v1/chat/completions",
                           b'{"model": "x", "model": "expert", "max_tokens": 2, '
                           b'"messages": [{"role": "user", "content": "Hi"}]}')
        self.assertEqual((s, body["model"]), (200, "smollm2-135m"))

    def test_ollama_and_completions_routes(self):
        r = oll().chat(model="expert", messages=[{"role": "user", "content": "fn main() {}"}],
                       options={"num_predict": 4})
        self.assertEqual(r.model, "gemma3-270m:latest")
        lines = ndjson("/api/generate", {"model": "expert", "prompt": "Hi",
                                         "options": {"num_predict": 3}})
        self.assertEqual(lines[-1]["model"], "smollm2-135m:latest")
        self.assertTrue(lines[-1]["done"])
        c = oai().completions.create(model="spill", prompt="Once upon", max_tokens=3)
        self.assertEqual(c.model, "smollm2-135m")
        # a member's own checks still apply (a 400, not a fallback)
        s, body = http("POST", "/v1/chat/completions",
                       {"model": "spill", "messages": ASK, "temperature": -1})
        self.assertEqual(s, 400, body)


class Ensemble(unittest.TestCase):
    def test_vote_over_samples_of_one_model(self):
        c = oai().chat.completions.create(model="council", messages=ASK, max_tokens=48,
                                          temperature=0.7, extra_body={"include_candidates": True})
        self.assertEqual(c.model, "council")
        e = c.model_extra["ensemble"]
        self.assertEqual(e["strategy"], "vote")
        cands = e["candidates"]
        self.assertEqual(len(cands), 5)
        counts = collections.Counter(x["answer"] for x in cands if x["answer"] is not None)
        if counts:
            # the winner is a majority answer, the text is one of its candidates
            self.assertEqual(counts[e["answer"]], max(counts.values()))
            self.assertEqual(e["votes"], dict(counts))
            winner = cands[e["chosen"]["index"]]
            self.assertEqual(winner["answer"], e["answer"])
            self.assertEqual(c.choices[0].message.content, winner["text"])
        self.assertEqual(c.usage.completion_tokens, sum(x["completion_tokens"] for x in cands))
        self.assertEqual(e["members"][0]["finished"], 5)

    def test_samples_share_the_prompts_cached_blocks(self):
        # a prompt of a few 64-token blocks: the five samples compute it once
        text = "Read this and answer. " + " ".join(f"Item {i} costs {i} coins." for i in range(60))
        before = ps_cache("smollm2-135m")
        c = oai().chat.completions.create(model="council", max_tokens=4,
                                          messages=[{"role": "user", "content": text + " Total?"}])
        after = ps_cache("smollm2-135m")
        n = c.usage.prompt_tokens
        self.assertGreater(n, 256)
        self.assertEqual(after[0] - before[0], 5 * n)
        # at least four samples found the first's full blocks in the cache
        self.assertGreaterEqual(after[1] - before[1], 4 * (n // 64 - 1) * 64)

    def test_best_of_two_models_streamed_and_not(self):
        c = oai().chat.completions.create(model="panel", messages=ASK, max_tokens=16)
        e = c.model_extra["ensemble"]
        self.assertEqual({m["model"] for m in e["members"]}, {"smollm2-135m", "gemma3-270m"})
        cands = e["candidates"]
        self.assertEqual(len(cands), 4)
        best = max(cands, key=lambda x: x["mean_logprob"] if x["mean_logprob"] is not None
                   else -1e9)
        self.assertEqual(c.choices[0].message.content, best["text"])
        self.assertEqual(e["chosen"]["index"], best["index"])
        self.assertEqual(c.usage.prompt_tokens, sum(m["prompt_tokens"] for m in e["members"]))
        for m in e["members"]:
            self.assertGreater(m["seconds"], 0)
        chunks = list(oai().chat.completions.create(
            model="panel", messages=ASK, max_tokens=16, stream=True,
            stream_options={"include_usage": True}))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        last = [ch for ch in chunks if ch.choices][-1]
        self.assertIn(last.choices[0].finish_reason, ("stop", "length"))
        self.assertEqual(text, last.model_extra["ensemble"]["candidates"][
            last.model_extra["ensemble"]["chosen"]["index"]]["text"])
        self.assertGreater(chunks[-1].usage.completion_tokens, 0)

    def test_synthesize_streams_the_judges_answer(self):
        chunks = list(oai().chat.completions.create(
            model="duo", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24, stream=True))
        pieces = [ch.choices[0].delta.content for ch in chunks
                  if ch.choices and ch.choices[0].delta.content]
        self.assertGreater(len(pieces), 1, "the judge's tokens stream one by one")
        e = chunks[-1].model_extra["ensemble"]
        self.assertEqual(e["judge"]["model"], "gemma3-270m")
        c = oai().completions.create(model="duo", prompt="The capital of Italy is", max_tokens=8)
        self.assertEqual(c.model_extra["ensemble"]["strategy"], "synthesize")
        self.assertTrue(c.choices[0].text)

    def test_ollama_client_streamed_and_not(self):
        r = oll().chat(model="council", messages=ASK, options={"num_predict": 32})
        self.assertEqual(r.model, "council:latest")
        self.assertTrue(r.done)
        self.assertGreater(r.eval_count, 0)
        parts = list(oll().chat(model="panel", messages=ASK, stream=True,
                                options={"num_predict": 16}))
        self.assertTrue(parts[-1].done)
        self.assertTrue("".join(p.message.content for p in parts))
        g = oll().generate(model="duo", prompt="Name a colour.", options={"num_predict": 12})
        self.assertTrue(g.done and g.response)
        lines = ndjson("/api/chat", {"model": "council", "messages": ASK,
                                     "options": {"num_predict": 16}})
        self.assertEqual(lines[-1]["ensemble"]["strategy"], "vote")
        self.assertEqual(len(lines[-1]["ensemble"]["members"]), 1)
        # an empty chat loads the members; unloading goes by the members' names
        for name in ("panel", "expert"):
            s, body = http("POST", "/api/chat", {"model": name, "messages": []})
            self.assertEqual((s, body["done_reason"], body["model"]), (200, "load", name))
            s, body = http("POST", "/api/generate", {"model": name, "keep_alive": 0})
            self.assertEqual(s, 400, body)
            self.assertIn("unload its members by name", body["error"])
        s, body = http("DELETE", "/api/delete", {"model": "council:latest"})
        self.assertEqual(s, 409, body)
        self.assertIn("[virtual.council]", body["error"])

    def test_failed_and_too_large_members_are_left_out(self):
        c = oai().chat.completions.create(model="brave", messages=ASK, max_tokens=16)
        e = c.model_extra["ensemble"]
        failed = {f["model"]: f["error"] for f in e["failed"]}
        self.assertEqual(set(failed), {"huge", "broken"})
        self.assertIn("memory budget", failed["huge"])
        ok = next(m for m in e["members"] if m["model"] == "smollm2-135m")
        self.assertEqual(ok["finished"], 2)
        self.assertTrue(c.choices[0].message.content)
        s, body = http("POST", "/v1/chat/completions",
                       {"model": "strict", "messages": ASK, "max_tokens": 4})
        self.assertEqual(s, 503, body)
        self.assertIn("member broken failed", body["error"]["message"])

    def test_the_deadline_is_honoured(self):
        t = time.time()
        c = oai().chat.completions.create(
            model="hasty", messages=[{"role": "user", "content": "Write a long story."}],
            max_tokens=3000, extra_body={"ignore_eos": True, "include_candidates": True})
        took = time.time() - t
        e = c.model_extra["ensemble"]
        self.assertTrue(e["deadline_hit"])
        self.assertLess(took, 2 + 3, "answered soon after the 2 s deadline")
        self.assertEqual(c.choices[0].finish_reason, "length")
        self.assertTrue(c.choices[0].message.content)
        self.assertTrue(all(x["finish_reason"] == "deadline" for x in e["candidates"]))
        # the cancelled candidates leave the engines idle
        time.sleep(0.5)
        s, text = http("GET", "/metrics")
        running = [line for line in text.splitlines()
                   if line.startswith("capy_running_sequences")]
        self.assertEqual([float(line.split()[-1]) for line in running], [0.0], running)

    def test_nothing_written_by_the_deadline_is_a_504(self):
        s, body = http("POST", "/v1/chat/completions",
                       {"model": "instant", "messages": ASK, "max_tokens": 64})
        self.assertEqual(s, 504, body)
        self.assertEqual(body["error"]["code"], "deadline_exceeded")

    def test_what_ensembles_do_not_take_is_a_400(self):
        for extra, param in [({"n": 2}, "n"), ({"logprobs": True}, "logprobs"),
                             ({"response_format": {"type": "json_object"}}, "response_format"),
                             ({"tools": [{"type": "function", "function": {"name": "f"}}]},
                              "tools")]:
            s, body = http("POST", "/v1/chat/completions",
                           {"model": "council", "messages": ASK, **extra})
            self.assertEqual(s, 400, (extra, body))
            self.assertEqual(body["error"]["param"], param)
        s, body = http("POST", "/v1/completions", {"model": "council", "prompt": ["a", "b"]})
        self.assertEqual((s, body["error"]["param"]), (400, "prompt"))
        s, body = http("POST", "/api/chat", {"model": "council", "messages": ASK,
                                             "format": "json"})
        self.assertEqual(s, 400)
        s, body = http("POST", "/v1/chat/completions",
                       {"model": "council", "messages": ASK, "include_candidates": "yes"})
        self.assertEqual(s, 400)


if __name__ == "__main__":
    run_tests()
