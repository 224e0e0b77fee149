"""Reports built from hand-written results.json fixtures: exact table cells, files, PNGs, HTML."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from cairn.cli import main
from cairn.errors import CairnError
from cairn.report import build_report, new_knowledge_table_markdown
from cairn.report.tables import Table, comparison_tables, to_csv, to_latex
from cairn.report.runs import load_runs

TASKS = [
    {"name": "demo-zoology", "metric": "exact_match"},
    {"name": "demo-geography", "metric": "exact_match"},
    {"name": "demo-math", "metric": "gsm8k"},
]
ROWS = ["base", "demo-zoology", "demo-geography", "demo-math"]
FFT = [
    [0.0, 0.25, 0.5],
    [0.8, 0.25, 0.5],
    [0.6, 0.75, 0.4],
    [0.4, 0.5, 1.0],
]
LORA = [
    [0.0, 0.25, 0.5],
    [0.6, 0.25, 0.5],
    [0.6, 0.5, 0.5],
    [0.6, 0.5, 0.75],
]
OLD_FFT = {
    "tasks": ["arc_easy", "piqa"],
    "metric": {"arc_easy": "acc_norm", "piqa": "acc"},
    "matrix": [[0.5, 0.6], None, [0.45, 0.62], [0.4, 0.63]],  # round 1 not evaluated
    "stderr": [[0.02, 0.02], None, [0.02, 0.02], [0.02, 0.02]],
}
OLD_LORA = {
    "tasks": ["arc_easy", "piqa"],
    "metric": {"arc_easy": "acc_norm", "piqa": "acc"},
    "matrix": [[0.5, 0.6], [0.5, 0.6], [0.5, 0.61], [0.49, 0.6]],
}


def _results(name, method, matrix, rows=ROWS, old=None):
    res = {"name": name, "method": method, "model": "smollm2-135m", "tasks": TASKS, "rows": rows, "matrix": matrix,
           "timing": {"train_seconds": 12.5, "eval_seconds": 3.25}}
    if old:
        res["old_knowledge"] = old
    return res


def _write_run(d: Path, results: dict) -> Path:
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps(results))
    (d / "config.yaml").write_text(f"name: {results['name']}\nmethod: {results['method']}\nlr: 0.0002\n")
    return d


@pytest.fixture
def single_run(tmp_path):
    return _write_run(tmp_path / "demo-fft", _results("demo-fft", "seq-fft", FFT, old=OLD_FFT))


@pytest.fixture(scope="module")
def single_report(tmp_path_factory):
    """One single-run report built once (plots cost about a second each on a busy CPU)."""
    root = tmp_path_factory.mktemp("single")
    run = _write_run(root / "demo-fft", _results("demo-fft", "seq-fft", FFT, old=OLD_FFT))
    return build_report([run], root / "out")


@pytest.fixture
def experiment(tmp_path):
    exp = tmp_path / "exp"
    _write_run(exp / "seq-fft", _results("seq-fft", "seq-fft", FFT, old=OLD_FFT))
    _write_run(exp / "seq-lora", _results("seq-lora", "seq-lora", LORA, old=OLD_LORA))
    _write_run(exp / "merge-ties", _results("merge-ties", "merge-ties", [FFT[0], [0.5, 0.5, 0.5]], rows=["base", "merge-ties"]))
    (exp / "experiment.json").write_text(json.dumps({
        "methods": ["seq-fft", "seq-lora", "merge-ties", "o-lora-0.5"],
        "status": {"seq-fft": "ok", "seq-lora": "ok", "merge-ties": "ok", "o-lora-0.5": "failed: out of memory"},
    }))
    return exp


def test_new_knowledge_markdown_exact_cells():
    md = new_knowledge_table_markdown(_results("demo-fft", "seq-fft", FFT))
    lines = md.splitlines()
    assert lines[2] == "|  | demo-zoology | demo-geography | demo-math | AVE |"
    # AVE of each row: (0+.25+.5)/3=25.0, (.8+.25+.5)/3=51.7, (.6+.75+.4)/3=58.3, (.4+.5+1)/3=63.3
    assert "| base | 0.0 | 25.0 | 50.0 | 25.0 |" in lines
    assert "| after demo-zoology | 80.0 | 25.0 | 50.0 | 51.7 |" in lines
    assert "| after demo-geography | 60.0 | 75.0 | 40.0 | 58.3 |" in lines
    assert "| after demo-math | 40.0 | 50.0 | 100.0 | 63.3 |" in lines
    # gain: base 0 -> undefined; (.5-.25)/.25=+100%; (1-.5)/.5=+100%; AVE (63.33-25)/25 = +153.3%
    assert "| gain from base (%) | – | +100.0% | +100.0% | +153.3% |" in lines
    # points: +40, +25, +50, mean +38.3
    assert "| change from base (points) | +40.0 | +25.0 | +50.0 | +38.3 |" in lines
    # BWT: (.4-.8)/.8=-50%, (.5-.75)/.75=-33.3%, last task undefined, mean -41.7%
    assert "| BWT (%) | -50.0% | -33.3% | – | -41.7% |" in lines


def test_single_run_report_files_tables_and_html(single_report):
    page = single_report
    out = page.parent
    assert page.name == "report.html"
    old_md = (out / "tables" / "old_knowledge_demo-fft.md").read_text()
    # round 1 was not evaluated on old knowledge, so its row is absent
    assert "after demo-zoology" not in old_md
    assert "| base | 50.0 | 60.0 | 55.0 |" in old_md
    assert "| after demo-geography | 45.0 | 62.0 | 53.5 |" in old_md
    assert "| after demo-math | 40.0 | 63.0 | 51.5 |" in old_md
    # gain: (.4-.5)/.5=-20%, (.63-.6)/.6=+5%, AVE = mean of gains = -7.5% (paper Tables 1/2)
    assert "| gain from base (%) | -20.00% | +5.00% | -7.50% |" in old_md
    assert "arc_easy: acc_norm" in old_md

    csv_text = (out / "tables" / "new_knowledge_demo-fft.csv").read_text().splitlines()
    assert csv_text[0] == ",demo-zoology,demo-geography,demo-math,AVE"
    assert csv_text[-1] == "BWT (%),-50.0%,-33.3%,,-41.7%"
    tex = (out / "tables" / "new_knowledge_demo-fft.tex").read_text()
    assert r"gain from base (\%) & -- & +100.0\% & +100.0\% & +153.3\% \\" in tex
    assert tex.count(r"\midrule") == 2  # after the header and before the summary rows
    assert "demo-zoology" in (out / "tables.md").read_text()

    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert pngs == ["acquisition_demo-fft.png", "bwt_demo-fft.png", "gain_new_demo-fft.png",
                    "gain_old_demo-fft.png", "heatmap_demo-fft.png", "old_retention_demo-fft.png"]
    for name in pngs:
        _assert_nontrivial_png(out / "plots" / name)

    html = page.read_text()
    assert html.count('src="data:image/png;base64,') == len(pngs)
    assert "<script" not in html and 'src="http' not in html and "href=\"http" not in html
    assert "lr: 0.0002" in html  # the configuration is shown
    assert "+153.3%" in html and "demo-geography" in html


def _distinct_colours(path: Path) -> int:
    import matplotlib.image as mpimg

    rgb = (mpimg.imread(path)[..., :3] * 255).round().astype(np.uint32)  # PNG -> floats in [0, 1]
    packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]  # one int per colour: fast unique
    return len(np.unique(packed))


def _assert_nontrivial_png(path: Path, min_colours: int = 20) -> None:
    assert path.stat().st_size > 5000
    n = _distinct_colours(path)
    assert n > min_colours, f"{path.name} looks blank ({n} distinct colours)"


def test_experiment_dir_compares_methods(experiment, tmp_path):
    loaded = load_runs([experiment])
    assert [r.label for r in loaded.runs] == ["seq-fft", "seq-lora", "merge-ties"]
    assert loaded.skipped == [("o-lora-0.5", "failed: out of memory")]
    tables = {t.name: t for t in comparison_tables(loaded.runs)}

    new = tables["comparison_new"].rows
    assert new[0] == ["base", "0.0", "25.0", "50.0", "25.0"]
    assert new[1] == ["seq-fft", "40.0", "50.0", "100.0", "63.3"]
    assert new[2] == ["seq-lora", "60.0", "50.0", "75.0", "61.7"]  # (0.6+0.5+0.75)/3 = 61.7
    assert new[3] == ["merge-ties", "50.0", "50.0", "50.0", "50.0"]

    old = tables["comparison_old"].rows
    assert old == [["base", "50.0", "60.0", "55.0"], ["seq-fft", "40.0", "63.0", "51.5"], ["seq-lora", "49.0", "60.0", "54.5"]]

    summary = {row[0]: row[1:] for row in tables["comparison_summary"].rows}
    # seq-fft: base avg 25.0, last 63.3, gain of avg +153.3%, mean gain (100+100)/2, BWT mean -41.7%,
    # BWT points mean(.4-.8, .5-.75)*100 = -32.5, FWT mean(.25-.25, .4-.5)*100 = -5.0, old 51.5, -7.50%
    assert summary["seq-fft"] == ["25.0", "63.3", "+153.3%", "+100.0%", "-41.7%", "-32.5", "-5.0", "51.5", "-7.50%"]
    # seq-lora: last 61.7, gain of avg (61.67-25)/25 = +146.7%, mean gain (100+50)/2 = +75%, no forgetting,
    # FWT mean(.25-.25, .5-.5) = 0, old last (0.49+0.6)/2 = 54.5, old gain mean(-2%, 0%) = -1.00%
    assert summary["seq-lora"] == ["25.0", "61.7", "+146.7%", "+75.0%", "+0.0%", "+0.0", "+0.0", "54.5", "-1.00%"]
    # merge-ties is not sequential: no BWT/FWT; gain of avg (50-25)/25 = +100%, mean gain (100+0)/2 = +50%
    assert summary["merge-ties"] == ["25.0", "50.0", "+100.0%", "+50.0%", "–", "–", "–", "–", "–"]

    page = build_report([experiment], tmp_path / "rep")
    html = page.read_text()
    assert "o-lora-0.5 is not shown: failed: out of memory" in html
    # signed cells are coloured by sign; a zero change is left neutral
    assert '<td class="num neg">-41.7%</td>' in html and '<td class="num">+0.0%</td>' in html
    out = page.parent
    for name in ("comparison_new", "comparison_old", "comparison_summary"):
        for ext in ("md", "csv", "tex"):
            assert (out / "tables" / f"{name}.{ext}").is_file()
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    # merge-ties is skipped in acquisition/BWT (not sequential) and has no old-knowledge retention plot
    assert pngs == ["acquisition.png", "bwt.png", "gain_new.png", "gain_old.png", "heatmap_merge-ties.png",
                    "heatmap_seq-fft.png", "heatmap_seq-lora.png", "old_average.png",
                    "old_retention_seq-fft.png", "old_retention_seq-lora.png"]
    for name in pngs:
        _assert_nontrivial_png(out / "plots" / name)
    assert html.count('src="data:image/png;base64,') == len(pngs)


def test_several_run_dirs_are_compared_as_methods(tmp_path):
    a = _write_run(tmp_path / "a", _results("fft", "seq-fft", FFT))
    b = _write_run(tmp_path / "b", _results("fft", "seq-lora", LORA))  # same name: labels get the dir
    loaded = load_runs([a, b])
    assert [r.label for r in loaded.runs] == ["fft (a)", "fft (b)"]
    summary = {t.name: t for t in comparison_tables(loaded.runs)}["comparison_summary"]
    assert to_csv(summary).splitlines()[2].startswith("fft (b),25.0,61.7,+146.7%,+75.0%,")


def test_latex_escapes_and_csv_blank_for_missing():
    t = Table("t", "50% of a_b", ["", "x_1"], [["r&d", "–"]], None, [])
    assert r"r\&d & -- \\" in to_latex(t) and r"\caption{50\% of a\_b}" in to_latex(t)
    assert to_csv(t).splitlines()[1] == "r&d,"


def test_missing_results_is_a_user_error(tmp_path, capsys):
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    with pytest.raises(CairnError, match="nothing-here: no results.json here"):
        build_report([empty])
    assert main(["report", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "no results.json" in err and "'tasks', 'rows'" in err
    assert main(["report", str(tmp_path / "absent")]) == 2


def test_malformed_results_name_the_file_and_key(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "results.json").write_text(json.dumps({"tasks": TASKS, "rows": ROWS}))
    with pytest.raises(CairnError, match=r"bad/results.json: missing key 'matrix'"):
        build_report([d])
    (d / "results.json").write_text(json.dumps({"tasks": TASKS, "rows": ROWS, "matrix": FFT[:3]}))
    with pytest.raises(CairnError, match="'matrix' has 3 rows but 'rows' names 4"):
        build_report([d])


def test_cli_report_defaults_to_run_dir(single_run, capsys):
    assert main(["report", str(single_run)]) == 0
    assert (single_run / "report" / "report.html").is_file()
    assert (single_run / "report" / "tables" / "summary.md").is_file()
    assert "report written to" in capsys.readouterr().out


@pytest.mark.integration
def test_html_renders_in_headless_chromium(single_report, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not on PATH (apt-get install chromium) - cannot check the page renders")
    page = single_report
    shot = tmp_path / "shot.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           f"--screenshot={shot}", "--window-size=1200,2000", page.resolve().as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    # a rendered page with its plots has hundreds of colours; a blank or broken one has a few
    _assert_nontrivial_png(shot, min_colours=200)


def test_diagnostics_table_from_results():
    from cairn.report.tables import diagnostics_table, to_markdown

    results = {"diagnostics": {
        "threshold": {"value": 0.01, "mode": "relative"},
        "updates": [{"round": "a", "sparsity": 0.5, "frobenius_norm": 2.0, "nuclear_norm": None, "l1": 10.0},
                    {"round": "b", "sparsity": 0.25, "frobenius_norm": 1.0, "nuclear_norm": 3.0, "l1": 4.0}],
        "pairs": [{"i": "a", "j": "b", "collision_rate": 0.125, "cosine": 0.5, "input_overlap": 0.25,
                   "output_overlap": None, "a_overlap": 0.75, "a_overlap_l1": 12.34}]}}
    table = diagnostics_table(results, "m")
    md = to_markdown(table)
    assert "| a × b | 0.125 | 0.500 | 0.250 | – | 0.750 | 12.3 |" in md
    assert "a: sparsity 0.500" in md and "‖ΔW‖_* 3.0" in md
    assert diagnostics_table({"diagnostics": None}) is None
