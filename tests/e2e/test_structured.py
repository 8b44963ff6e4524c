"""End-to-end tests of structured outputs with the official `openai` and `ollama` clients.

Starts `capy serve` with both real models and checks:
- the bundled JSON schemas (tests/e2e/structured-schemas.json: objects, arrays, enums,
  nested, required/optional, number ranges, patterns, formats, combinations) x both models
  x greedy and sampled: every output parses and validates (the `jsonschema` package, with
  its format checker);
- `client.chat.completions.parse(response_format=PydanticModel)`, streaming, `n > 1` with
  logprobs, llama-server's `grammar` (GBNF) and `json_schema`, Ollama's `format`;
- clear 400s for what cannot be compiled.

Run by scripts/test.sh; alone: `target/e2e-venv/bin/python tests/e2e/test_structured.py`
(CAPY_BIN picks the binary). Prints a cargo-style `test result:` line.
"""

import concurrent.futures
import json
import os
import re
import typing
import unittest

import jsonschema
import pydantic

from e2e_server import MODELS, ROOT, Clients, Server, run_tests
from e2e_server import http as http_at

SCHEMAS = json.load(open(os.path.join(ROOT, "tests", "e2e", "structured-schemas.json")))
SERVER = None
URL = None
CLIENTS = Clients()


def http(method, path, body=None):
    return http_at(URL, method, path, body, timeout=300)


def setUpModule():
    global SERVER, URL
    SERVER = Server("structured", ["-c", "8192"])
    URL = CLIENTS.url = SERVER.url


def tearDownModule():
    CLIENTS.close()
    if SERVER:
        SERVER.stop()


oai = CLIENTS.openai
oll = CLIENTS.ollama


def validate(text, schema):
    value = json.loads(text)
    jsonschema.validate(value, schema, format_checker=jsonschema.FormatChecker())
    return value


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=30)
    age: int = pydantic.Field(ge=0, le=120)
    city: typing.Optional[str] = pydantic.Field(default=None, max_length=30)


