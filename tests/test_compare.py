"""compare.py: the aggregation on hand-made logs, the log reader and mean ± std every results/ script imports,
and a tiny end-to-end comparison."""
import json
import math
import py_compile

import pytest

import compare
from conftest import ROOT, load_script


def test_mean_std_se():
    mean, std, se = compare.mean_std_se([1.0, 2.0, 3.0, 6.0])
    # mean 3; squared deviations 4 + 1 + 0 + 9 = 14; sample std sqrt(14/3) = 2.160247; se = std / 2
    assert mean == 3.0 and std == pytest.approx(2.160247, abs=1e-6) and se == pytest.approx(1.080123, abs=1e-6)
    assert compare.mean_std_se([0.5]) == (0.5, 0.0, 0.0)


def test_mean_std_is_the_sample_std():
    mean, std = compare.mean_std([1.0, 2.0, 3.0, 6.0])
    assert mean == 3.0 and std == pytest.approx(math.sqrt(14 / 3))  # ddof 1, as mean_std_se
    assert compare.mean_std([0.5]) == (0.5, 0.0)  # one value: no spread, not a division by zero
    assert compare.mean_std(iter([2.0, 4.0])) == (3.0, pytest.approx(math.sqrt(2)))  # any iterable


def test_read_log_groups_by_kind_and_read_jsonl_keeps_order(tmp_path):
    lines = [{"kind": "teacher", "test_acc": 0.99}, {"kind": "eval", "step": 0, "test_acc": 0.5, "time_s": 0.1},
             {"kind": "step", "step": 1, "entropy": 0.9, "time_s": 1.5}, {"kind": "step", "step": 2, "entropy": 0.8,
             "time_s": 2.5}, {"kind": "final", "test_acc": 0.7, "exact": 0.1, "base_acc": 0.5, "time_s": 3.0}]
    path = tmp_path / "run.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")  # a trailing blank line is skipped
    assert compare.read_jsonl(path) == lines
    log = compare.read_log(path)
    assert [r["time_s"] for r in log["step"]] == [1.5, 2.5] and log["eval"][0]["step"] == 0
    assert log["final"]["test_acc"] == 0.7 and log["teacher"] == [lines[0]]


def test_results_scripts_compile_and_the_side_programs_left_compare():
    scripts = [f for f in (ROOT / "results").rglob("*.py") if "real_model" not in f.parts]
    assert {"sampler_probe.py", "benchmark.py", "summary.py", "run.py"} <= {f.name for f in scripts}
    for f in scripts:
        py_compile.compile(str(f), doraise=True)
    assert not hasattr(compare, "tree_sampler_probe") and not hasattr(compare, "gpu_benchmark")
    with pytest.raises(SystemExit):  # no longer a flag of compare.py: argparse refuses it
        compare.main(["--gpu_benchmark"])


def test_gpu_benchmark_reads_step_times_from_the_log(tmp_path):
    benchmark = load_script("results/gpu/benchmark.py")
    lines = [{"kind": "eval", "step": 0, "test_acc": 0.0, "exact": 0.0, "time_s": 5.0}]
    lines += [{"kind": "step", "step": i + 1, "time_s": t} for i, t in enumerate([10.0, 12.0, 13.0, 17.0])]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert benchmark.seconds_per_step(tmp_path / "a.jsonl") == 2.0  # gaps 2, 1, 4: the median; eval lines ignored
    (tmp_path / "b.jsonl").write_text(json.dumps(lines[1]) + "\n")
    assert benchmark.seconds_per_step(tmp_path / "b.jsonl") is None  # one step line: no gap


def test_first_step_at_or_below_threshold():
    steps, entropy = [1, 2, 3, 4, 5], [0.9, 0.4, 0.1, 0.05, 0.2]
    assert compare.first_at_or_below(steps, entropy, 0.1) == 3  # at counts, not only below
    assert compare.first_at_or_below(steps, entropy, 0.01) is None


