"""The paper's tasks: loaders on fixtures in each dataset's real layout, answer checkers on real-looking
completions, and the one-line errors for data that is missing or cannot be fetched."""

import json
import random
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from klrl.cli.train import CONF_DIR
from klrl.tasks.checkers import CHECKERS, final_letter, last_boxed
from klrl.config.validate import validate
from klrl.errors import ConfigError
from klrl.tasks import TASKS

FIX = Path(__file__).parent / "fixtures"
MATH_FIX = [f"task.train_data.path={FIX}/hendrycks_math", f"task.eval_data.path={FIX}/MATH-500",
            f"task.ood_data.path={FIX}/mmlu"]


def cfg_for(*overrides):
    # A pretrained model's tokenizer: the tiny model reads only arith's plain prompts (and is refused for the rest).
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["model=smollm2-135m", *overrides])
    validate(cfg)
    return cfg


@pytest.fixture
def hub_off(tmp_path, monkeypatch):
    """The hub switched off, with an empty cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)


# --- checkers -------------------------------------------------------------------------------------------------------

MATH_COMPLETION = ("We have $x^2 = \\frac{1}{4}$, so taking the positive root, $x = \\frac{1}{2}$.\n\n"
                   "Therefore, the final answer is $\\boxed{\\frac{1}{2}}$.")


@pytest.mark.parametrize("completion, answer, expected", [
    (MATH_COMPLETION, "\\frac{1}{2}", 1.0),
    (MATH_COMPLETION, "0.5", 1.0),  # equivalent forms
    ("... so the answer is $\\boxed{0.5}$", "\\dfrac12", 1.0),
    ("The solutions are $\\boxed{3, 2}$.", "2, 3", 1.0),
    ("Hence $x \\in \\boxed{(-\\infty,2]}$", "(-\\infty, 2]", 1.0),
    ("$\\sqrt{8}=\\boxed{2\\sqrt2}$", "2\\sqrt{2}", 1.0),
    ("The answer is $\\boxed{\\text{(C)}}$", "\\text{(C)}", 1.0),
    (MATH_COMPLETION, "\\frac{1}{3}", 0.0),  # wrong
    ("First guess $\\boxed{1}$, but correcting: $\\boxed{2}$", "1", 0.0),  # the last box counts
    ("So the answer is 1/2.", "\\frac{1}{2}", 0.0),  # no box
    ("The answer is $\\boxed{\\frac{1}{2}", "\\frac{1}{2}", 0.0),  # cut off mid-box
    ("$\\boxed{}$", "5", 0.0),
    ("$\\boxed{x^{2^{3^{4}}} + \\frac{ }{ }}$", "5", 0.0),  # garbage does not crash
])
def test_math_verify_checker(completion, answer, expected):
    assert CHECKERS["math_verify"](completion, answer) == expected


def test_math_verify_works_off_the_main_thread():
    """math-verify's default timeouts use signal.alarm, which raises in a worker thread."""
    out = []
    t = threading.Thread(target=lambda: out.append(CHECKERS["math_verify"](MATH_COMPLETION, "0.5")))
    t.start()
    t.join()
    assert out == [1.0]


def test_last_boxed():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{a}{b}} c") == "\\frac{a}{b}"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("so $\\boxed {12}$.") == "12"
    assert last_boxed("none") is None
    assert last_boxed("\\boxed{unclosed {x}") is None


@pytest.mark.parametrize("completion, letter", [
    ("The charge unit is the coulomb.\n\n$\\boxed{D}$", "D"),
    ("So the correct option is \\boxed{\\text{(B)}}.", "B"),
    ("\\boxed{C. 2 mol}", "C"),
    ("Reasoning...\nAnswer: A", "A"),
    ("Thus, the answer is (C).", "C"),
    ("**Answer:** B", "B"),
    ("The answer is a bit unclear to me.", None),  # a lowercase article is not option A
    ("I think it's the coulomb.", None),
    ("\\boxed{42}", None),
])
def test_mmlu_final_letter(completion, letter):
    assert final_letter(completion) == letter


def test_mmlu_letter_checker():
    assert CHECKERS["mmlu_letter"]("... therefore \\boxed{D}", "D") == 1.0
    assert CHECKERS["mmlu_letter"]("... therefore \\boxed{A}", "D") == 0.0
    assert CHECKERS["mmlu_letter"]("no idea", "D") == 0.0


CD = json.dumps({"numbers": [17, 97, 21], "target": 260})


