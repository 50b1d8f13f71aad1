"""classtext.py against a real HTTP server on 127.0.0.1, started here, that speaks the Chat
Completions API with scripted answers, through the real `openai` client: a written folder trains
both methods, a second `write` sends nothing, --dry-run sends nothing, the key is nowhere in the file
or the output, short and bad answers are asked again, server errors are retried or end in one line,
Ctrl-C keeps what was written; `import` and `check`; --class-text keys the run folders. No test
leaves this machine."""
import hashlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import biomedap
import biomedvr
import classtext
import common
import data
import runner
import test_class_text
import zeroshot
from common import UserError

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-test-Secret1234567890abcdef"
SMALL = ["--descriptions", "4", "--distinctive", "2", "--confusions", "2"]
TEMPLATE = "a MR photo of a {} in the brain."
_numbers = itertools.count(1)  # every sentence the server writes is new


# ------------------------------------------------------------------ the server
def asked(body) -> tuple[str, str, int]:
    """(class, field, count) of a request, read from our prompt as a real model reads it."""
    user = body["messages"][-1]["content"]
    count, name = re.search(r'Write (\d+) sentences?\D*?"([^"]+)"', user).groups()
    field = ("confusions" if "easily mistaken" in user else "distinctive" if "sets" in user else "descriptions")
    return name, field, int(count)


def sentences(name, field, count) -> list[str]:
    """`count` new sentences for the class and field, each fit for it (confusions: 20+ words)."""
    out = []
    for _ in range(count):
        n = next(_numbers)
        if field == "confusions":
            out.append(f"A look-alike called mimic {n} can be mistaken for {name} because both are round and "
                       f"bright, but mimic {n} has a thin dark rim that {name} never shows.")
        else:
            out.append(f"In these images {name} shows {field} finding {n} with a smooth border and even texture.")
    return out


def answer(content, usage=True) -> tuple:
    body = {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "test-model",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}]}
    if usage:
        body["usage"] = {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150}
    return 200, {}, body


def good(body):
    return answer(json.dumps({"sentences": sentences(*asked(body))}))


def numbered(body):
    lines = [f"{i}. {s}" for i, s in enumerate(sentences(*asked(body)), 1)]
    return answer("Here are the sentences:\n" + "\n".join(lines))


def error(status, message, code=None, headers=None):
    return lambda body: (status, headers or {}, {"error": {"message": message, "type": "error", "code": code}})


class ChatServer:
    """POST /v1/chat/completions on 127.0.0.1: each request gets the next scripted reply (a function
    of the request body giving (status, headers, JSON body), optionally after `delay` seconds),
    then `default`. Every request is kept: (headers, body)."""

    def __init__(self, default=good):
        self.script, self.default, self.requests, self.delay = [], default, [], 0.0
        self.arrived, self.replied = [], []  # (time.monotonic(), body) of each request, (time, status) of each reply
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                server.arrived.append((time.monotonic(), body))
                reply = server.script.pop(0) if server.script else server.default
                time.sleep(server.delay(body) if callable(server.delay) else server.delay)
                status, headers, payload = reply(body)
                server.replied.append((time.monotonic(), status))
                raw = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for k, v in {"Content-Type": "application/json", **headers}.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                except OSError:
                    pass  # the client gave up (a timeout test)

            def log_message(self, *args):
                pass
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/v1"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def bodies(self):
        return [body for _, body in self.requests]


@pytest.fixture
def server():
    chat = ChatServer()
    yield chat
    chat.http.shutdown()
    chat.http.server_close()


@pytest.fixture(autouse=True)
def key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # a proxy in the environment must not take loopback


def own_folder(folder, classes=("glioma_tumor", "meningioma_tumor", "pituitary_tumor", "normal_brain"), images=4):
    """Small generated PNGs, one sub-folder per class, each class its own grey level."""
    return test_class_text.own_folder(folder, classes, images, grey=(40, 50, 15))


