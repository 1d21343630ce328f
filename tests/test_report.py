"""``sslcore report``: the study blocks of docs/results.md (and the README) are what the committed results files
render."""
import json
from pathlib import Path

import pytest

from sslcore.cli import main
from sslcore.experiments import report

ROOT = Path(__file__).resolve().parents[1]


def test_the_documents_match_the_committed_results(capsys, monkeypatch):
    """Every results block of docs/results.md and the README is the rendering of its docs/results file: the
    numbers they show cannot drift from the files (or be typed in by hand).  The defaults are those files."""
    names = report.BLOCK.findall((ROOT / "docs/results.md").read_text() + (ROOT / "README.md").read_text())
    assert len({m[1] for m in names}) >= len(report.STUDIES), "a study has no block in docs/results.md"
    monkeypatch.chdir(ROOT)
    assert main(["report", "--check"]) == 0
    assert "docs/results.md, README.md: every results block matches" in capsys.readouterr().out
    for name in {m[1] for m in names}:
        assert (ROOT / "docs/results" / f"{name}.json").is_file()


def test_update_rewrites_only_blocks_and_reports_drift(tmp_path):
    results = json.loads((ROOT / "docs/results/oversmoothing.json").read_text())
    (tmp_path / "oversmoothing.json").write_text(json.dumps(results))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:oversmoothing -->\nstale 99.9\n<!-- /results:oversmoothing -->\noutro\n")
    assert main(["report", "--check", "--readme", str(readme), "--results", str(tmp_path)]) == 1
    assert "stale" in readme.read_text()  # --check writes nothing
    assert main(["report", "--no-plots", "--readme", str(readme), "--results", str(tmp_path)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n<!-- results:oversmoothing -->\n")
    assert text.endswith("<!-- /results:oversmoothing -->\noutro\n")
    assert "stale" not in text and report.render("oversmoothing", results) in text
    assert main(["report", "--check", "--readme", str(readme), "--results", str(tmp_path)]) == 0


@pytest.mark.parametrize("block, message", [("results:nosuch", "no such study"),
                                            ("results:transfer", "does not exist")])
def test_a_block_without_a_study_or_a_file_is_an_error(tmp_path, capsys, block, message):
    name = block.split(":")[1]
    readme = tmp_path / "README.md"
    readme.write_text(f"<!-- {block} -->\n<!-- /results:{name} -->\n")
    with pytest.raises(SystemExit) as e:
        main(["report", "--check", "--readme", str(readme), "--results", str(tmp_path)])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_mean_std_over_seeds():
    assert report.mean_std([0.5, 0.7, 0.9], scale=100) == "70.0 ± 20.0"  # sample std
    assert report.mean_std([0.123], digits=3) == "0.123"
    assert report.markdown_table(["a", "b"], [["x", "1"]]) == "| a | b |\n| --- | ---: |\n| x | 1 |"


def _bad_results(tmp_path, text):
    (tmp_path / "transfer.json").write_text(text)
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:transfer -->\n<!-- /results:transfer -->\n")
    return ["report", "--check", "--readme", str(readme), "--results", str(tmp_path)]


@pytest.mark.parametrize("text, message", [
    ('{"config": {}}', "transfer.json is not a complete transfer results file: it has no key 'runs'"),
    ("[1, 2]", "transfer.json holds a JSON list, not a study's results object"),
    ("{'config'", "transfer.json is not valid JSON"),
])
def test_a_bad_results_file_is_named_with_what_is_wrong(tmp_path, capsys, text, message):
    """The review's defects 10 and 26: a KeyError/TypeError traceback, or a JSON error naming no file."""
    with pytest.raises(SystemExit) as e:
        main(_bad_results(tmp_path, text))
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_an_unclosed_block_is_refused(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:transfer -->\nnumbers\n")
    with pytest.raises(SystemExit) as e:
        main(["report", "--readme", str(readme), "--results", str(tmp_path)])
    assert e.value.code == 2 and "results:transfer is never closed" in capsys.readouterr().err
    assert readme.read_text() == "intro\n<!-- results:transfer -->\nnumbers\n"


def test_a_study_replaces_only_a_results_file_it_wrote(tmp_path):
    """--overwrite replaces a study's results, never someone else's JSON nor a link; an error names the option."""
    mine = tmp_path / "results.json"
    mine.write_text((ROOT / "docs/results/oversmoothing.json").read_text())
    assert report.results_path(tmp_path, None, True) == mine
    with pytest.raises(ValueError, match="already exists"):
        report.results_path(tmp_path, None, False)
    theirs = tmp_path / "theirs.json"
    theirs.write_text('{"name": "my package"}')
    with pytest.raises(ValueError, match=f"--results-out {theirs} is not a study results file sslcore wrote"):
        report.results_path(tmp_path, str(theirs), True)
    link = tmp_path / "link.json"
    link.symlink_to(mine)
    with pytest.raises(ValueError, match=f"--results-out {link} is a symbolic link"):
        report.results_path(tmp_path, str(link), True)
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match=f"--results-out {afile / 'r.json'}: {str(afile)!r} is not a folder"):
        report.results_path(tmp_path, str(afile / "r.json"), False)


def test_oversmoothing_tables_names_a_file_that_is_not_its_results(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    with pytest.raises(SystemExit) as e:
        main(["oversmoothing", "--tables", str(bad)])
    assert e.value.code == 2 and f"--tables {bad} is not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "bad.png").exists()


def test_progress_counts_runs_and_gives_an_eta_after_the_first(capsys, monkeypatch):
    clock = iter([0.0, 0.0, 60.0, 130.0])
    monkeypatch.setattr(report.time, "perf_counter", lambda: next(clock))
    progress = report.Progress("study", 3)
    for label in ("a", "b", "c"):
        progress(label)
    assert capsys.readouterr().err.splitlines() == ["[study] run 1/3: a (0s elapsed)",
                                                   "[study] run 2/3: b (60s elapsed, ETA 2m)",
                                                   "[study] run 3/3: c (2m elapsed, ETA 65s)"]