class Schemas(unittest.TestCase):
    def test_bundled_schemas_validate_on_both_models_greedy_and_sampled(self):
        self.assertGreaterEqual(len(SCHEMAS), 50)
        jobs = [(m, t, s) for m in MODELS for t in (0.0, 0.8) for s in SCHEMAS]

        def one(job):
            model, temp, s = job
            r = oai().chat.completions.create(
                model=model, temperature=temp, seed=5, max_tokens=400,
                messages=[{"role": "user", "content": s["prompt"] + " Answer in JSON."}],
                response_format={"type": "json_schema", "json_schema": {
                    "name": s["name"], "schema": s["schema"], "strict": True}})
            c = r.choices[0]
            try:
                validate(c.message.content, s["schema"])
                return None
            except (ValueError, jsonschema.ValidationError) as e:
                return f"{model} temp={temp} {s['name']} ({c.finish_reason}): " \
                       f"{str(e)[:120]}: {c.message.content[:160]!r}"

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            failures = [f for f in pool.map(one, jobs) if f]
        self.assertEqual(failures, [], f"{len(failures)} of {len(jobs)} outputs failed")
        _, text = http("GET", "/metrics")
        count = re.search(r"^capy_grammar_mask_seconds_count (\d+)$", text, re.M)
        self.assertGreater(int(count.group(1)), len(jobs))

    def test_openai_parse_with_a_pydantic_model(self):
        for model in MODELS:
            with self.subTest(model=model):
                r = oai().chat.completions.parse(
                    model=model, temperature=0, max_tokens=200, response_format=Person,
                    messages=[{"role": "user", "content": "Invent a person: name, age, city."}])
                p = r.choices[0].message.parsed
                self.assertIsInstance(p, Person)
                self.assertTrue(0 <= p.age <= 120)

    def test_streaming_n_and_logprobs(self):
        schema = next(s["schema"] for s in SCHEMAS if s["name"] == "recipe")
        rf = {"type": "json_schema", "json_schema": {"name": "recipe", "schema": schema}}
        msgs = [{"role": "user", "content": "Write a tiny recipe as JSON."}]
        parts, finish = [], None
        for chunk in oai().chat.completions.create(model="gemma3-270m", messages=msgs,
                                                   temperature=0, max_tokens=300, stream=True,
                                                   response_format=rf):
            for c in chunk.choices:
                parts.append(c.delta.content or "")
                finish = c.finish_reason or finish
        self.assertEqual(finish, "stop")
        streamed = "".join(parts)
        validate(streamed, schema)
        whole = oai().chat.completions.create(model="gemma3-270m", messages=msgs,
                                              temperature=0, max_tokens=300, response_format=rf)
        self.assertEqual(whole.choices[0].message.content, streamed)
        # two sampled choices, each constrained on its own; logprobs are the model's
        r = oai().chat.completions.create(model="smollm2-135m", messages=msgs, n=2, seed=3,
                                          temperature=1.0, max_tokens=300, response_format=rf,
                                          logprobs=True, top_logprobs=2)
        self.assertEqual(len(r.choices), 2)
        for c in r.choices:
            validate(c.message.content, schema)
            lps = c.logprobs.content
            self.assertEqual("".join(t.token for t in lps), c.message.content)
            self.assertTrue(all(t.logprob <= 0 for t in lps))
            self.assertTrue(all(len(t.top_logprobs) == 2 for t in lps))

    def test_json_object_mode(self):
        r = oai().chat.completions.create(
            model="smollm2-135m", temperature=0, max_tokens=300,
            response_format={"type": "json_object"},
            messages=[{"role": "user", "content": "Describe the moon in JSON."}])
        self.assertIsInstance(json.loads(r.choices[0].message.content), dict)

    def test_llama_server_grammar_and_json_schema(self):
        gbnf = 'root ::= "The answer is " answer "."\nanswer ::= "yes" | "no" | [0-9]{1,3}\n'
        for seed in range(3):
            r = oai().completions.create(model="smollm2-135m", prompt="Is the sky blue?",
                                         max_tokens=20, temperature=1.0, seed=seed,
                                         extra_body={"grammar": gbnf})
            self.assertRegex(r.choices[0].text, r"^The answer is (yes|no|[0-9]{1,3})\.$")
            self.assertEqual(r.choices[0].finish_reason, "stop")
        schema = {"type": "object", "properties": {"ok": {"type": "boolean"}},
                  "required": ["ok"], "additionalProperties": False}
        r = oai().completions.create(model="gemma3-270m", prompt="Answer in JSON: is fire hot?",
                                     max_tokens=40, temperature=0,
                                     extra_body={"json_schema": schema})
        validate(r.choices[0].text, schema)

    def test_ollama_format(self):
        r = oll().chat(model="gemma3-270m", format=Person.model_json_schema(),
                       messages=[{"role": "user", "content": "Invent a person as JSON."}],
                       options={"temperature": 0, "num_predict": 200})
        p = Person.model_validate_json(r.message.content)
        self.assertTrue(p.name)
        r = oll().generate(model="smollm2-135m", prompt="Describe a cat in JSON.",
                           format="json", options={"temperature": 0.7, "num_predict": 300})
        self.assertIsInstance(json.loads(r.response), dict)
        self.assertEqual(r.done_reason, "stop")

    def test_what_cannot_be_compiled_is_a_clear_400(self):
        cases = [
            ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
                "name": "x", "schema": {"type": "string", "format": "no-such-format"}}}},
             "response_format", "no-such-format"),
            ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
                "name": "x", "schema": {"type": "object", "properties": {
                    "a": {"$ref": "#/$defs/missing"}}}}}},
             "response_format", "missing"),
            ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
                "name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}}},
             "response_format", "minimum"),
            ("/v1/chat/completions", {"response_format": {"type": "yaml"}},
             "response_format.type", "yaml"),
            ("/v1/completions", {"grammar": "root ::= item\n"}, "grammar", "item"),
            ("/v1/completions", {"grammar": "root ::= [a-z"}, "grammar",
             "unterminated character class"),
            ("/v1/completions", {"json_schema": "not a schema"}, "json_schema", "schema"),
        ]
        for path, extra, param, words in cases:
            with self.subTest(extra=extra):
                body = {"model": "smollm2-135m", "max_tokens": 4, **extra}
                if path == "/v1/completions":
                    body["prompt"] = "Hi"
                else:
                    body["messages"] = [{"role": "user", "content": "Hi"}]
                status, v = http("POST", path, body)
                self.assertEqual(status, 400, v)
                self.assertEqual(v["error"]["param"], param, v)
                self.assertIn(words, v["error"]["message"], v)
        status, v = http("POST", "/api/generate", {"model": "smollm2-135m", "prompt": "Hi",
                                                   "format": "yaml"})
        self.assertEqual(status, 400, v)
        self.assertIn("format", v["error"])
        # the server is fine afterwards
        r = oai().chat.completions.create(model="smollm2-135m", max_tokens=4,
                                          messages=[{"role": "user", "content": "Hi"}])
        self.assertTrue(r.choices[0].message.content)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Adds two integers",
    "parameters": {"type": "object", "properties": {
        "a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}


def check_call(call, tools):
    """A call names one of `tools` and its arguments fit that tool's parameters."""
    spec = next(t["function"] for t in tools if t["function"]["name"] == call.function.name)
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, spec["parameters"])
    return args


class BreakerFindings(unittest.TestCase):
    """Found by trying to break it: a deep grammar overflowed the compiler's stack and killed
    the server; tools whose parameters use $defs were refused; grammars that accept nothing
    or overflow the parser's limits were 500s; a complete grammar ended with "length"."""

    def chat(self, **extra):
        return http("POST", "/v1/chat/completions", {
            "model": "smollm2-135m", "max_tokens": 20,
            "messages": [{"role": "user", "content": "Hi"}], **extra})

    def test_deep_wide_and_empty_grammars_are_400s_and_the_server_lives(self):
        chain = "\n".join(["root ::= r0"] + [f'r{i} ::= "x{i}" | r{i + 1}' for i in range(1000)]
                          + ['r1000 ::= "end"'])
        refs = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(3000)}
        refs["d3000"] = {"type": "integer"}
        wide = {"type": "object", "properties": {f"p{i}": {"type": "integer"}
                                                 for i in range(10000)}}
        cases = [
            ({"grammar": chain}, "grammar"),
            ({"response_format": {"type": "json_schema", "json_schema": {
                "name": "x", "schema": {"$ref": "#/$defs/d0", "$defs": refs}}}}, None),
            ({"response_format": {"type": "json_schema", "json_schema": {
                "name": "x", "schema": wide}}}, "response_format"),
            ({"response_format": {"type": "json_schema", "json_schema": {
                "name": "x", "schema": {"$ref": "#"}}}}, "response_format"),
            ({"grammar": "root ::= root"}, "grammar"),
            ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
                "$ref": "#"}}}], "tool_choice": "required"}, None),
        ]
        for extra, param in cases:
            with self.subTest(extra=str(extra)[:80]):
                status, v = self.chat(**extra)
                self.assertIn(status, (200, 400), v)
                if status == 400:
                    self.assertLess(len(v["error"]["message"]), 1200)
                    if param:
                        self.assertEqual(v["error"]["param"], param, v)
                self.assertEqual(http("GET", "/health")[0], 200)

    def test_tool_parameters_with_defs(self):
        unit = {"$defs": {"Unit": {"type": "string", "enum": ["C", "F"]}}, "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20},
                               "unit": {"$ref": "#/$defs/Unit"}},
                "required": ["city", "unit"]}
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": unit}}]
        r = oai().chat.completions.create(
            model="smollm2-135m", tools=tools, tool_choice="required", temperature=0,
            max_tokens=80, messages=[{"role": "user", "content": "Weather in Paris?"}])
        args = json.loads(r.choices[0].message.tool_calls[0].function.arguments)
        jsonschema.validate(args, unit)

    def test_cut_calls_leave_no_markup_and_completions_take_response_format(self):
        r = oai().chat.completions.create(
            model="gemma3-270m", tools=[WEATHER], tool_choice="required", max_tokens=6,
            messages=[{"role": "user", "content": "Weather in Paris?"}])
        c = r.choices[0]
        self.assertEqual(c.finish_reason, "length")
        self.assertNotIn("<tool_call>", c.message.content or "")
        r = oai().completions.create(model="smollm2-135m", prompt="A JSON object:",
                                     max_tokens=200, temperature=0,
                                     extra_body={"response_format": {"type": "json_object"}})
        self.assertIsInstance(json.loads(r.choices[0].text), dict)

    def test_a_complete_grammar_stops(self):
        r = oai().completions.create(model="smollm2-135m", prompt="x", max_tokens=1,
                                     extra_body={"grammar": 'root ::= "ab"'})
        self.assertEqual(r.choices[0].text, "ab")
        self.assertEqual(r.choices[0].finish_reason, "stop")