def write(server, folder, *flags, capsys=None):
    """classtext.py write FOLDER against `server` (a new file gets a template naming the modality):
    (exit code, stdout, stderr)."""
    template = [] if (folder / "prompts.json").exists() or "--template" in flags else ["--template", TEMPLATE]
    code = classtext.cli(["write", str(folder), "--model", "test-model", "--base-url", server.url, *template, *flags])
    out = capsys.readouterr() if capsys else None
    return code, out.out if out else "", out.err if out else ""


# ------------------------------------------------------------------ write, train, write again
def test_written_text_trains_both_methods_and_a_second_write_sends_nothing(tmp_path, server, backbones,
                                                                            monkeypatch, capsys):
    folder = own_folder(tmp_path / "scans")
    code, out, err = write(server, folder, *SMALL, capsys=capsys)
    assert code == 0, err
    path = folder / "prompts.json"
    text = json.loads(path.read_text(encoding="utf-8"))
    names = ["glioma tumor", "meningioma tumor", "normal brain", "pituitary tumor"]
    assert list(text["classes"]) == names
    assert all([len(text["classes"][n][f]) for f in classtext.TEXT_FIELDS] == [4, 2, 2] for n in names)
    assert len(server.requests) == 12 and "12 request(s)" in out and "tokens: 1,200 prompt + 600 completion" in out
    # the requests: our prompts, the template's modality, the other classes named, a JSON schema
    first = server.bodies()[0]
    assert first["temperature"] == 0.7 and first["response_format"] == classtext.ANSWER_FORMAT
    user = first["messages"][1]["content"]
    assert 'captioned like "a MR photo of a' in user and all(f'"{n}"' in user for n in names)
    assert all(headers["authorization"] == f"Bearer {KEY}" for headers, _ in server.requests)
    # how it was made, and never the key
    [record] = text["_"]
    assert record["model"] == "test-model" and record["server"] == server.url.split("/")[2]
    assert record["prompts"] == classtext.PROMPTS and record["answers"] == "json schema"
    assert record["temperature"] == 0.7 and record["date"] and record["openai"] and record["requests"] == 12
    assert KEY not in path.read_text() and KEY not in out + err and KEY[:12] not in out + err

    code, out, _ = write(server, folder, *SMALL, capsys=capsys)
    assert code == 0 and "nothing to ask" in out and len(server.requests) == 12

    # both methods train on it: BiomedAP through --class-text (a folder of its own), BioMedVR on the folder's own
    monkeypatch.setattr(common, "load_backbone", lambda name, device: backbones(name))
    run = dict(dataset=str(folder), shots=2, epochs=1, workers=0, device="cpu")
    ap = runner.run(biomedap, runner.cli_args(biomedap)(backbone="tiny", out=str(tmp_path / "runs"), class_text=str(path), **run))
    vr = runner.run(biomedvr, runner.cli_args(biomedvr)(backbone="tiny-clip", frame=4, batch_size=4, out=str(tmp_path / "runs"), **run))
    assert ap["test"]["n"] == vr["test"]["n"] > 0
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    [ap_metrics] = (tmp_path / "runs").glob("tiny/text-*/biomedap/scans/2shot/seed1/metrics.json")
    assert ap_metrics.parts[-6] == f"text-{digest[:8]}"
    assert json.loads(ap_metrics.read_text())["class_text_file"] == {"path": str(path.resolve()), "sha256": digest}
    assert (tmp_path / "runs" / "tiny-clip" / "biomedvr" / "scans" / "2shot" / "seed1" / "metrics.json").is_file()
    path.write_text(path.read_text() + "\n")  # the text changed since: evaluating the run on it is refused
    with pytest.raises(UserError, match="has changed since .* was trained"):
        runner.run(biomedap, runner.cli_args(biomedap)(eval_only=str(ap_metrics.parent)))