@pytest.mark.parametrize("completion, binary, partial", [
    ("17*21 = 357, minus 97 is 260.\n<answer>17*21 - 97</answer>", 1.0, 1.0),
    ("<answer>(21 * 17) - 97</answer>", 1.0, 1.0),
    ("Therefore $\\boxed{17*21-97}$", 1.0, 1.0),  # boxed, when there is no answer tag
    ("<answer>17*21 + 97</answer>", 0.0, 0.05),  # wrong value
    ("<answer>17*21 - 97 + 0</answer>", 0.0, 0.05),  # a number that was not given
    ("<answer>17 × 21 - 97</answer>", 0.0, 0.01),  # not parseable as arithmetic
    ("<answer>17*21 - 97 = 260</answer>", 0.0, 0.01),
    ("I could not find one.", 0.0, 0.01),
    ("<answer>__import__('os').system('touch /tmp/klrl_pwned')</answer>", 0.0, 0.01),  # never evaluated
    ("<answer>9**9**9</answer>", 0.0, 0.01),
])
def test_countdown_checkers(completion, binary, partial):
    assert CHECKERS["countdown"](completion, CD) == binary
    assert CHECKERS["countdown_partial"](completion, CD) == pytest.approx(partial)
    assert not Path("/tmp/klrl_pwned").exists()


# --- loaders on fixtures --------------------------------------------------------------------------------------------

def test_math_task_on_fixtures():
    cfg = cfg_for("task=math", *MATH_FIX)
    task = TASKS["math"](cfg.task, seed=0)
    # 9 rows over the 7 subject folders; the one whose solution has no \boxed{} is left out
    assert len(task.train) == 8
    answers = {p.answer for p in task.train}
    assert {"5", "3", "\\frac{1}{4}", "10", "2, 3", "2", "\\frac{2}{5}", "\\frac{1}{2}"} == answers
    p = next(p for p in task.train if p.answer == "\\frac{1}{4}")
    assert p.prompt.endswith("Please reason step by step, and put your final answer within \\boxed{}.")
    assert p.meta == {"level": "Level 2", "type": "Counting & Probability"} and p.checker == "math_verify"
    assert task.sample_train(random.Random(3), 5) == task.sample_train(random.Random(3), 5)
    assert len(set(task.sample_train(random.Random(0), 8))) == 8  # without replacement within a step

    splits = task.eval_splits()
    assert list(splits) == ["id", "ood"]
    ids = splits["id"]
    assert [p.answer for p in ids] == ["11", "\\frac{3}{4}", "(-\\infty, 2]", "2\\sqrt{2}"]
    assert ids[0].meta == {"level": 1, "subject": "Prealgebra", "unique_id": "test/prealgebra/1001.json"}
    assert task.score(ids[1], "Dividing by 2: $\\boxed{0.75}$") == 1.0
    ood = splits["ood"]
    assert len(ood) == 4 and {p.checker for p in ood} == {"mmlu_letter"}
    assert [p.answer for p in ood] == ["D", "A", "C", "D"]  # physics, physics, chemistry, biology (test split)
    assert task.score(ood[0], "The SI unit of charge is the coulomb, so \\boxed{D}.") == 1.0


def test_eval_size_takes_the_same_subset_every_time():
    cfg = cfg_for("task=math", *MATH_FIX, "task.eval_size=2")
    a, b = TASKS["math"](cfg.task, seed=0).eval_splits(), TASKS["math"](cfg.task, seed=5).eval_splits()
    assert len(a["id"]) == 2 and a == b


def test_mmlu_college_task_on_fixtures():
    cfg = cfg_for("task=mmlu_college", f"task.data.path={FIX}/mmlu")
    task = TASKS["mmlu_college"](cfg.task, seed=0)
    assert len(task.train) == 6  # dev + validation, one row each per subject
    splits = task.eval_splits()
    assert {k: len(v) for k, v in splits.items()} == {"college_physics": 2, "college_chemistry": 1, "college_biology": 1}
    p = splits["college_chemistry"][0]
    assert p.answer == "C" and p.checker == "mmlu_letter" and p.meta == {"subject": "college_chemistry"}
    assert p.prompt.startswith("The following is a multiple choice question about college chemistry.")
    assert "\n\nA. 0.5\nB. 1\nC. 2\nD. 18" in p.prompt
    assert task.score(p, "36 / 18 = 2 moles. Answer: C") == 1.0


