"""GSM8K in caprese-distill: question files, slices, the answer extractor, the report's gsm8k split, the recipe.

All CPU and fast except the last test, which runs `caprese-distill generate` on SmolLM2 through vLLM."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from distill.config import ConfigError, DistillConfig, load_config, parse_slice
from distill.problems import MATH_PREFIX, cycle_questions, extract_answer, gold_answer, read_question_file

GSM8K_TRAIN = Path("/work/shared/data/gsm8k/train.jsonl")


def _gsm8k_file(path: Path, count: int) -> Path:
    rows = [{"question": f"Tom has {i} apples and buys 2 more. How many apples does he have?",
             "answer": f"He has {i} + 2 = <<{i}+2={i + 2}>>{i + 2} apples.\n#### {i + 2}"} for i in range(count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- the answer extractor --------------------------------------------------------------------------------

@pytest.mark.parametrize("text, answer", [
    # Qwen2.5-Instruct style: reasoning, then a boxed answer (units, $ and LaTeX inside the box)
    ("Janet's ducks lay 16 eggs per day. She eats 3 and bakes with 4, so 16 - 3 - 4 = 9 eggs are left.\n"
     "She sells them at $2 each: 9 * 2 = 18.\n\nTherefore, Janet makes \\(\\boxed{18}\\) dollars every day.", "18"),
    ("The total cost is $1,234.50 + $15 = $1,249.50.\n\nThe final answer is $\\boxed{\\$1,249.50}$.", "1249.5"),
    ("So the robe takes 2 + 1 = 3 bolts.\n\\[\n\\boxed{3 \\text{ bolts}}\n\\]", "3"),
    ("\\boxed{1{,}000} is what she saves; earlier we found \\boxed{12} wrongly", "12"),  # the last box
    # no box: the first number after the last "answer is" / "Answer:" / "####"
    ("Step 1: 48 / 2 = 24 clips in May.\nStep 2: 48 + 24 = 72.\nThe answer is 72 clips (over 2 months).", "72"),
    ("Weng earns 12/60 = $0.2 per minute, 0.2 x 50 = $10.\nAnswer: $10.00", "10"),
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72"),
    ("The answer is: -5 degrees.", "-5"),
    # otherwise the last number, normalised
    ("Betty needs 100 - 50 - 30 - 15 = 5 more dollars.", "5"),
    ("The discount is 25%.", "25"), ("So he pays 3,600.", "3600"), ("It is 12.0 meters.", "12"),
    ("The temperature drops to -5.", "-5"), ("It takes 3-5 hours", "5"), ("She has .5 of a pie left", "0.5"),
    ("To answer this, count: 4 + 4 = 8 legs.", "8"),  # "answer" without "is/:" is not a marker
    ("I cannot solve this problem.", None),
])
def test_extract_answer_on_realistic_outputs(text, answer):
    assert extract_answer(text) == answer


def test_gold_answer_is_the_number_after_the_marker():
    assert gold_answer("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72") == "72"
    assert gold_answer("#### 1,000") == "1000" and gold_answer("#### -3") == "-3" and gold_answer("#### 2.50") == "2.5"
    assert gold_answer("She has 5 left.") is None


def test_every_gsm8k_train_answer_has_a_gold_number_that_scores_itself():
    if not GSM8K_TRAIN.exists():
        pytest.skip(f"{GSM8K_TRAIN} not on this machine")
    rows = [json.loads(line) for line in GSM8K_TRAIN.read_text().splitlines()]
    golds = [gold_answer(r["answer"]) for r in rows]
    assert None not in golds and len(golds) == 7473
    # the reference solution, rewritten the way a model ends, scores as correct
    assert all(extract_answer(f"So the answer is {r['answer'].rpartition('####')[2].strip()}.") == g
               for r, g in zip(rows, golds, strict=True))


# ---- slices, question files, validation -------------------------------------------------------------------

def test_parse_slice():
    assert parse_slice(":") == slice(None, None, None)
    assert parse_slice(":-1000") == slice(None, -1000, None) and parse_slice("-1000:") == slice(-1000, None, None)
    assert parse_slice(" 10 : 20 ") == slice(10, 20, None) and parse_slice("::2") == slice(None, None, 2)
    for bad in ("", "5", "a:b", "1:2:3:4", "::0", "1.5:"):
        with pytest.raises(ValueError, match="not a slice"):
            parse_slice(bad)


def test_question_file_rows_prefix_and_answers(tmp_path):
    path = _gsm8k_file(tmp_path / "q.jsonl", 10)
    problems = read_question_file(path, "-3:", "eval.gsm8k", need_answers=True)
    assert [p.answer for p in problems] == ["9", "10", "11"]
    assert problems[0].question == f"{MATH_PREFIX} Tom has 7 apples and buys 2 more. How many apples does he have?"
    assert problems[0].topic == "q.jsonl:8" and problems[0].kind == "math"


def test_cycled_questions_are_balanced_and_seeded(tmp_path):
    problems = read_question_file(_gsm8k_file(tmp_path / "q.jsonl", 7), ":", "data.questions", need_answers=False)
    drawn = cycle_questions(problems, 20, seed=0)
    assert len(drawn) == 20 and set(Counter(p.question for p in drawn).values()) == {2, 3}
    assert drawn == cycle_questions(problems, 20, seed=0) and drawn != cycle_questions(problems, 20, seed=1)
    assert len({p.question for p in cycle_questions(problems, 5, seed=0)}) == 5  # fewer than the file: a subset


def _config(tmp_path, **overrides) -> DistillConfig:
    return load_config(None, {"model": "m", "run_dir": str(tmp_path / "run"), **overrides})


@pytest.mark.parametrize("content, match", [
    (None, r"data.questions: cannot read .*missing.jsonl"),
    ('{"question": "ok"}\nnot json\n', r"data.questions: .*q.jsonl:2: not a JSON object"),
    ('{"question": "ok"}\n{"answer": "#### 3"}\n', r"data.questions: .*q.jsonl:2: no \"question\" string"),
])
def test_bad_question_files_name_field_file_and_line(tmp_path, content, match):
    path = tmp_path / ("missing.jsonl" if content is None else "q.jsonl")
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=match) as err:
        _config(tmp_path, **{"data.questions": str(path)})
    assert "\n" not in str(err.value)


def test_gsm8k_file_needs_gold_answers_and_rows(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "What is 2 + 2?", "answer": "4"}\n')
    _config(tmp_path, **{"data.questions": str(path)})  # training questions need no answer
    with pytest.raises(ConfigError, match=r"eval.gsm8k: .*q.jsonl:1: \"answer\" does not end in \"#### N\""):
        _config(tmp_path, **{"eval.gsm8k": str(path)})
    with pytest.raises(ConfigError, match=r"eval.gsm8k: .*no questions in rows \[5:\] of its 1 lines"):
        _config(tmp_path, **{"eval.gsm8k": str(_gsm8k_file(path, 1)), "eval.gsm8k_range": "5:"})
    with pytest.raises(ConfigError, match=r"field eval.gsm8k_range: .*not a slice"):
        _config(tmp_path, **{"eval.gsm8k_range": "last 1000"})


def test_never_train_on_the_dev_slice(tmp_path):
    path = _gsm8k_file(tmp_path / "train.jsonl", 50)
    ok = _config(tmp_path, **{"data.questions": str(path), "data.questions_range": ":-10",
                              "eval.gsm8k": str(path), "eval.gsm8k_range": "-10:"})
    assert ok.data.questions.is_absolute() and ok.eval.gsm8k == ok.data.questions
    with pytest.raises(ConfigError, match=r"data.questions_range ':-9' and eval.gsm8k_range '-10:' share 1 rows"):
        _config(tmp_path, **{"data.questions": str(path), "data.questions_range": ":-9",
                             "eval.gsm8k": str(path), "eval.gsm8k_range": "-10:"})
    other = _gsm8k_file(tmp_path / "test.jsonl", 50)  # another file: any ranges
    _config(tmp_path, **{"data.questions": str(path), "eval.gsm8k": str(other)})


def test_paper_preset_needs_a_model_and_sets_the_recipe(tmp_path, capsys):
    from distill.cli import main
    from distill.presets import preset_path

    preset = preset_path("gsm8k-paper")
    with pytest.raises(ConfigError, match=r"gsm8k-paper.yaml: no model given; pass --model MODEL_DIR"):
        load_config(preset, {"run_dir": str(tmp_path)})
    assert main(["run", "--preset", "gsm8k-paper", "--run-dir", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("caprese-distill: error: ") and "--model" in err[0]
    assert not (tmp_path / "r").exists()

    path = _gsm8k_file(tmp_path / "train.jsonl", 1200)
    args = ["--model", "m", "--run-dir", str(tmp_path / "r"), "--questions", str(path), "--gsm8k", str(path),
            "--e2e-epochs", "1"]
    from distill.cli import _FLAGS, build_parser, glue_range_values

    parsed = build_parser().parse_args(["run", "--preset", "gsm8k-paper", *args])
    config = load_config(preset, {field: getattr(parsed, flag) for flag, field in _FLAGS.items()})
    assert (config.data.num_samples, config.data.questions_range, config.data.max_new_tokens,
            config.data.temperature) == (20000, ":-1000", 512, 0.7)
    assert (config.eval.gsm8k_range, config.eval.gsm8k_max_new_tokens) == ("-1000:", 512)
    assert (config.method, config.density, config.layers, config.rank) == ("griffin", 0.5, None, None)
    assert (config.fit.refine, config.fit.e2e_loss, config.fit.e2e_epochs) == ("e2e", "hidden_mse+kl", 1)
    # a slice from the end is a value, not an option (argparse alone stops with "expected one argument")
    parsed = build_parser().parse_args(glue_range_values(["run", "--preset", "gsm8k-paper", *args,
                                                          "--gsm8k-range", "-1001:"]))
    with pytest.raises(ConfigError, match="share 1 rows"):
        load_config(preset, {field: getattr(parsed, flag) for flag, field in _FLAGS.items()})


def test_splits_train_on_the_questions_and_hold_out_gsm8k(tmp_path):
    from distill.generate import splits

    path = _gsm8k_file(tmp_path / "train.jsonl", 12)
    config = _config(tmp_path, **{"data.questions": str(path), "data.questions_range": ":-4", "data.num_samples": 20,
                                  "data.heldout_math": 5, "data.heldout_language": 0, "eval.gsm8k": str(path),
                                  "eval.gsm8k_range": "-4:", "eval.gsm8k_max_new_tokens": 64})
    got = {split.name: (split, problems) for split, problems in splits(config)}
    assert list(got) == ["train", "heldout_math", "gsm8k"]
    train_split, train = got["train"]
    assert (train_split.temperature, train_split.max_new_tokens, len(train)) == (0.7, 384, 20)
    assert set(Counter(p.question for p in train).values()) == {2, 3}  # 8 questions, 20 samples
    gsm_split, gsm8k = got["gsm8k"]
    assert (gsm_split.temperature, gsm_split.max_new_tokens) == (0.0, 64)
    assert [p.answer for p in gsm8k] == ["10", "11", "12", "13"]
    assert not {p.question for p in train} & {p.question for p in gsm8k}
    templated = _config(tmp_path, **{"data.num_samples": 20, "data.heldout_math": 5, "data.heldout_language": 0})
    assert got["heldout_math"][1] == dict((s.name, p) for s, p in splits(templated))["heldout_math"]


# ---- evaluation and report ------------------------------------------------------------------------------

def test_scores_and_limits_of_the_gsm8k_split(tmp_path):
    from distill.data import Sample
    from distill.evaluate import generation_limits, score

    samples = [Sample(id=str(i), kind="math", topic="t", question="q", answer=a, prompt_ids=[1])
               for i, a in enumerate(["18", "1249.5", "3"])]
    answers = [{"completion_ids": [5, 6, 2], "text": "so \\boxed{18}", "finish_reason": "stop"},
               {"completion_ids": [5] * 8, "text": "It costs $1,249.50", "finish_reason": "length"},
               {"completion_ids": [5, 2], "text": "The answer is 4.", "finish_reason": "stop"}]
    got = score({"gsm8k": answers}, {"gsm8k": samples}, eos_ids={2})["gsm8k"]
    assert got == {"length": pytest.approx(11 / 3), "truncation": pytest.approx(1 / 3), "num_prompts": 3,
                   "accuracy": pytest.approx(2 / 3)}
    config = _config(tmp_path, **{"data.max_new_tokens": 100, "eval.max_new_tokens": 200})
    assert generation_limits(config, ["math", "gsm8k"]) == {"math": (100, 200), "gsm8k": (512, 512)}


def _evaluation() -> dict:
    gen = {"dense": (0.40, 290.0, 0.02), "sparse": (0.10, 480.0, 0.60), "caprese": (0.37, 300.0, 0.05)}
    tf = {v: {"agreement": a, "kl": k} for v, a, k in (("dense", 1.0, 0.0), ("sparse", 0.7, 0.4),
                                                          ("caprese", 0.9, 0.1))}
    return {"teacher_forced": {"math": tf, "gsm8k": tf, "language": tf},
            "generation": {v: {"gsm8k": {"accuracy": acc, "length": n, "truncation": cut, "num_prompts": 1000},
                               "math": {"accuracy": acc, "length": n, "truncation": cut, "num_prompts": 200},
                               "language": {"length": n, "truncation": cut, "num_prompts": 100}}
                           for v, (acc, n, cut) in gen.items()}}


def test_report_has_the_gsm8k_table_headline_and_step_times(tmp_path):
    from distill.report import build_report, render_markdown, render_plot

    meta = {"model": "qwen", "method": "griffin", "density": 0.5, "layers": [0, 1], "rank": 64,
            "num_train_samples": 20000, "num_heldout": {"math": 200, "language": 100, "gsm8k": 1000},
            "active_params": {"dense": 500e6, "sparse": 400e6, "caprese": 405e6, "lowrank": 5e6},
            "timings": {"generate_s": 1200.0, "fit_s": 2500.0, "evaluate_s": 600.0}}
    fit = {"relative_error": {"heldout": {k: {"0": 0.5, "1": 0.4} for k in ("sparse", "stage1", "final")}},
           "timings": {"capture_s": 300.0, "closed_form_s": 20.0, "refine_s": 2100.0}}
    report = build_report(meta, _evaluation(), fit)
    assert report["gap_recovered"]["gsm8k_accuracy"] == pytest.approx(0.9)
    assert report["results"]["sparse"]["gsm8k_truncation"] == 0.6
    text = render_markdown(report)
    table = text[text.index("**gsm8k**"):text.index("**math**")]
    assert "| variant | accuracy | length | truncation | agreement | kl |" in table
    assert "| griffin | 0.1000 | 480.0 | 0.6000 | 0.7000 | 0.4000 |" in table
    assert "- gsm8k_accuracy: 0.9000" in text and "held-out prompts: 200 math, 100 language, 1000 gsm8k" in text
    assert "Time per step (s): generate 1200, capture 300, closed form 20, refine 2100, evaluate 600" in text
    render_plot(report, tmp_path / "report.png")
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_evaluation_cache_is_keyed_by_adapter_and_splits(tmp_path):
    """After a refit (another adapter digest) or with other splits, cached results are dropped, not reported."""
    import os

    from distill.evaluate import _reset_cache

    eval_dir, adapter_dir = tmp_path / "eval", tmp_path / "adapter"
    adapter_dir.mkdir()
    (adapter_dir / "caprese.json").write_text("{}")
    key = {"adapter": "a:b", "splits": {"math": 4}, "max_new_tokens": {"math": 16}}
    _reset_cache(eval_dir, key, adapter_dir)
    (eval_dir / "generate_caprese.json").write_text("{}")
    _reset_cache(eval_dir, key, adapter_dir)
    assert (eval_dir / "generate_caprese.json").exists()  # same adapter and splits: resumed
    _reset_cache(eval_dir, {**key, "adapter": "c:d"}, adapter_dir)
    assert not (eval_dir / "generate_caprese.json").exists()
    assert json.loads((eval_dir / "key.json").read_text())["adapter"] == "c:d"
    # a run made before keys existed: kept if its results are newer than the adapter, else dropped
    (eval_dir / "key.json").unlink()
    (eval_dir / "generate_caprese.json").write_text("{}")
    _reset_cache(eval_dir, key, adapter_dir)
    assert (eval_dir / "generate_caprese.json").exists()
    (eval_dir / "key.json").unlink()
    os.utime(eval_dir / "generate_caprese.json", (1, 1))  # older than the adapter: a refit since
    _reset_cache(eval_dir, key, adapter_dir)
    assert not (eval_dir / "generate_caprese.json").exists()


def test_worker_cuts_a_torn_last_line_before_appending(tmp_path):
    from distill.vllm_worker import _done_ids

    out = tmp_path / "a.answers.jsonl"
    out.write_text('{"id": "x-0", "text": "ok"}\n{"id": "x-1", "te')
    assert _done_ids(out) == {"x-0"}
    assert out.read_text() == '{"id": "x-0", "text": "ok"}\n'


# ---- end to end: the data step on a question file (vLLM on CPU) ------------------------------------------

@pytest.mark.vllm
def test_generate_with_questions_writes_every_split(model_dirs, tmp_path):
    questions = _gsm8k_file(tmp_path / "train.jsonl", 6)
    run_dir = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "caprese-distill"), "generate", "--model",
           str(model_dirs["smollm2-135m"]), "--run-dir", str(run_dir), "--questions", str(questions),
           "--questions-range", ":-2", "--gsm8k", str(questions), "--gsm8k-range", "-2:", "--num-samples", "4",
           "--heldout-math", "2", "--heldout-language", "1", "--max-new-tokens", "16", "--gsm8k-max-new-tokens", "8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data: train 4, heldout_math 2, heldout_language 1, gsm8k 2" in proc.stdout
    from distill.data import read_samples

    train = read_samples(run_dir / "data" / "train.jsonl")
    assert [s.id for s in train] == [f"train-{i}" for i in range(4)]
    assert len({s.question for s in train}) == 4 and all(s.question.startswith(MATH_PREFIX) for s in train)
    assert all(0 < len(s.completion_ids) <= 16 for s in train)
    gsm8k = read_samples(run_dir / "data" / "gsm8k.jsonl")
    assert [s.answer for s in gsm8k] == ["6", "7"]
    assert all(0 < len(s.completion_ids) <= 8 and s.finish_reason in ("stop", "length") for s in gsm8k)
    assert any(s.finish_reason == "length" for s in gsm8k)  # 8 tokens cannot hold a reasoned answer


# ---- files and processes (issue 17 item 11) ---------------------------------------------------------------

def test_atomic_writes_leave_no_temporary_files(tmp_path):
    from distill.config import write_atomic

    path = tmp_path / "timings.json"
    write_atomic(path, "{}\n")
    write_atomic(path, '{"generate_s": 1.0}\n')
    assert path.read_text() == '{"generate_s": 1.0}\n' and [p.name for p in tmp_path.iterdir()] == ["timings.json"]
    with pytest.raises(IsADirectoryError):  # a failed write keeps the old file and removes its temporary
        write_atomic(tmp_path, "x")
    assert [p.name for p in tmp_path.iterdir()] == ["timings.json"]


def test_a_second_run_on_one_directory_is_refused_in_one_line(tmp_path):
    """Two processes on one run directory (e.g. `make serve` and `make test` on a fresh machine) corrupted
    each other's files; the second now stops at once, naming the holder, and may go on once it is released."""
    from distill.config import DistillError, RunLock

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from distill.config import RunLock; lock = RunLock(Path(sys.argv[1])); "
                               "print('locked', flush=True); time.sleep(60)", str(tmp_path)],
                              stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DistillError, match=rf"{tmp_path}: another caprese-distill run \(pid {holder.pid}\) "
                                               r"is using this run directory; .* pass another --run-dir"):
            RunLock(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    RunLock(tmp_path).release()  # the kernel released the dead holder's lock


def test_one_adapter_can_be_scored_on_another_gsm8k_file_later(tmp_path):
    """eval.* is not pinned: a resumed run with another GSM8K file keeps data and fit, and regenerates only the
    gsm8k split (its dense answers), which must not be taken from the old file's."""
    from distill.config import pin_config
    from distill.generate import split_is_current, split_path, split_source

    dev, test = _gsm8k_file(tmp_path / "train.jsonl", 20), _gsm8k_file(tmp_path / "test.jsonl", 5)
    config = _config(tmp_path, **{"eval.gsm8k": str(dev), "eval.gsm8k_range": "-10:"})
    pin_config(config)
    final = _config(tmp_path, **{"eval.gsm8k": str(test)})
    pin_config(final)  # accepted: same data and fit settings
    with pytest.raises(ConfigError, match=r"different settings \(data\)"):
        pin_config(_config(tmp_path, **{"eval.gsm8k": str(test), "data.questions": str(dev)}))
    split_path(config.run_dir, "gsm8k").parent.mkdir(parents=True)
    split_path(config.run_dir, "gsm8k").write_text("")
    (config.run_dir / "data" / "gsm8k.source").write_text(split_source(config, "gsm8k"))
    assert split_is_current(config, "gsm8k") and not split_is_current(final, "gsm8k")
    assert split_is_current(config, "heldout_math") is False  # not generated