def test_dry_run_prints_every_request_and_sends_none(tmp_path, server, capsys, monkeypatch):
    folder = own_folder(tmp_path / "scans", ("a_spot", "b_ring"))
    code, out, err = write(server, folder, *SMALL, capsys=capsys)
    assert code == 0
    text = json.loads((folder / "prompts.json").read_text())
    text["classes"]["a spot"]["descriptions"] = text["classes"]["a spot"]["descriptions"][:1]  # 3 missing
    (folder / "prompts.json").write_text(json.dumps(text))
    sent = len(server.requests)
    monkeypatch.delenv("OPENAI_API_KEY")  # a dry run needs no key, even for a server that would
    code = classtext.cli(["write", str(folder), "--model", "m", "--base-url", "https://api.example.com/v1",
                          *SMALL, "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0 and len(server.requests) == sent
    assert out.startswith("dry run: 1 request(s) to https://api.example.com/v1/chat/completions")
    body = json.loads(out[out.index("{"):])
    assert body["model"] == "m" and body["messages"][1]["content"].count("- In these images") == 1
    assert "Write 3 sentences" in body["messages"][1]["content"]
    assert json.loads((folder / "prompts.json").read_text()) == text  # nothing written


# ------------------------------------------------------------------ answers that fall short
def refusal(body):
    return answer("I'm sorry, but I can't help with that request.")


def too_few(body):
    name, field, count = asked(body)
    return answer(json.dumps({"sentences": sentences(name, field, max(1, count // 2))}))


def with_repeats(body):
    name, field, count = asked(body)
    made = sentences(name, field, count - 1)
    return answer(json.dumps({"sentences": [made[0], made[0].upper(), *made[1:]]}))  # one repeat, case aside


def cut_json(body):
    name, field, count = asked(body)
    return answer(json.dumps({"sentences": sentences(name, field, count)})[:-30])  # a length limit hit mid-string


def garbage(body):
    return answer('{sentences: [oops')  # JSON in name only


def bad_lines(body):
    name, field, count = asked(body)
    return answer(json.dumps({"sentences": ["short.", "{} is the slot of the template, said back",
                                            *sentences(name, field, count - 2)]}))


@pytest.mark.parametrize("first", [too_few, with_repeats, refusal, cut_json, garbage, bad_lines])
def test_short_answers_are_asked_again_for_what_is_missing(tmp_path, server, capsys, first):
    folder = own_folder(tmp_path / "scans", ("a_spot", "b_ring"))
    server.script = [first]
    code, out, err = write(server, folder, "--descriptions", "4", "--distinctive", "0", "--confusions", "0",
                           "--jobs", "1", capsys=capsys)
    assert code == 0, err
    text = json.loads((folder / "prompts.json").read_text())
    kept = text["classes"]["a spot"]["descriptions"]
    assert len(kept) == 4 and len({classtext.sentence_key(s) for s in kept}) == 4
    assert all(classtext.sentence_problem(s, "descriptions") is None for s in kept)
    assert len(server.requests) == 3  # class a's answer and its re-ask, class b's answer
    again = server.bodies()[1]["messages"][1]["content"]
    before = [s for s in kept if s in again]  # what the first answer gave, listed not to be repeated
    assert f"Write {4 - len(before)} sentence" in again
    assert ("already written; do not repeat" in again) == (first not in (refusal, garbage))


def test_a_sentence_of_another_class_is_left_out_and_asked_again(tmp_path, server, capsys):
    folder = own_folder(tmp_path / "scans", ("a_spot", "b_ring"))

    def repeat_a(body):  # class b's answer starts with a sentence class a already has
        taken = json.loads((folder / "prompts.json").read_text())["classes"]["a spot"]["descriptions"][0]
        name, field, count = asked(body)
        return answer(json.dumps({"sentences": [taken, *sentences(name, field, count - 1)]}))
    server.script = [good, repeat_a]
    code, _, err = write(server, folder, "--descriptions", "3", "--distinctive", "0", "--confusions", "0",
                         "--jobs", "1", capsys=capsys)
    text = json.loads((folder / "prompts.json").read_text())["classes"]
    assert code == 0 and len(server.requests) == 3, err
    assert not set(text["a spot"]["descriptions"]) & set(text["b ring"]["descriptions"])
    assert "Write 1 sentence " in server.bodies()[2]["messages"][1]["content"]


def test_a_class_still_short_after_the_re_asks_is_named_in_one_line(tmp_path, server, capsys):
    folder = own_folder(tmp_path / "scans", ("a_spot", "b_ring"))
    server.default = lambda body: refusal(body) if '"a spot" looks' in body["messages"][1]["content"] else good(body)
    code, out, err = write(server, folder, "--descriptions", "3", "--distinctive", "0", "--confusions", "0",
                           "--reasks", "2", capsys=capsys)
    lines = [line for line in err.splitlines() if line.startswith("missing:")]
    assert code == 1 and lines == ['missing: class "a spot": descriptions: 3 of 3 missing after 3 requests '
                                   "(the last answer: 1 refusal); run the same command again to ask for them"]
    assert len(server.requests) == 3 + 1
    text = json.loads((folder / "prompts.json").read_text())
    assert len(text["classes"]["b ring"]["descriptions"]) == 3 and text["classes"]["a spot"]["descriptions"] == []


def test_a_server_without_json_schema_gets_numbered_lines(tmp_path, server, capsys):
    folder = own_folder(tmp_path / "scans", ("a_spot", "b_ring"))
    server.default = lambda body: (error(400, "response_format json_schema is not supported")(body)
                                   if "response_format" in body else numbered(body))
    code, out, err = write(server, folder, *SMALL, "--jobs", "1", capsys=capsys)
    assert code == 0, err
    text = json.loads((folder / "prompts.json").read_text())
    assert all(len(e["descriptions"]) == 4 for e in text["classes"].values()) and text["_"][0]["answers"] == \
        "numbered lines"
    assert "numbered list" in server.bodies()[-1]["messages"][1]["content"]
    assert sum("response_format" in b for b in server.bodies()) == 1 and len(server.requests) == 7


# ------------------------------------------------------------------ the server's errors
@pytest.mark.parametrize("script, code, said", [
    ([error(429, "Rate limit reached", "rate_limit_exceeded", {"retry-after": "0.2"})], 0, None),
    ([error(500, "The server had an error", None, {"retry-after": "0"})], 0, None),
    ([error(500, "boom", None, {"retry-after": "0"})] * 3, 2, "the server failed 3 times in a row (HTTP 500: boom)"),
    ([error(401, f"Incorrect API key provided: {KEY}")], 2, "the server refused the API key (HTTP 401: Incorrect API "
                                                           "key provided: ***)"),
    ([error(404, "The model `test-model` does not exist")], 2, "the server does not know the model 'test-model'"),
    ([error(400, "This model's maximum context length is 4096 tokens", "context_length_exceeded")], 2,
     "the request is longer than the model's context"),
    ([error(429, "You exceeded your current quota", "insufficient_quota")], 2, "the account has no quota left"),
    ([error(429, "slow down", None, {"retry-after": "0"})] * 6, 2, "the server's rate limit refused 6 requests in a "
                                                                  "row (HTTP 429: slow down): lower --jobs"),
])
def test_server_errors_are_retried_or_end_in_one_line(tmp_path, server, capsys, script, code, said):
    folder = own_folder(tmp_path / "scans", ("a_spot", "b_ring"))
    server.script = list(script)
    start = time.monotonic()
    result, out, err = write(server, folder, *SMALL, "--jobs", "1", capsys=capsys)
    assert result == code and time.monotonic() - start < 5
    if said is None:
        assert len(server.requests) == 6 + 1 and "error" not in err
        assert server.bodies()[0] == server.bodies()[1]  # the same request again
    else:
        assert err.startswith("error: ") and said in err and len(err.splitlines()) == 1, err
        assert "kept in" in err and KEY not in out + err


def test_a_rate_limit_wait_holds_every_thread(tmp_path, server, capsys):
    folder = own_folder(tmp_path / "scans", ("a_spot", "b_ring", "c_cross"))
    # class a's first request is refused at once; b's and c's first answers take 0.4 s, so their next
    # requests come when the refusal's wait (1 s) is under way: they must wait for its end too
    server.default = lambda body: (error(429, "slow down", None, {"retry-after": "1"})(body)
                                   if asked(body)[0] == "a spot" and not server.replied else good(body))
    server.delay = lambda body: 0.4 if asked(body)[0] != "a spot" and asked(body)[1] == "descriptions" else 0
    code, _, err = write(server, folder, "--descriptions", "2", "--distinctive", "1", "--confusions", "0",
                         "--jobs", "3", capsys=capsys)
    assert code == 0, err
    assert len(server.requests) == 3 + 1 + 3
    [limited] = [t for t, status in server.replied if status == 429]
    later = [t for t, body in server.arrived if asked(body)[0] != "a spot" and asked(body)[1] == "distinctive"]
    assert len(later) == 2 and min(later) >= limited + 0.95


def test_a_server_that_does_not_answer_in_time_ends_in_one_line(tmp_path, server, capsys):
    folder = own_folder(tmp_path / "scans", ("a_spot", "b_ring"))
    server.delay = 2.0
    start = time.monotonic()
    code, _, err = write(server, folder, *SMALL, "--jobs", "1", "--timeout", "0.3", capsys=capsys)
    assert code == 2 and time.monotonic() - start < 3
    assert "gave no answer within 0.3 s, 2 times: raise --timeout" in err and len(err.splitlines()) == 1


def test_unreachable_server_and_missing_key_are_said_at_once(tmp_path, capsys, monkeypatch):
    folder = own_folder(tmp_path / "scans", ("a_spot", "b_ring"))
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.monotonic()
    code = classtext.cli(["write", str(folder), "--model", "m", "--base-url", f"http://127.0.0.1:{port}/v1", *SMALL,
                          "--template", TEMPLATE])
    err = capsys.readouterr().err
    assert code == 2 and time.monotonic() - start < 3 and len(err.splitlines()) == 1
    assert f"cannot reach the server http://127.0.0.1:{port}/v1" in err and "is it running" in err
    monkeypatch.delenv("OPENAI_API_KEY")
    code = classtext.cli(["write", str(folder), "--model", "m", "--base-url", "https://api.example.com/v1", *SMALL])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: no API key: set OPENAI_API_KEY for api.example.com")
    assert classtext.is_local("http://127.0.0.1:11434/v1") and classtext.is_local("http://192.168.1.5:8000/v1")
    assert classtext.is_local("http://gpu-box:8000/v1") and not classtext.is_local("https://api.openai.com/v1")


# ------------------------------------------------------------------ resuming, keeping, overwriting
def test_your_sentences_are_kept_and_a_rerun_asks_only_for_what_is_missing(tmp_path, server, capsys):
    folder = own_folder(tmp_path / "scans", ("a_spot", "b_ring"))
    mine = "A single bright round spot sits near the middle of the image on a dark field."
    (folder / "prompts.json").write_text(json.dumps({"template": "a photo of a {}.", "classes": {
        "a spot": {"descriptions": [mine]}, "b ring": {}}}), encoding="utf-8")
    code, _, err = write(server, folder, "--descriptions", "3", "--distinctive", "0", "--confusions", "0",
                         capsys=capsys)
    assert code == 0, err
    text = json.loads((folder / "prompts.json").read_text())
    assert text["classes"]["a spot"]["descriptions"][0] == mine and len(text["classes"]["a spot"]["descriptions"]) == 3
    assert "Write 2 sentences" in [b for b in server.bodies() if '"a spot" looks' in b["messages"][1]["content"]][0][
        "messages"][1]["content"]
    code, _, err = write(server, folder, "--descriptions", "3", "--distinctive", "0", "--confusions", "0",
                         "--overwrite", capsys=capsys)
    text = json.loads((folder / "prompts.json").read_text())
    assert code == 0 and mine not in text["classes"]["a spot"]["descriptions"] and len(text["_"]) == 2
    assert mine in (folder / "prompts.json.bak").read_text()


def test_ctrl_c_keeps_what_was_written(tmp_path, server):
    folder = own_folder(tmp_path / "scans", ("a_spot", "b_ring", "c_cross"))
    server.delay = lambda body: 0 if asked(body)[0] == "a spot" else 30
    proc = subprocess.Popen([sys.executable, "classtext.py", "write", str(folder), "--model", "m", "--base-url",
                             server.url, *SMALL, "--jobs", "1"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "NO_PROXY": "127.0.0.1"})
    deadline = time.monotonic() + 60
    while len(server.requests) < 4 and time.monotonic() < deadline:  # class a's three answers, then b's request
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "interrupted: the 8 sentence(s) written are kept in" in err and KEY not in out + err
    text = json.loads((folder / "prompts.json").read_text())
    assert [len(text["classes"]["a spot"][f]) for f in classtext.TEXT_FIELDS] == [4, 2, 2]
    assert text["classes"]["b ring"]["descriptions"] == []
    server.delay, sent = 0, len(server.requests)
    assert classtext.cli(["write", str(folder), "--model", "m", "--base-url", server.url, *SMALL]) == 0
    assert len(server.requests) - sent == 6  # b and c only


# ------------------------------------------------------------------ import
def test_import_matches_released_keys_and_names_those_it_cannot(tmp_path, capsys):
    folder = own_folder(tmp_path / "scans", ("glioma_tumor", "normal_brain"))
    des = tmp_path / "btmri_des.json"
    des.write_text(json.dumps({"Glioma_Tumor": ["an infiltrative mass with blurred margins in the white matter",
                                                "an infiltrative mass with blurred margins in the white matter"],
                               "no_tumor": ["symmetric brain tissue without any mass or oedema at all"]}))
    code = classtext.cli(["import", str(folder), "--descriptions", str(des)])
    err = capsys.readouterr().err
    assert code == 2 and "no class of" in err and "'no_tumor'" in err and "--rename" in err
    assert not (folder / "prompts.json").exists()
    conf = tmp_path / "btmri_confuse.json"
    conf.write_text("\ufeff" + json.dumps({"glioma tumor": ["x " * 25], "NORMAL BRAIN": ["y " * 25]}))  # a BOM
    code = classtext.cli(["import", str(folder), "--descriptions", str(des), "--confusions", str(conf),
                          "--rename", "no tumor=normal brain"])
    out, err = capsys.readouterr()
    assert code == 0, err
    text = json.loads((folder / "prompts.json").read_text())
    assert text["classes"]["glioma tumor"]["descriptions"] == [
        "an infiltrative mass with blurred margins in the white matter"]  # the repeat left out
    assert "1 empty or repeated left out" in out and text["classes"]["normal brain"]["distinctive"] == []
    assert text["_"][0]["files"]["confusions"]["name"] == "btmri_confuse.json"


def test_import_for_a_benchmark_needs_out_and_never_writes_prompts(tmp_path, capsys):
    des = tmp_path / "des.json"
    des.write_text(json.dumps({name: [f"{name} looks like this in a breast ultrasound image"]
                               for name in data.CLASSNAMES["busi"]}))
    before = (classtext.PROMPTS_DIR / "busi.json").read_bytes()
    assert classtext.cli(["import", "busi", "--descriptions", str(des)]) == 2
    assert "pass --out FILE" in capsys.readouterr().err
    assert classtext.cli(["import", "BUSI", "--descriptions", str(des), "--out",
                          str(classtext.PROMPTS_DIR / "mine.json")]) == 2
    assert classtext.cli(["import", "busi", "--descriptions", str(des), "--out", str(tmp_path / "busi.json")]) == 0
    assert (classtext.PROMPTS_DIR / "busi.json").read_bytes() == before
    text = json.loads((tmp_path / "busi.json").read_text())
    shipped = json.loads(before)
    assert text["template"] == shipped["template"] and text["ctx_init"] == shipped["ctx_init"]
    assert all(len(e["descriptions"]) == 1 for e in text["classes"].values())


# ------------------------------------------------------------------ reading class-text files
def test_duplicate_keys_are_an_error_naming_the_key_and_a_bom_is_read(tmp_path):
    (tmp_path / "prompts.json").write_text('{"template": "a photo of a {}.", "classes": {"a": {}, "b": {}, '
                                           '"a": {"descriptions": ["x"]}}}', encoding="utf-8")
    with pytest.raises(UserError, match='the key "a" is given twice in one object'):
        classtext.load_class_text(str(tmp_path), ["a", "b"], method="zeroshot")
    (tmp_path / "prompts.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(
        {"template": "a photo of a {}.", "classes": {"a": {}, "b": {}}}).encode())
    assert list(classtext.load_class_text(str(tmp_path), ["a", "b"], method="zeroshot")["classes"]) == ["a", "b"]


# ------------------------------------------------------------------ check
def test_check_lists_counts_readiness_and_every_problem(tmp_path, capsys):
    folder = own_folder(tmp_path / "scans", ("a_spot", "b_ring"))
    (folder / "prompts.json").write_text(json.dumps({"template": "a photo of a {}.", "classes": {
        "a spot": {"descriptions": ["one bright round spot in the middle of the image", "short"],
                   "distinctive": ["only this class has a single bright spot in the image"]},
        "b ring": {"descriptions": ["one bright round spot in the middle of the image"]}}}))
    code = classtext.cli(["check", str(folder), "--backbone", "tiny"])
    out = capsys.readouterr().out
    assert code == 1
    assert re.search(r"a spot\s+2\s+1\s+0", out) and re.search(r"b ring\s+1\s+0\s+0", out)
    assert "the zero-shot baseline: ready (it scores the descriptions too)" in out and "BiomedAP: ready" in out
    assert "BioMedVR: not ready (3 problem(s) below)" in out
    assert "text tower of tiny (128 tokens): nothing is cut" in out
    assert 'class "a spot": descriptions: 1 under 5 words' in out
    assert "the same sentence in classes 'a spot', 'b ring'" in out
    assert out.count('"confusions" is missing') == 2 and 'class "b ring": "distinctive" is missing' in out
    write_ok = {"template": "a photo of a {}.", "classes": {
        c: {f: [f"{c} {f} sentence with several words {i} " + "and more words " * (5 if f == "confusions" else 0)
                for i in range(2)] for f in classtext.TEXT_FIELDS} for c in ("a spot", "b ring")}}
    (tmp_path / "other.json").write_text(json.dumps(write_ok))
    assert classtext.cli(["check", str(folder), "--class-text", str(tmp_path / "other.json")]) == 0
    assert "BioMedVR: ready" in capsys.readouterr().out


# ------------------------------------------------------------------ --class-text keys the run folders
def test_class_text_flag_gets_its_own_folder_and_is_recorded(tmp_path, backbones, monkeypatch):
    monkeypatch.setattr(common, "load_backbone", lambda name, device: backbones(name))
    folder = own_folder(tmp_path / "scans", ("a_spot", "b_ring"))
    text = classtext.starter_class_text(["a spot", "b ring"])
    (folder / "prompts.json").write_text(json.dumps(text))
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    text["template"] = "an image of a {}."
    first.write_text(json.dumps(text))
    text["template"] = "a scan of a {}."
    second.write_text(json.dumps(text))
    runs = tmp_path / "runs"
    for path in (None, second):
        zeroshot.main(zeroshot.Args(dataset=str(folder), backbone="tiny", device="cpu", workers=0, out=str(runs),
                                    class_text=str(path or "")))
    keys = [f"text-{hashlib.sha256(p.read_bytes()).hexdigest()[:8]}" for p in (first, second)]
    found = sorted(p.relative_to(runs).parts[:2] for p in runs.rglob("metrics.json"))
    assert found == sorted([("tiny", "zeroshot"), ("tiny", keys[1])]) and keys[0] != keys[1]
    record = json.loads((runs / "tiny" / keys[1] / "zeroshot" / "scans" / "seed1" / "metrics.json").read_text())
    assert record["class_text_file"]["path"] == str(second.resolve())
    assert record["clinical_template"] == "a scan of a {}."
    own = json.loads((runs / "tiny" / "zeroshot" / "scans" / "seed1" / "metrics.json").read_text())
    assert "class_text_file" not in own
    args = zeroshot.Args(dataset=str(folder), out=str(runs), class_text=str(first))
    assert zeroshot.folder_of(args).parts[-4] == keys[0]
    args = runner.cli_args(biomedvr)(dataset="synthetic", class_text=str(first))
    assert runner.run_folder(biomedvr, args).parts[-5] == keys[0]
    with pytest.raises(UserError, match="--class-text .* is not a file"):
        zeroshot.main(zeroshot.Args(dataset=str(folder), backbone="tiny", device="cpu", out=str(runs),
                                    class_text=str(tmp_path / "missing.json")))