def test_countdown_task():
    cfg = cfg_for("task=countdown", "task.eval_size=5")
    task = TASKS["countdown"](cfg.task, seed=0)
    train = task.sample_train(random.Random(1), 4)
    assert train == task.sample_train(random.Random(1), 4)  # a resumed step replays the same problems
    for p in train:
        spec = json.loads(p.answer)
        assert 3 <= len(spec["numbers"]) <= 4 and 100 <= spec["target"] <= 999
        assert "<answer>" in p.prompt and str(spec["target"]) in p.prompt
        assert task.score(p, f"<answer>{p.meta['expression']}</answer>") == 1.0  # reasoning-gym's own solution
    splits = task.eval_splits()
    assert splits == TASKS["countdown"](cfg.task, seed=7).eval_splits()  # fixed, independent of the run seed
    assert all(5 <= len(json.loads(p.answer)["numbers"]) <= 6 for p in splits["ood"])
    assert not {p.answer for p in train} & {p.answer for s in splits.values() for p in s}

    partial = TASKS["countdown"](cfg_for("task=countdown", "task.partial_credit=true").task, seed=0)
    assert partial.score(partial.sample_train(random.Random(1), 1)[0], "<answer>1+1</answer>") == pytest.approx(0.05)


@pytest.mark.parametrize("overrides, message", [
    (["task.ood_min_numbers=3", "task.ood_max_numbers=4"], "OOD split must differ"),
    (["task.min_target=0"], "task.min_target=0 is not valid; it must be an integer in 1..1000000000"),
    (["task.eval_seed=-1"], "task.eval_seed=-1"),
])
def test_countdown_bad_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        cfg_for("task=countdown", *overrides)


# --- missing or unreachable data ------------------------------------------------------------------------------------

def test_missing_local_directory():
    with pytest.raises(ConfigError, match=r"task.eval_data.path='/nonexistent/MATH-500' is not a directory"):
        cfg_for("task=math", *MATH_FIX, "task.eval_data.path=/nonexistent/MATH-500")


def test_offline_without_cache_says_how_to_download(hub_off):
    with pytest.raises(ConfigError) as e:
        cfg_for("task=math")
    msg = str(e.value)
    assert "\n" not in msg
    assert "task.train_data.path='EleutherAI/hendrycks_math' is not in the Hugging Face cache" in msg
    assert "hf download --repo-type dataset EleutherAI/hendrycks_math" in msg
    assert "huggingface-cli download --repo-type dataset EleutherAI/hendrycks_math" in msg


def test_offline_with_a_cached_snapshot_passes_the_check(hub_off, tmp_path):
    for repo in ("EleutherAI/hendrycks_math", "HuggingFaceH4/MATH-500", "cais/mmlu"):
        (tmp_path / "hf" / "hub" / f"datasets--{repo.replace('/', '--')}" / "snapshots" / "abc123").mkdir(parents=True)
    cfg_for("task=math")


def test_hub_id_loads_from_a_predownloaded_cache_offline(hub_off, tmp_path):
    """What `hf download --repo-type dataset HuggingFaceH4/MATH-500` leaves in the cache, read with the hub off."""
    repo = tmp_path / "hf" / "hub" / "datasets--HuggingFaceH4--MATH-500"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    shutil.copy(FIX / "MATH-500" / "test.jsonl", repo / "snapshots" / commit / "test.jsonl")
    cfg = cfg_for("task=math", *MATH_FIX[:1], *MATH_FIX[2:])
    assert [p.answer for p in TASKS["math"](cfg.task, seed=0).eval_splits()["id"]][:2] == ["11", "\\frac{3}{4}"]


def test_online_check_defers_to_run_time(monkeypatch):
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    cfg_for("task=math")  # nothing fetched, nothing said


def test_loading_offline_from_an_incomplete_cache_is_one_line(hub_off, tmp_path):
    # The check only looks for a snapshot folder; the files themselves are found (or not) at load time.
    (tmp_path / "hf" / "hub" / "datasets--HuggingFaceH4--MATH-500" / "snapshots" / "abc123").mkdir(parents=True)
    cfg = cfg_for("task=math", *MATH_FIX[:1], *MATH_FIX[2:])  # MATH-500 from the hub cache
    with pytest.raises(ConfigError) as e:
        TASKS["math"](cfg.task, seed=0).eval_splits()
    assert "\n" not in str(e.value) and "could not be fetched" in str(e.value)
    assert "hf download --repo-type dataset HuggingFaceH4/MATH-500" in str(e.value)


def test_missing_subject_file_is_named():
    with pytest.raises(ConfigError, match=r"no file matches 'college_medicine/dev-\*\.parquet'"):
        cfg = cfg_for("task=mmlu_college", f"task.data.path={FIX}/mmlu", "task.subjects=[college_medicine]")
        TASKS["mmlu_college"](cfg.task, seed=0).eval_splits()


def test_klrl_train_fails_in_one_line_when_data_is_unavailable(hub_off, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([str(Path(sys.executable).parent / "klrl"), "train", "task=math", f"hydra.run.dir={run_dir}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("klrl: task.train_data.path=") and "hf download" in lines[0]
    assert not run_dir.exists()
