"""The public Python API: `import cairn` stays light, and the README's example runs (on a tiny model)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO


def test_import_is_lazy():
    code = "import sys, cairn; print('torch' in sys.modules, 'transformers' in sys.modules, cairn.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[:2] == ["False", "False"]
    import cairn

    assert callable(cairn.run_experiment) and callable(cairn.merge_adapters) and callable(cairn.build_report)
    with pytest.raises(AttributeError):
        cairn.not_a_function  # noqa: B018
    for name in cairn.__all__:
        assert getattr(cairn, name) is not None, name


def readme_example() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs(tmp_path, tiny_model_dir, data_dir, monkeypatch, capsys):
    code = readme_example()
    assert '"smollm2-135m"' in code and "runs/api-demo" in code
    # the tiny model instead of the built-in one, and a working directory of its own
    code = code.replace('"smollm2-135m"', repr(str(tiny_model_dir)))
    code = code.replace('"max_steps": 20', '"max_steps": 2, "batch_size": 4, "max_length": 64')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CAIRN_DATA", str(data_dir))
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "{'one-round': 'ok'}" in out
    assert (tmp_path / "runs/api-demo/ties/adapter_config.json").is_file()
    assert re.search(r"\{'arc_easy': 0\.\d+, 'piqa': 0\.\d+\}", out)
    assert (tmp_path / "runs/api-demo/report/report.html").is_file()
