"""`python -m training.triplets`: rules on real captions, the LLM path against a scripted local server
(valid, malformed, 429, 500, slow answers, kill and rerun), bad input, and the §6 output format."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
import time

import pytest
from fake_openai_server import FakeOpenAIServer, Reply
from harness import REPO_ROOT

from semclip_kernels.triplets import SEPARATOR, read_triplet_csv
from training.paths import SUGARCREPE_PP_CSV
from training.triplets.cli import main
from training.triplets.llm import LLMGenerator, LLMSettings
from training.triplets.rules import (
    RulesGenerator,
    coordination_rule,
    detokenize,
    finish,
    frame_rule,
    negate_edits,
    passive_rule,
    relative_rule,
    swap_edits,
    there_rule,
    tokenize,
    with_rule,
)
from training.triplets.validate import word_key

REPO = REPO_ROOT


def real_captions() -> list[str]:
    """The COCO captions of the SugarCrepe++ file that ships in training/evaluation_data/."""
    with open(SUGARCREPE_PP_CSV, encoding="utf-8") as f:
        return [row["caption"] for row in csv.DictReader(f)]


def write_pairs(path, captions, header=("filepath", "caption"), delimiter=","):
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter, lineterminator="\n")
        writer.writerow(header)
        for i, caption in enumerate(captions):
            writer.writerow([f"images/{i}.jpg", caption])


def read_output(path):
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def llm_args(server, pairs, out, *extra):
    return ["--input", str(pairs), "--output", str(out), "--generator", "llm", "--base-url", server.base_url,
            "--model", "fake-model", "--no-progress", "--backoff", "0.01", *extra]


# ----------------------------------------------------------------------------- rules


def detok(tokens):
    return detokenize(tokens) if tokens is not None else None


@pytest.mark.parametrize("rule, caption, expected", [
    (there_rule, "A dog is sitting on a bench.", "There is a dog sitting on a bench."),
    (there_rule, "Two men ordering food from a small restaurant.",
     "There are two men ordering food from a small restaurant."),
    (there_rule, "A woman sits at a counter.", "There is a woman sitting at a counter."),
    (there_rule, "There are women that are laughing under the umbrella",
     "Women are laughing under the umbrella"),
    (there_rule, "A vase of flowers on a dining table.", "There is a vase of flowers on a dining table."),
    (relative_rule, "A black cat that is sitting in a sink.", "A black cat sitting in a sink."),
    (passive_rule, "A man is holding an umbrella in the rain.", "An umbrella is being held by a man in the rain."),
    (passive_rule, "A woman holds a cat.", "A cat is held by a woman."),
    (passive_rule, "A person holding a fork and reaching for a slice of pizza.", None),  # "and ..." is the person's
    (coordination_rule, "A fork and a knife on a plate.", "A knife and a fork on a plate."),
    (coordination_rule, "A man in black shirt and white shorts.", "A man in white shorts and black shirt."),
    (coordination_rule, "A black and white cat on a bed.", None),  # adjectives sharing a noun stay put
    (with_rule, "A white plate with a donut.", "A white plate that has a donut."),
    (with_rule, "A room that has two televisions in it.", "A room with two televisions in it."),
    (frame_rule, "A cat is way up in a tree.", "In this picture, a cat is way up in a tree."),
    (frame_rule, "A picture of a cat in a tree.", None),  # already framed
])
def test_paraphrase_rules_rewrite_known_patterns(rule, caption, expected):
    rewritten = rule(tokenize(caption))
    assert (finish(rewritten, caption) if rewritten is not None else None) == expected


def test_negation_rules_make_minimal_edits():
    assert [detok(t) for t in swap_edits(tokenize("a red car next to a blue bus"))][0] == \
        "a blue car next to a red bus"
    assert [detok(t) for t in negate_edits(tokenize("A dog is sitting on a bench."))] == \
        ["A dog is not sitting on a bench."]
    assert [detok(t) for t in negate_edits(tokenize("A man without a shirt."))] == ["A man with a shirt."]
    assert [detok(t) for t in negate_edits(tokenize("There is a cat on the bed."))] == ["There is no cat on the bed."]
    assert [detok(t) for t in negate_edits(tokenize("A woman sits at a counter."))] == \
        ["A woman does not sit at a counter."]


def test_rules_on_real_captions_are_valid_deterministic_and_cover_most():
    captions = real_captions()[::10]  # every tenth of the 4,757 SugarCrepe++ COCO captions
    generator = RulesGenerator()
    covered = 0
    for caption in captions:
        paraphrases, negations, problem = generator.generate(caption, 1, 1)
        for text in paraphrases + negations:
            assert text.strip() and word_key(text) != word_key(caption), (caption, text)
            assert "||" not in text
        if paraphrases and negations:
            assert word_key(paraphrases[0]) != word_key(negations[0])
        assert (problem is None) == (len(paraphrases) == 1 and len(negations) == 1)
        covered += problem is None
        assert generator.generate(caption, 1, 1) == (paraphrases, negations, problem)
    share = covered / len(captions)
    assert share >= 0.95, f"rules covered only {share:.1%} of {len(captions)} real captions"  # measured 97.1%


def test_rules_cli_writes_section6_triplets_readable_by_training(tmp_path):
    captions = ["A dog is sitting on a red couch.", "Two zebras standing in a field.",
                "A man holding an umbrella in the rain."]
    write_pairs(tmp_path / "pairs.csv", captions)
    out = tmp_path / "out" / "triplets.csv"
    assert main(["--input", str(tmp_path / "pairs.csv"), "--output", str(out), "--paraphrases", "2",
                 "--negations", "2", "--no-progress"]) == 0
    rows = read_output(out)
    assert [r["caption"] for r in rows] == captions
    assert [r["filepath"] for r in rows] == [os.path.join("..", "images", f"{i}.jpg") for i in range(3)]
    for i in range(3):
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "images" / f"{i}.jpg").write_bytes(b"")
    triplets = read_triplet_csv(str(out), bad_rows="error")  # what training.train and open_clip_train read
    assert [len(t.paraphrases) for t in triplets] == [2, 2, 2] and [len(t.negations) for t in triplets] == [2, 2, 2]
    assert [os.path.normpath(t.image_path) for t in triplets] == [str(tmp_path / "images" / f"{i}.jpg")
                                                                  for i in range(3)]


# ----------------------------------------------------------------------------- bad input


def test_bad_rows_are_named_by_file_and_line_or_skipped_and_listed(tmp_path, capsys):
    pairs = tmp_path / "pairs.csv"
    pairs.write_bytes(b"\xef\xbb\xbffilepath,caption\n"
                      b"a.jpg,A dog is sitting on a bench.\n"
                      b"b.jpg,\n"
                      b"c.jpg,A caf\xe9 with a red door.\n"
                      b"d.jpg,A cat,extra\n"
                      b'e.jpg,"A man holding\nan umbrella."\n'
                      b",A bus on a street.\n")
    out = tmp_path / "triplets.csv"
    assert main(["--input", str(pairs), "--output", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    for line, reason in [(3, "empty 'caption'"), (4, "undecodable bytes"), (5, "3 field(s)"), (8, "empty 'filepath'")]:
        assert f"{pairs}:{line}: {reason}" in err
    assert not out.exists()
    assert main(["--input", str(pairs), "--output", str(out), "--no-progress", "--bad-rows", "skip"]) == 0
    err = capsys.readouterr().err
    assert f"{pairs}:4: skipped bad row: undecodable bytes" in err and "4 bad input row(s) skipped" in err
    assert [r["caption"] for r in read_output(out)] == ["A dog is sitting on a bench.",
                                                        "A man holding an umbrella."]


def test_missing_column_and_tsv_with_open_clip_keys(tmp_path, capsys):
    tsv = tmp_path / "pairs.tsv"
    write_pairs(tsv, ["A dog is sitting on a bench."], header=("filepath", "title"), delimiter="\t")
    out = tmp_path / "t.csv"
    assert main(["--input", str(tsv), "--output", str(out), "--no-progress"]) == 2
    assert f"{tsv}:1: missing column(s) 'caption'" in capsys.readouterr().err
    assert main(["--input", str(tsv), "--output", str(out), "--separator", ",", "--caption-key", "title",
                 "--no-progress"]) == 2
    assert "is the separator ',' right?" in capsys.readouterr().err
    assert main(["--input", str(tsv), "--output", str(out), "--separator", r"\t", "--csv-caption-key", "title",
                 "--no-progress"]) == 0
    assert read_output(out)[0]["caption"] == "A dog is sitting on a bench."


# ----------------------------------------------------------------------------- LLM


def test_llm_retries_malformed_429_500_slow_and_invalid_answers(tmp_path, monkeypatch, capsys):
    bad_first = {
        "malformed json": Reply(content='{"paraphrases": ["oops"'),
        "rate limited": Reply(status=429, headers={"Retry-After": "0"}, body=b'{"error": "slow down"}'),
        "server error": Reply(status=500, body=b"boom"),
        "slow answer": Reply(delay=6),  # past --timeout 2 (the server stops waiting when the test ends)
        "too few negations": Reply(content=json.dumps({"paraphrases": ["In other words: too few negations"],
                                                       "negations": []})),
        "echoes the caption": Reply(content=json.dumps({"paraphrases": ["Echoes the caption!"],
                                                        "negations": ["It is false that it echoes"]})),
        "fenced json": Reply(content='```json\n{"paraphrases": ["p: fenced"], "negations": ["n: fenced"]}\n```'),
    }

    def script(caption, attempt):
        return bad_first[caption] if caption in bad_first and attempt == 0 else Reply()

    captions = ["all good"] + list(bad_first)
    write_pairs(tmp_path / "pairs.csv", captions)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with FakeOpenAIServer(script) as server:
        rc = main(llm_args(server, tmp_path / "pairs.csv", tmp_path / "t.csv", "--timeout", "2",
                           "--concurrency", "3", "--paraphrases", "1", "--negations", "1"))
    assert rc == 0, capsys.readouterr().err
    expected_asks = {caption: 2 for caption in bad_first} | {"all good": 1, "fenced json": 1}
    assert dict(server.asked) == expected_asks
    assert {r["authorization"] for r in server.requests} == {"Bearer sk-test"}
    assert all(r["body"]["response_format"] == {"type": "json_object"} and r["body"]["model"] == "fake-model"
               for r in server.requests)
    rows = read_output(tmp_path / "t.csv")
    assert [r["caption"] for r in rows] == captions
    assert rows[captions.index("fenced json")]["paraphrase"] == "p: fenced"
    assert rows[0]["paraphrase"] == "In other words 0: all good"
    assert rows[0]["negation"] == "It is false (0) that all good"
    err = capsys.readouterr().err
    assert "HTTP 429 1" in err and "HTTP 5xx 1" in err and "timeouts 1" in err and "invalid answers 3" in err


def test_retry_after_is_honoured_and_backoff_grows_with_jitter():
    replies = {0: Reply(status=429, headers={"Retry-After": "1"}), 1: Reply(status=503), 2: Reply(status=502),
               3: Reply(status=500)}
    with FakeOpenAIServer(lambda caption, attempt: replies.get(attempt, Reply())) as server:
        waits = []
        generator = LLMGenerator(LLMSettings(server.base_url, "m", backoff=0.2, timeout=2, max_retries=4),
                                 sleep=waits.append)
        outcome = generator.generate("A dog on a couch.", 1, 1)
    assert outcome.error is None and outcome.attempts == 5
    assert waits[0] == 1.0  # the server's Retry-After, not our backoff
    for retry, wait in enumerate(waits[1:], start=1):  # 0.2 * 2**retry, jittered into its upper half
        assert 0.1 * 2 ** retry <= wait <= 0.2 * 2 ** retry, (retry, wait)


def test_llm_failures_are_listed_and_filled_by_rules_fallback(tmp_path, capsys):
    captions = ["A dog is sitting on a red couch.", "never answered but fine"]
    write_pairs(tmp_path / "pairs.csv", captions)
    out = tmp_path / "t.csv"

    def script(caption, attempt):
        return Reply(status=500, body=b"down") if caption.startswith("A dog") else Reply()

    with FakeOpenAIServer(script) as server:
        assert main(llm_args(server, tmp_path / "pairs.csv", out, "--max-retries", "2")) == 1
        assert server.asked["A dog is sitting on a red couch."] == 3  # bounded: 1 + 2 retries
        err = capsys.readouterr().err
        assert f"{tmp_path / 'pairs.csv'}:2: not generated: HTTP 500: down (after 3 attempts)" in err
        with open(str(out) + ".failed.csv", encoding="utf-8") as f:
            assert [r["line"] for r in csv.DictReader(f)] == ["2"]
        assert [r["caption"] for r in read_output(out)] == ["never answered but fine"]
        assert main(llm_args(server, tmp_path / "pairs.csv", out, "--max-retries", "0", "--fallback", "rules")) == 0
        assert server.asked["never answered but fine"] == 1  # cached by the first run
    rows = read_output(out)
    assert [r["caption"] for r in rows] == captions
    assert rows[0]["paraphrase"] == RulesGenerator().generate(captions[0], 1, 1)[0][0]
    assert not os.path.exists(str(out) + ".failed.csv")  # no stale failure list


def test_unauthorized_stops_the_run(tmp_path, capsys):
    write_pairs(tmp_path / "pairs.csv", [f"caption number {i}" for i in range(12)])
    with FakeOpenAIServer(lambda caption, attempt: Reply(status=401, body=b"bad key")) as server:
        assert main(llm_args(server, tmp_path / "pairs.csv", tmp_path / "t.csv", "--concurrency", "1")) == 2
    assert len(server.requests) == 1  # not one request per caption: the first 401 stops every worker
    assert "unauthorized (is OPENAI_API_KEY set and valid?)" in capsys.readouterr().err


def test_kill_and_rerun_never_asks_twice_for_an_answered_caption(tmp_path):
    captions = [f"A photo of object number {i} on a table." for i in range(8)]
    write_pairs(tmp_path / "pairs.csv", captions)
    out = tmp_path / "t.csv"
    cache = tmp_path / "t.csv.cache.jsonl"
    release = threading.Event()

    def script(caption, attempt):  # caption 3's first request hangs until the client is dead
        return Reply(hold=release) if caption == captions[3] and attempt == 0 else Reply()

    with FakeOpenAIServer(script) as server:
        command = [sys.executable, "-m", "training.triplets"] + llm_args(server, tmp_path / "pairs.csv", out,
                                                                         "--concurrency", "1")
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while not (server.asked[captions[3]] == 1 and cache.exists()
                       and len(cache.read_text(encoding="utf-8").splitlines()) == 3):
                assert process.poll() is None, process.stderr.read().decode()
                assert time.monotonic() < deadline, "the first run never reached caption 3"
                time.sleep(0.05)
        finally:
            process.kill()
            process.wait(timeout=10)
            process.stderr.close()
        assert not out.exists()  # killed before the end: no partial output (atomic write)
        assert dict(server.answered) == {captions[i]: 1 for i in range(3)}  # caption 3 is still held
        release.set()  # (its answer now goes to a dead socket)
        rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert rerun.returncode == 0, rerun.stderr
        assert "3 in the cache" in rerun.stderr
    assert dict(server.asked) == {c: (2 if c == captions[3] else 1) for c in captions}
    rows = read_output(out)
    assert [r["caption"] for r in rows] == captions
    assert all(r["paraphrase"].startswith("In other words 0: ") and r["negation"] for r in rows)


def test_duplicates_are_asked_once_and_a_rerun_asks_nothing(tmp_path):
    captions = ["A dog on a couch.", "A cat on a mat.", "A dog on a couch.", "A bird on a wire."]
    write_pairs(tmp_path / "pairs.csv", captions)
    out = tmp_path / "t.csv"
    with FakeOpenAIServer() as server:
        assert main(llm_args(server, tmp_path / "pairs.csv", out, "--paraphrases", "2", "--negations", "3")) == 0
        first = out.read_text(encoding="utf-8")
        assert main(llm_args(server, tmp_path / "pairs.csv", out, "--paraphrases", "2", "--negations", "3")) == 0
        assert out.read_text(encoding="utf-8") == first
        assert sum(server.asked.values()) == 3  # three distinct captions, asked in the first run only
        assert main(llm_args(server, tmp_path / "pairs.csv", out, "--paraphrases", "1", "--negations", "1",
                             "--limit", "2")) == 0  # other counts are other settings: asked anew
        assert sum(server.asked.values()) == 5
    rows = read_output(out)
    assert [r["caption"] for r in rows] == captions[:2]
    first_rows = list(csv.DictReader(first.splitlines()))
    assert first_rows[0]["paraphrase"] == first_rows[2]["paraphrase"]
    assert first_rows[0]["negation"].count(SEPARATOR) == 2


def test_cache_survives_a_torn_last_line(tmp_path):
    from training.triplets.cache import AnswerCache

    path = tmp_path / "c.jsonl"
    with AnswerCache(str(path)) as cache:
        cache.put("k1", "caption one", ["p1"], ["n1"])
        cache.put("k2", "caption two", ["p2"], ["n2"])
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"key": "k3", "caption": "cap')  # the process died mid-write
    with AnswerCache(str(path)) as cache:
        assert sorted(cache.entries) == ["k1", "k2"]
        cache.put("k4", "caption four", ["p4"], ["n4"])
    with AnswerCache(str(path)) as cache:
        assert sorted(cache.entries) == ["k1", "k2", "k4"]


def test_the_tool_does_not_import_torch():
    probe = ("import sys, training.triplets.cli, training.triplets.measure; "
             "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", probe], cwd=REPO, timeout=60).returncode == 0
    help_text = subprocess.run([sys.executable, "-m", "training.triplets", "--help"], cwd=REPO, timeout=60,
                               capture_output=True, text=True)
    assert help_text.returncode == 0 and "--fallback" in help_text.stdout