class Tools(unittest.TestCase):
    def test_openai_round_trip_required_then_answer(self):
        for model in MODELS:
            with self.subTest(model=model):
                msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
                r = oai().chat.completions.create(model=model, messages=msgs,
                                                  tools=[WEATHER, ADD], tool_choice="required",
                                                  temperature=0, max_tokens=200)
                c = r.choices[0]
                self.assertEqual(c.finish_reason, "tool_calls")
                self.assertGreaterEqual(len(c.message.tool_calls), 1)
                for call in c.message.tool_calls:
                    self.assertTrue(call.id.startswith("call_"))
                    self.assertEqual(call.type, "function")
                    check_call(call, [WEATHER, ADD])
                call = c.message.tool_calls[0]
                msgs.append(c.message.model_dump(exclude_none=True))
                msgs.append({"role": "tool", "tool_call_id": call.id,
                             "content": json.dumps({"temperature_c": 21, "sky": "sunny"})})
                final = oai().chat.completions.create(model=model, messages=msgs,
                                                      tools=[WEATHER, ADD], tool_choice="none",
                                                      temperature=0, max_tokens=60)
                f = final.choices[0]
                self.assertIsNone(f.message.tool_calls)
                self.assertTrue(f.message.content)
                self.assertIn(f.finish_reason, ("stop", "length"))
                # the call and its result reached the prompt
                base = oai().chat.completions.create(model=model, messages=msgs[:1],
                                                     max_tokens=1)
                self.assertGreater(final.usage.prompt_tokens, base.usage.prompt_tokens + 10)

    def test_openai_streamed_calls_assemble(self):
        for model in MODELS:
            with self.subTest(model=model):
                calls, finish, text = {}, None, []
                for chunk in oai().chat.completions.create(
                        model=model, stream=True, temperature=0, max_tokens=200,
                        messages=[{"role": "user", "content": "Add 2 and 3."}],
                        tools=[WEATHER, ADD], tool_choice={"type": "function",
                                                           "function": {"name": "add"}}):
                    for ch in chunk.choices:
                        finish = ch.finish_reason or finish
                        text.append(ch.delta.content or "")
                        for d in ch.delta.tool_calls or []:
                            slot = calls.setdefault(d.index, {"name": "", "arguments": ""})
                            slot["name"] += d.function.name or ""
                            slot["arguments"] += d.function.arguments or ""
                self.assertEqual(finish, "tool_calls")
                self.assertEqual("".join(text), "")
                self.assertEqual([c["name"] for c in calls.values()], ["add"])
                args = json.loads(calls[0]["arguments"])
                self.assertIsInstance(args["a"], int)
                self.assertIsInstance(args["b"], int)
                # the round trip, streamed: the call and its result, then the answer
                msgs = [{"role": "user", "content": "Add 2 and 3."},
                        {"role": "assistant", "content": None, "tool_calls": [
                            {"id": "call_1", "type": "function",
                             "function": {"name": "add", "arguments": calls[0]["arguments"]}}]},
                        {"role": "tool", "tool_call_id": "call_1",
                         "content": str(args["a"] + args["b"])}]
                parts, finish = [], None
                for chunk in oai().chat.completions.create(
                        model=model, stream=True, temperature=0, max_tokens=40, messages=msgs,
                        tools=[WEATHER, ADD], tool_choice="none"):
                    for ch in chunk.choices:
                        finish = ch.finish_reason or finish
                        parts.append(ch.delta.content or "")
                        self.assertFalse(ch.delta.tool_calls)
                self.assertTrue("".join(parts))
                self.assertIn(finish, ("stop", "length"))

    def test_ollama_tools_with_a_python_function(self):
        def get_weather(city: str) -> str:
            """Get the current weather in a city.

            Args:
                city: The city's name
            """
            return "sunny"

        # Ollama has no tool_choice: the model decides; Gemma 3 270M calls for this prompt
        # about one time in five when sampling, so 32 seeds
        def one(seed):
            return oll().chat(model="gemma3-270m", tools=[get_weather],
                              messages=[{"role": "user", "content": "Call get_weather for Paris."}],
                              options={"temperature": 0.7, "seed": seed, "num_predict": 80})

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(one, range(32)))
        calls = [c for r in answers for c in (r.message.tool_calls or [])]
        self.assertGreater(len(calls), 0)
        for c in calls:
            self.assertEqual(c.function.name, "get_weather")
            self.assertIsInstance(c.function.arguments["city"], str)
        # a history with a call and its result, in Ollama's shape
        r = oll().chat(model="smollm2-135m", tools=[get_weather], options={"temperature": 0},
                       messages=[
                           {"role": "user", "content": "What is the weather in Paris?"},
                           {"role": "assistant", "content": "", "tool_calls": [
                               {"function": {"name": "get_weather",
                                             "arguments": {"city": "Paris"}}}]},
                           {"role": "tool", "content": "sunny", "tool_name": "get_weather"}])
        self.assertTrue(r.message.content or r.message.tool_calls)

    def test_bad_tools_are_clear_400s(self):
        msgs = [{"role": "user", "content": "Hi"}]
        cases = [
            ({"tools": [{"type": "function", "function": {"description": "no name"}}]},
             "tools[0].function.name", "needs a name"),
            ({"tools": [{"type": "function", "function": {"name": "has space"}}]},
             "tools[0].function.name", "letters"),
            ({"tools": [{"type": "retrieval"}]}, "tools[0].type", "function"),
            ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name", "two tools"),
            ({"tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]},
             "tools[0].function.parameters", "schema"),
            ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
                "type": "string"}}}]}, "tools[0].function.parameters", "object"),
            ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
             "response_format.json_schema.name", "name"),
            ({"tools": [WEATHER], "tool_choice": {"type": "function",
                                                  "function": {"name": "get_time"}}},
             "tool_choice", "get_time"),
            ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "sometimes"),
            ({"tool_choice": "required"}, "tool_choice", "only allowed"),
            ({"tools": [WEATHER], "response_format": {"type": "json_object"}},
             "response_format", "tools"),
            ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
                "type": "object", "properties": {"x": {"type": "string",
                                                       "format": "no-such"}}}}}],
              "tool_choice": "required"}, "tools", "no-such"),
        ]
        for extra, param, words in cases:
            with self.subTest(extra=extra):
                status, v = http("POST", "/v1/chat/completions",
                                 {"model": "smollm2-135m", "messages": msgs, **extra})
                self.assertEqual(status, 400, v)
                self.assertEqual(v["error"]["param"], param, v)
                self.assertIn(words, v["error"]["message"], v)
        status, v = http("POST", "/api/chat", {"model": "smollm2-135m", "messages": msgs,
                                               "tools": [{"function": {"parameters": {}}}]})
        self.assertEqual(status, 400, v)
        self.assertIn("needs a name", v["error"])


if __name__ == "__main__":
    run_tests()
