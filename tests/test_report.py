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
    for name in {m[1] for m in names} - {report.CLAIMS_BLOCK}:  # the claims block renders every file
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


def test_paired_test_is_student_t_by_hand_and_by_scipy():
    from scipy import stats

    t = report.paired_test([1.0, 2.0, 3.0])  # mean 2, sd 1, se 1/sqrt(3): t = 3.464 on 2 df
    assert t["mean"] == 2 and t["p"] == pytest.approx(0.074180, abs=1e-6)  # a t table's two-sided p
    assert (t["low"], t["high"]) == pytest.approx((2 - 4.302653 / 3 ** 0.5, 2 + 4.302653 / 3 ** 0.5))  # t_.975,2
    deltas = [0.7, -0.2, 1.9, 0.4, 1.1]
    ref = stats.ttest_rel([1 + d for d in deltas], [1.0] * 5)
    t = report.paired_test(deltas)
    assert t["p"] == pytest.approx(ref.pvalue) and (t["low"], t["high"]) == pytest.approx(ref.confidence_interval())
    assert report.paired_test([2.0])["p"] == 1.0  # one seed: nothing to test
    assert report.paired_test([0.0, 0.0])["p"] == 1.0 and report.paired_test([1.0, 1.0])["p"] == 0.0


def test_verdicts_need_the_test_and_the_bar():
    assert report.seed_verdict([1.0, 2.0, 3.0], 1.0) == "not shown"  # p = 0.074: every seed agrees, no test passes
    assert report.seed_verdict([2.0, 2.1, 1.9], 1.0) == "reproduced"  # mean >= the bar
    assert report.seed_verdict([0.5, 0.6, 0.4], 0.9) == "not shown"  # significant, the interval under the bar
    assert report.seed_verdict([0.6, 0.8, 0.4], 0.9) == "reproduced"  # p = 0.035, the interval holds 0.9
    assert report.seed_verdict([-2.0, -2.1, -1.9], 1.0) == "contradicted"
    c = report.claim("A > B", "study", [0.0, 0.0], 1.0, "paper", "pts", tested=False, why_untested="never ran")
    assert c["verdict"] == "not tested" and "+0.0 pts (every seed the same" in report.effect_words(c)


def test_the_readme_holds_the_claims_of_every_study_and_check_sees_drift(tmp_path, capsys):
    readme = (ROOT / "README.md").read_text()
    block = report.BLOCK.search(readme[readme.index("<!-- results:claims -->"):])
    assert block and readme.index("## Results") < readme.index("<!-- results:claims -->")
    assert block["body"].strip() == report.claims_markdown(ROOT / "docs/results")
    for name in report.STUDIES:  # every study with a file gives at least one claim row
        assert f"| [{name}](docs/results.md) |" in block["body"], name
    assert "| SimSiam-Multi > SimSiam | [benchmark](docs/results.md) |" in block["body"]
    (tmp_path / "ar-vs-mlm.json").write_text((ROOT / "docs/results/ar-vs-mlm.json").read_text())
    doc = tmp_path / "README.md"
    doc.write_text("<!-- results:claims -->\n| stale |\n<!-- /results:claims -->\n")
    assert main(["report", "--check", "--readme", str(doc), "--results", str(tmp_path)]) == 1
    assert "out of date" in capsys.readouterr().out
    assert main(["report", "--no-plots", "--readme", str(doc), "--results", str(tmp_path)]) == 0
    assert "AR > MLM on generation" in doc.read_text() and "benchmark" not in doc.read_text()
    (tmp_path / "ar-vs-mlm.json").unlink()
    with pytest.raises(SystemExit):
        main(["report", "--check", "--readme", str(doc), "--results", str(tmp_path)])
    assert "no results file" in capsys.readouterr().err


def test_a_studys_variant_file_renders_as_its_study(tmp_path, capsys):
    """``benchmark-more-seeds.json`` (a study's run at another budget) renders with the benchmark's renderers,
    after the study's own file, in its own block and in the claims; a name of no study stays an error."""
    assert report.study_of("benchmark") == "benchmark" and report.study_of("benchmark-simclr-attn") == "benchmark"
    assert report.study_of("mim-study-k100") == "mim-study" and report.study_of("benchmarks") is None
    base = json.loads((ROOT / "docs/results/benchmark.json").read_text())
    (tmp_path / "benchmark.json").write_text(json.dumps(base))
    (tmp_path / "benchmark-more-seeds.json").write_text(json.dumps(base))
    (tmp_path / "notes.json").write_text("{}")  # no study's: ignored
    assert [n for n, _ in report.results_files(tmp_path)] == ["benchmark", "benchmark-more-seeds"]
    rows = [r for r in report.claims_markdown(tmp_path).splitlines() if r.startswith("| SimCLR-Attn > SimCLR")]
    assert [r.split(" | ")[1] for r in rows] == ["[benchmark](docs/results.md)",
                                                 "[benchmark-more-seeds](docs/results.md)"]
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- results:benchmark-more-seeds -->\n<!-- /results:benchmark-more-seeds -->\n")
    assert main(["report", "--no-plots", "--readme", str(doc), "--results", str(tmp_path)]) == 0
    assert report.render("benchmark", base) in doc.read_text()
    doc.write_text("<!-- results:benchmarks -->\n<!-- /results:benchmarks -->\n")
    with pytest.raises(SystemExit):
        main(["report", "--no-plots", "--readme", str(doc), "--results", str(tmp_path)])
    assert "block results:benchmarks: no such study" in capsys.readouterr().err
    ar = json.loads((ROOT / "docs/results/ar-vs-mlm.json").read_text())  # a variant links its own plot
    text = report.render("ar-vs-mlm-more", ar)
    assert "results/ar-vs-mlm-more.png" in text and "results/ar-vs-mlm.png" not in text