def write_log(path, entropies, accs, final_acc, base=0.5, tokens=100.0, held_out=None):
    lines = [{"kind": "eval", "step": 0, "test_acc": base, "exact": 0.0, "entropy": 1.0}]
    held_out = held_out or [1.0] * len(entropies)
    for i, (e, a, h) in enumerate(zip(entropies, accs, held_out), start=1):
        lines.append({"kind": "step", "step": i, "entropy": e, "clip_frac": 0.1, "gen_tokens": tokens * i})
        lines.append({"kind": "eval", "step": i, "test_acc": a, "exact": 0.0, "entropy": h})
    lines.append({"kind": "final", "test_acc": final_acc, "exact": 0.0, "base_acc": base, "time_s": 1.0})
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def test_summary_curves_and_table(tmp_path):
    write_log(tmp_path / "a.jsonl", [0.5, 0.08, 0.05], [0.6, 0.7, 0.8], 0.8, held_out=[0.5, 0.2, 0.1])
    write_log(tmp_path / "b.jsonl", [0.5, 0.3, 0.09], [0.6, 0.9, 1.0], 1.0)
    logs = [compare.read_log(tmp_path / "a.jsonl"), compare.read_log(tmp_path / "b.jsonl")]
    for log, wall in zip(logs, (10.0, 20.0)):
        log["wall_s"] = wall
    steps, mean, se = compare.curve(logs, "eval", "test_acc")
    assert steps == [0, 1, 2, 3] and mean == pytest.approx([0.5, 0.6, 0.8, 0.9])
    assert se[2] == pytest.approx(math.sqrt(0.02) / math.sqrt(2))  # values 0.7 and 0.9: std 0.141421
    s = compare.summarise(logs)
    assert s["collapse"] == [2, 3] and s["test_acc"][0] == pytest.approx(0.9) and s["time_s"][0] == 15.0
    assert s["collapse_eval"] == [3, None]  # held-out entropy: 0.1 at step 3 in a, never in b
    table = compare.markdown_table({"x": s})
    assert "| x | 0.900 ± 0.141 | 0.500 | 2 ± 1 | 3 (1 of 2 seeds; others never) | 15 | 2 |" in table
    assert "| x | 0.100 ± 0.141 |" in compare.markdown_table({"x": s}, error=True)  # error = 1 - acc
    assert compare.collapse_cell([None, None]) == "never"
    assert compare.collapse_cell([4, None]) == "4 (1 of 2 seeds; others never)"


def test_cumulative_tokens_and_mixed_metrics(tmp_path):
    # run a samples 100, 200, 300 tokens at steps 1-3 (running sums 100, 300, 600); run b 50, 100, 150
    # (50, 150, 300): the x-axis is the mean across runs, 0 at step 0 before any sampling
    write_log(tmp_path / "a.jsonl", [0.5, 0.4, 0.3], [0.6, 0.7, 0.8], 0.8, tokens=100.0)
    write_log(tmp_path / "b.jsonl", [0.5, 0.4, 0.3], [0.6, 0.7, 0.8], 0.8, tokens=50.0)
    logs = [compare.read_log(tmp_path / "a.jsonl"), compare.read_log(tmp_path / "b.jsonl")]
    assert compare.cumulative_tokens(logs, [0, 1, 2, 3]) == [0.0, 75.0, 225.0, 450.0]
    for log in logs:
        log["wall_s"] = 1.0
    s = compare.summarise(logs)
    same = compare.markdown_table({"x": s, "y": s}, {"x": compare.DEFAULT_METRIC})
    assert "test_acc is" not in same  # one metric: no extra column
    mixed = compare.markdown_table({"x": s, "y": s}, {"y": "best@3 under w_gold"})
    assert "| test_acc is |" in mixed and "| best@3 under w_gold |" in mixed and compare.DEFAULT_METRIC in mixed


@pytest.mark.slow
def test_tiny_comparison_end_to_end(capsys, tmp_path):
    compare.main(["--methods", "pg,grpo", "--seeds", 1, "--steps", 2, "--out", tmp_path, "--x", "gen_tokens",
                  "--extra", "--warmup_steps 2 --eval_every 1 --prompts_per_step 4 --eval_size 32"])
    assert "pg: cannot share --epochs" in capsys.readouterr().out
    assert (tmp_path / "compare.png").stat().st_size > 10_000
    table = (tmp_path / "compare.md").read_text()
    assert table.count("\n") == 4 and "| pg |" in table and "| grpo |" in table
    assert (tmp_path / "grpo_seed0.jsonl").exists()


def test_per_method_flags_and_presets():
    assert compare.parse_per_method("grpo: --beta 0; tpo: --eta 2", ["grpo", "tpo"]) == {
        "grpo": ["--beta", "0"], "tpo": ["--eta", "2"]}
    with pytest.raises(SystemExit) as e:
        compare.parse_per_method("dapo: --max_rounds 3", ["grpo"])
    assert "--per_method" in str(e.value.code)
    tokrev = compare.PRESETS["tokrev"]  # the published budget (METHODS.md section 11)
    assert (tokrev["steps"], tokrev["prompts_per_step"] * tokrev["group_size"], tokrev["epochs"]) == (300, 96, 4)
    assert "--task tokrev" in tokrev["extra"] and "--eval_every 20" in tokrev["extra"]


def test_unknown_method_fails_cleanly():
    # compare.py stops with sys.exit("error: ..."), which Python prints to stderr as one line
    with pytest.raises(SystemExit) as e:
        compare.main(["--methods", "nope"])
    assert str(e.value.code).startswith("error: --methods") and "nope" in str(e.value.code)
