"""Bad usage of evaluate / predict / export / serve: each case exits non-zero with a message, never a traceback.

Each case: the arguments (MODEL, RUN, DATA, TMP are replaced), the exit code, and words the message must contain.
Keep adding cases when a new mistake is found.
"""

import json
import shutil

import pytest

from qatune.cli import main
from tests.runs import CONTEXT, qa_data, tiny_run  # noqa: F401 - fixtures


@pytest.fixture(scope="module")
def damaged(tiny_run, tmp_path_factory):
    """Copies of the run's model with one file damaged each."""
    root = tmp_path_factory.mktemp("damaged")
    out = {}
    for name in ("truncated", "settings", "settings_type", "no_weights", "long"):
        d = root / name
        shutil.copytree(tiny_run / "model", d)
        out[name] = d
    weights = out["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (out["settings"] / "qatune.json").write_text('{"max_seq_length": 96,')
    (out["settings_type"] / "qatune.json").write_text(json.dumps({"max_seq_length": "long", "doc_stride": 32}))
    (out["no_weights"] / "model.safetensors").unlink()
    long = json.loads((out["long"] / "qatune.json").read_text())
    (out["long"] / "qatune.json").write_text(json.dumps({**long, "max_seq_length": 4096}))
    line = {"id": "1", "question": "What is the bridge of Marlow called?", "context": CONTEXT}
    (root / "q.jsonl").write_text(json.dumps(line) + "\n")
    (root / "surrogate.jsonl").write_text(json.dumps({**line, "question": "Who\ud800?"}) + "\n")
    (root / "dupid.jsonl").write_text("\n".join(json.dumps({**line, **extra}) for extra in
                                                ({}, {}, {"id": None}, {"id": "3"})) + "\n")
    (root / "latin1.txt").write_bytes("Caf\xe9 de Flore is called Kestrel7.".encode("latin-1"))
    (root / "empty.jsonl").write_text("\n\n")
    out["checkpoint"] = root / "run" / "checkpoints" / "checkpoint-4"  # what a run's checkpoint folder holds
    out["checkpoint"].mkdir(parents=True)
    for name in ("state.pt", "trainable.safetensors", "config.json"):
        (out["checkpoint"] / name).write_bytes(b"{}")
    out["root"] = root
    return out


def run_cli(args, capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def check(code, err, expected_code, words):
    assert code == expected_code, err
    assert "Traceback" not in err
    for w in words:
        assert w in err, (w, err)


Q = ["--question", "What is the bridge of Marlow called?"]

CASES = [  # (id, argv after the command, exit code, words)
    ("predict-missing-context-file", ["predict", "--model", "RUN", *Q, "--context-file", "TMP/nope.txt"], 2,
     ["nope.txt", "context file not found"]),
    ("predict-latin1-context-file", ["predict", "--model", "RUN", *Q, "--context-file", "TMP/latin1.txt"], 2,
     ["latin1.txt", "not UTF-8", "UTF-8 text file"]),
    ("predict-top-k-0", ["predict", "--model", "RUN", *Q, "--context", CONTEXT, "--top-k", "0"], 2,
     ["--top-k must be >= 1", "got 0"]),
    ("predict-top-k-negative", ["predict", "--model", "RUN", *Q, "--context", CONTEXT, "--top-k", "-2"], 2,
     ["--top-k must be >= 1", "got -2"]),
    ("predict-blank-question", ["predict", "--model", "RUN", "--question", "   ", "--context", CONTEXT], 2,
     ["--question must not be empty"]),
    ("predict-no-context", ["predict", "--model", "RUN", *Q], 2, ["exactly one of --context / --context-file"]),
    ("predict-empty-jsonl", ["predict", "--model", "RUN", "--input", "TMP/empty.jsonl"], 2,
     ["empty.jsonl", "no questions"]),
    ("predict-missing-jsonl", ["predict", "--model", "RUN", "--input", "TMP/none.jsonl"], 2,
     ["none.jsonl", "not found"]),
    ("predict-truncated-weights", ["predict", "--model", "TRUNCATED", *Q, "--context", CONTEXT], 2,
     ["truncated", "weights file is damaged", "copy or download the model again"]),
    ("predict-no-weights", ["predict", "--model", "NO_WEIGHTS", *Q, "--context", CONTEXT], 2,
     ["cannot load a question-answering model"]),
    ("predict-malformed-settings", ["predict", "--model", "SETTINGS", *Q, "--context", CONTEXT], 2,
     ["qatune.json", "not valid JSON", "re-save the model"]),
    ("evaluate-settings-wrong-type", ["evaluate", "--model", "SETTINGS_TYPE", "--data", "DATA", "--output-dir",
                                      "TMP/ev"], 2, ["qatune.json", "max_seq_length must be an integer", "fix"]),
    ("evaluate-not-a-model", ["evaluate", "--model", "TMP", "--data", "DATA", "--output-dir", "TMP/ev"], 2,
     ["not a model", "run directory"]),
    ("evaluate-missing-model", ["evaluate", "--model", "TMP/gone", "--data", "DATA", "--output-dir", "TMP/ev"], 2,
     ["no such directory"]),
    ("evaluate-bad-precision", ["evaluate", "--model", "RUN", "--data", "DATA", "--output-dir", "TMP/ev",
                                "--precision", "fp8"], 2, ["unknown precision 'fp8'"]),
    ("evaluate-stride-too-large", ["evaluate", "--model", "RUN", "--data", "DATA", "--output-dir", "TMP/ev",
                                   "--doc-stride", "200"], 2, ["doc_stride", "max_seq_length=96"]),
    ("export-int8-merged", ["export", "--model", "RUN", "--format", "merged", "--quantize", "int8",
                            "--output-dir", "TMP/x"], 2, ["--quantize int8 goes with --format onnx"]),
    ("export-onto-the-run", ["export", "--model", "RUN", "--output-dir", "RUN"], 2, ["model's own directory"]),
    ("export-into-a-file", ["export", "--model", "RUN", "--output-dir", "TMP/latin1.txt"], 2, ["is a file"]),
    ("serve-bad-port", ["serve", "RUN", "--port", "70000"], 2, ["--port must be 0-65535"]),
    ("serve-bad-batch", ["serve", "RUN", "--max-batch", "0"], 2, ["--max-batch must be >= 1"]),
    ("serve-missing-model", ["serve", "TMP/gone"], 2, ["no such directory"]),
    ("serve-bad-host", ["serve", "RUN", "--host", "no-such-host.invalid"], 2, ["--host", "not an address"]),
    ("serve-foreign-host", ["serve", "RUN", "--host", "192.0.2.1"], 2, ["cannot listen on 192.0.2.1", "--host"]),
    ("predict-output-is-input", ["predict", "--model", "RUN", "--input", "TMP/q.jsonl", "--output", "TMP/q.jsonl"], 2,
     ["is the input", "would destroy the input"]),
    ("predict-output-a-directory", ["predict", "--model", "RUN", "--input", "TMP/q.jsonl", "--output", "TMP"], 2,
     ["--output", "is a directory"]),
    ("predict-output-under-a-file", ["predict", "--model", "RUN", "--input", "TMP/q.jsonl", "--output",
                                     "TMP/latin1.txt/a.jsonl"], 2, ["is a file, so nothing can be created under it"]),
    ("predict-question-and-input", ["predict", "--model", "RUN", *Q, "--context", CONTEXT, "--input", "TMP/q.jsonl"],
     2, ["--question and --context with --input", "not both"]),
    ("predict-output-without-input", ["predict", "--model", "RUN", *Q, "--context", CONTEXT, "--output", "TMP/o"],
     2, ["--output goes with --input"]),
    ("predict-question-not-unicode", ["predict", "--model", "RUN", "--question", "Caf\udce9?", "--context", CONTEXT],
     2, ["--question is not valid Unicode", "lone surrogate"]),
    ("predict-jsonl-lone-surrogate", ["predict", "--model", "RUN", "--input", "TMP/surrogate.jsonl"], 2,
     ["line 1: 'question': is not valid Unicode"]),
    ("predict-longer-than-positions", ["predict", "--model", "LONG", *Q, "--context", CONTEXT], 2,
     ["max_seq_length 4096 is longer than", "max_position_embeddings"]),
    ("evaluate-longer-than-positions", ["evaluate", "--model", "RUN", "--data", "DATA", "--output-dir", "TMP/ev",
                                        "--max-seq-length", "4096"], 2, ["max_seq_length 4096", "cover"]),
    ("evaluate-output-under-a-file", ["evaluate", "--model", "RUN", "--data", "DATA", "--output-dir",
                                      "TMP/latin1.txt/ev"], 2, ["is a file, so nothing can be created under it"]),
    ("export-longer-than-positions", ["export", "--model", "LONG", "--output-dir", "TMP/x"], 2,
     ["max_seq_length 4096"]),
    ("export-under-a-file", ["export", "--model", "RUN", "--output-dir", "TMP/latin1.txt/x"], 2,
     ["is a file, so nothing can be created under it"]),
    ("serve-longer-than-positions", ["serve", "LONG", "--port", "0"], 2, ["max_seq_length 4096"]),
    ("evaluate-into-the-run", ["evaluate", "--model", "RUN", "--data", "DATA", "--output-dir", "RUN"], 2,
     ["is a training run's directory", "choose another directory"]),
    ("predict-duplicate-ids", ["predict", "--model", "RUN", "--input", "TMP/dupid.jsonl"], 2,
     ["line 2: id '1' is also line 1's id", "line 4: id '3' is also line 3's id", "2 of 4 line(s) not answered"]),
    ("evaluate-a-checkpoint", ["evaluate", "--model", "CKPT", "--data", "DATA", "--output-dir", "TMP/ev"], 2,
     ["a training checkpoint (for --resume), not a model", "give the run directory"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_usage(case, tiny_run, qa_data, damaged, capsys):
    _, argv, code, words = case
    names = {"RUN": tiny_run, "DATA": qa_data, "TMP": damaged["root"], "TRUNCATED": damaged["truncated"],
             "SETTINGS": damaged["settings"], "SETTINGS_TYPE": damaged["settings_type"],
             "NO_WEIGHTS": damaged["no_weights"], "LONG": damaged["long"], "CKPT": damaged["checkpoint"]}

    def fill(a: str) -> str:
        for k, v in sorted(names.items(), key=lambda kv: -len(kv[0])):
            if a == k or a.startswith(k + "/"):
                return str(v) + a[len(k):]
        return a

    got, _, err = run_cli([fill(a) for a in argv], capsys)
    check(got, err, code, words)


def test_batch_reports_bad_lines_answers_the_rest_and_exits_2(tiny_run, tmp_path, capsys):
    lines = [json.dumps({"id": "a", "question": "What is the bridge of Marlow called?", "context": CONTEXT}),
             "not json",
             json.dumps({"question": 5, "context": CONTEXT}),
             "",
             json.dumps({"question": "  ", "context": CONTEXT}),
             json.dumps(["a", "list"]),
             json.dumps({"question": "What?"}),
             json.dumps({"id": 7, "question": "Who walks near the river?", "context": CONTEXT})]
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out_file = tmp_path / "answers.jsonl"
    code, out, err = run_cli(["predict", "--model", str(tiny_run), "--input", str(path), "--output", str(out_file)],
                             capsys)
    check(code, err, 2, ["q.jsonl, line 2: not valid JSON", "line 3: 'question': must be a string, got a number (5)",
                         "line 5: 'question': must not be empty", "line 6: expected a JSON object",
                         "line 7: 'context': field required",
                         "5 of 7 line(s) not answered", "the other 2 were"])
    answered = [json.loads(x) for x in out_file.read_text().splitlines()]
    assert [a["id"] for a in answered] == ["a", "7"]
    for a in answered:
        assert CONTEXT[a["answers"][0]["start"] : a["answers"][0]["end"]] == a["answers"][0]["text"]


def test_batch_question_too_long_for_the_windows_is_one_bad_line(tiny_run, tmp_path, capsys):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "why " * 120, "context": CONTEXT}) + "\n"
                    + json.dumps({"question": "What is the bridge of Marlow called?", "context": CONTEXT}) + "\n")
    code, out, err = run_cli(["predict", "--model", str(tiny_run), "--input", str(path)], capsys)
    check(code, err, 2, ["line 1:", "tokens, leaving", "1 of 2 line(s) not answered"])
    assert len(out.strip().splitlines()) == 1 and json.loads(out)["id"] == "2"


def test_predict_never_writes_over_its_input(tiny_run, damaged, capsys):
    path = damaged["root"] / "q.jsonl"
    before = path.read_bytes()
    alias = damaged["root"] / "." / "q.jsonl"  # the same file under another spelling
    code, _, err = run_cli(["predict", "--model", str(tiny_run), "--input", str(path), "--output", str(alias)], capsys)
    check(code, err, 2, ["is the input"])
    assert path.read_bytes() == before


def test_serve_on_a_port_in_use_fails_before_loading(tiny_run, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run_cli(["serve", str(tiny_run), "--port", str(port)], capsys)
    check(code, err, 2, [f"cannot listen on 127.0.0.1:{port}", "the port is in use", "another --port"])
