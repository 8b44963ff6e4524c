"""Self-consistency with capy's ensembles: accuracy on 50 short questions with checkable
answers (bench/consensus/questions.json: arithmetic, unit conversions, dates, capitals) of
- greedy (one candidate, temperature 0),
- one sample at temperature 0.7 (the mean over `--seeds` seeds, and their range),
- `vote` over 5 samples at temperature 0.7 (one batched request sharing the prompt),
for each model, and the wall time of the 5-sample vote against one sample's.

    target/e2e-venv/bin/python bench/consensus.py [--models smollm2-135m,gemma3-270m]
        [--seeds 3] [--max-tokens 32] [--shots 4] [--json]

Every mode is a virtual model of the same server (samples = 1 or 5, strategy vote), so
the answers are read by the same extractor: `last-number` for numbers, `exact` for
capitals (the model is asked for the city alone; an answer of at most six words naming the
city counts). Requests run one at a time, the modes interleaved per question.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "e2e"))
from e2e_server import Server, http  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = json.load(open(os.path.join(ROOT, "bench", "consensus", "questions.json")))


def config(models):
    out = ["ctx_size = 2048", "parallel = 8", f"models = {json.dumps(models)}"]
    for m in models:
        for kind, extract in [("num", "last-number"), ("cap", "exact")]:
            for n in (1, 5):
                out += [f"[virtual.{m}-{kind}-{n}]", 'kind = "ensemble"',
                        f"members = [{json.dumps(m)}]", f"samples = {n}",
                        'strategy = "vote"', f'extract = "{extract}"', 'deadline = "300s"']
    return "\n".join(out) + "\n"


def correct(answer, q):
    if answer is None:
        return False
    want = q["answer"].lower()
    if q["kind"] != "capitals":
        return answer == want
    words = answer.replace(",", " ").split()
    return answer == want or (want in words and len(words) <= 6)


# worked examples before the question (self-consistency is a few-shot method: Wang et al.
# 2022 prompt with exemplars); none of them is among the 50 questions
SHOTS = [("What is 5 + 9?", "14"), ("How many centimeters are in 2 meters?", "200"),
         ("How many days are in the month of June?", "30"),
         ("What is the capital of Portugal?", "Lisbon")]


def ask(url, model, q, temperature, seed, max_tokens, shots):
    what = "name of the city" if q["kind"] == "capitals" else "number"
    msgs = []
    for sq, sa in SHOTS[:shots]:
        msgs += [{"role": "user", "content": f"{sq} Reply with only the answer."},
                 {"role": "assistant", "content": sa}]
    msgs.append({"role": "user", "content": f"{q['question']} Reply with only the {what}."})
    body = {"model": model, "max_tokens": max_tokens, "temperature": temperature, "seed": seed,
            "messages": msgs}
    t = time.perf_counter()
    s, r = http(url, "POST", "/v1/chat/completions", body, timeout=600)
    took = time.perf_counter() - t
    if s != 200:
        raise RuntimeError(f"{model}: {s} {r}")
    return correct(r["ensemble"].get("answer"), q), took, r["ensemble"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--shots", type=int, default=4, help="worked examples first (0 to 4)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    models = a.models.split(",")
    tmp = tempfile.mkdtemp(prefix="capy-consensus-")
    cfg = os.path.join(tmp, "config.toml")
    with open(cfg, "w") as f:
        f.write(config(models))
    srv = Server("consensus", ["--config", cfg], models=())
    results = {}
    try:
        for m in models:
            greedy, votes, agree = [], [], []
            ones = [[] for _ in range(a.seeds)]
            t_one, t_vote = [], []
            by_kind = {}
            for qi, q in enumerate(QUESTIONS):
                kind = "cap" if q["kind"] == "capitals" else "num"
                seed = 1000 + 10 * qi
                ok, _, _ = ask(srv.url, f"{m}-{kind}-1", q, 0.0, seed, a.max_tokens, a.shots)
                greedy.append(ok)
                for s in range(a.seeds):
                    ok, took, _ = ask(srv.url, f"{m}-{kind}-1", q, 0.7, seed + 100 * s,
                                      a.max_tokens, a.shots)
                    ones[s].append(ok)
                    t_one.append(took)
                    # the vote right after one sample of the same seed: interleaved times
                    if s == 0:
                        ok, took, e = ask(srv.url, f"{m}-{kind}-5", q, 0.7, seed, a.max_tokens, a.shots)
                        votes.append(ok)
                        t_vote.append(took)
                        agree.append(e.get("agreement") or 0.0)
                k = by_kind.setdefault(q["kind"], {"greedy": 0, "one": 0.0, "vote": 0, "n": 0})
                k["greedy"] += greedy[-1]
                k["one"] += sum(o[-1] for o in ones) / a.seeds
                k["vote"] += votes[-1]
                k["n"] += 1
            one_accs = [sum(o) / len(o) for o in ones]
            results[m] = {
                "greedy": sum(greedy) / len(greedy),
                "one_sample": statistics.mean(one_accs),
                "one_sample_range": [min(one_accs), max(one_accs)],
                "vote5": sum(votes) / len(votes),
                "mean_agreement": statistics.mean(agree),
                "one_sample_s": statistics.mean(t_one),
                "vote5_s": statistics.mean(t_vote),
                "wall_ratio": statistics.mean(t_vote) / statistics.mean(t_one),
                "by_kind": by_kind,
            }
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    if a.json:
        print(json.dumps(results))
        return
    print(f"{len(QUESTIONS)} questions, {a.shots} worked examples first, temperature 0.7, "
          f"max_tokens {a.max_tokens}, one sample over {a.seeds} seeds")
    print(f"{'model':<14} {'greedy':>7} {'1 sample':>16} {'vote x5':>8} {'agree':>6} "
          f"{'1 sample s':>10} {'vote s':>7} {'ratio':>6}")
    for m, r in results.items():
        lo, hi = r["one_sample_range"]
        print(f"{m:<14} {r['greedy']:>7.0%} {r['one_sample']:>6.1%} ({lo:.0%}-{hi:.0%}) "
              f"{r['vote5']:>8.0%} {r['mean_agreement']:>6.2f} {r['one_sample_s']:>10.3f} "
              f"{r['vote5_s']:>7.3f} {r['wall_ratio']:>5.2f}x")
        for k, v in r["by_kind"].items():
            n = v["n"]
            print(f"  {k:<12} {v['greedy'] / n:>7.0%} {v['one'] / n:>16.1%} {v['vote'] / n:>8.0%}")


if __name__ == "__main__":
    main()
