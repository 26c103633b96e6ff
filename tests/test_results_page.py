"""docs/results.md as a page a user can act on (issue 26): every command on it runs as written, as far
as a CPU can tell (its script accepts its flags; its --config and --set resolve, stages included);
its links, plots and raw-result paths exist; the README's results section points to its sections.

Running the GPU commands takes the GPU each names; the CPU ones are exercised here or by the tests
named in the page's sections (the bench plots run below; copy_probe and gca_readout in miniature,
marked slow: `python -m pytest -q -m slow tests/test_results_page.py`).
"""

import argparse
import json
import re
import runpy
import shlex
import sys
import warnings

import pytest

from drt_jax.train.config import load_run_config
from tests.test_wording import ROOT

RESULTS = ROOT / "docs" / "results.md"
PAGES = (RESULTS, ROOT / "experiments" / "README.md")
PREFIXES = ("python ", "python3 ", "PYTHONPATH=", "XLA_PYTHON_CLIENT_MEM_FRACTION=", "NCCL_")


def page_commands(path) -> list[str]:
    """Every command of a page: each line of its ```bash blocks (continuations joined, comments and
    shell built-ins like mkdir skipped later) and each inline code span that starts like a command."""
    text = path.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(line)
    for span in re.findall(r"(?<!`)`([^`\n]+)`(?!`)", re.sub(r"```.*?```", "", text, flags=re.S)):
        if span.startswith(PREFIXES):
            commands.append(span)
    return commands


class _Parsed(Exception):
    def __init__(self, namespace):
        self.namespace = namespace


def parse_command(command: str, monkeypatch) -> tuple[list[str], argparse.Namespace] | None:
    """The command's script or module and its parsed arguments, or None for a non-python command.
    Raises SystemExit when the script's parser refuses the arguments."""
    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words = words[1:]  # environment settings
    if not words or words[0] not in ("python", "python3"):
        return None
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.chdir(ROOT)
    try:
        if words[1] == "-m":
            monkeypatch.setattr(sys, "argv", [words[2], *words[3:]])
            with warnings.catch_warnings():  # the module is imported already; running it again is the point
                warnings.simplefilter("ignore", RuntimeWarning)
                runpy.run_module(words[2], run_name="__main__", alter_sys=False)
        else:
            script = ROOT / words[1]
            assert script.is_file(), f"{words[1]} does not exist"
            monkeypatch.setattr(sys, "argv", [str(script), *words[2:]])
            runpy.run_path(str(script), run_name="__main__")
    except _Parsed as parsed:
        return words[1:3], parsed.namespace
    raise AssertionError(f"{command!r} never parsed its arguments")


def _commands():
    return [(path.relative_to(ROOT).as_posix(), c) for path in PAGES for c in page_commands(path)]


def test_the_pages_have_commands():
    assert len(page_commands(RESULTS)) > 40 and len(page_commands(PAGES[1])) > 8


@pytest.mark.parametrize("page,command", _commands(), ids=lambda x: x if x.endswith(".md") else x[:70])
def test_every_command_on_the_page_parses_and_its_config_resolves(page, command, monkeypatch, capsys):
    try:
        parsed = parse_command(command, monkeypatch)
    except SystemExit as err:
        pytest.fail(f"{page}: {command}\n  refused (exit {err.code}): {capsys.readouterr().err.strip()[-400:]}")
    if parsed is None:
        return
    _, ns = parsed
    config = getattr(ns, "config", None)
    if config is None:
        return
    overrides = getattr(ns, "overrides", None) or getattr(ns, "set", None) or []
    load_run_config(config, overrides)
    for stage in getattr(ns, "stages", []) or []:
        seconds, _, rest = stage.partition(":")
        float(seconds)
        load_run_config(config, [*overrides, *shlex.split(rest)])


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path) -> set[str]:
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", path.read_text(), re.M)}


def test_links_point_to_sections_that_exist():
    anchors = _anchors(RESULTS)
    readme = (ROOT / "README.md").read_text()
    readme_links = re.findall(r"\]\(docs/results\.md#([^)]+)\)", readme)
    for section in ("gca-kernels", "training-throughput", "inference-decode-prefill-offload",
                    "single-niah-passkeys-from-4k-to-16m", "2-hop-niah", "the-sliding-window-baseline",
                    "perplexity", "experiment-log"):
        assert section in readme_links, f"README's results section does not point to #{section}"
    page_links = re.findall(r"\]\(#([^)]+)\)", RESULTS.read_text())
    missing = sorted({a for a in readme_links + page_links if a not in anchors})
    assert not missing, f"links to sections that docs/results.md does not have: {missing}"


def test_plots_and_raw_result_paths_exist():
    text = RESULTS.read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(images) >= 15
    missing = [i for i in images if not (RESULTS.parent / i).is_file()]
    paths = {p for p in re.findall(r"`((?:experiments/results|docs/img|bench/results)/[^`*<\s]*)`", text)}
    missing += [p for p in sorted(paths) if not (ROOT / p).exists()]
    assert not missing, f"docs/results.md names files that do not exist: {missing}"


def test_the_training_throughput_section_ends_with_issue_23s_subsections():
    text = RESULTS.read_text()
    section = text.split("\n## Training throughput\n", 1)[1].split("\n## ", 1)[0]
    assert "\n### Trainer loop vs step (issue 23)\n" in section
    titles = [part.split("\n", 1)[0] for part in section.split("\n### ")[1:]]
    tail = titles[titles.index("Trainer loop vs step (issue 23)"):]
    assert all(t.endswith("(issue 23)") for t in tail), titles


def test_bench_plots_of_the_page(tmp_path):
    """`python experiments/plots.py bench --out-dir docs/img`, into a temporary folder."""
    from tests.test_experiments import _load

    plots = _load("plots")
    assert plots.main(["bench", "--out-dir", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bench-gca-kernels.png", "bench-inference.png", "bench-train-throughput.png"]
    runs = json.loads((ROOT / "bench" / "results" / "train_throughput.json").read_text())["runs"]
    table = plots.train_throughput_table(runs)
    # The page's table: the fused-kernel rows, and full-133m at 4K from the first measurement.
    assert round(table[("drt-133m", 16384)]["tokens_per_s"]) == 190828
    assert round(table[("swa-133m", 16384)]["tokens_per_s"]) == 232051
    assert round(table[("full-133m", 4096)]["tokens_per_s"]) == 159420


@pytest.mark.slow  # about 30 s of compilation on a 2-core CPU
def test_copy_probe_runs(capsys):
    """The page's `python experiments/copy_probe.py --steps 200 --length 256 --set window=300`, in miniature."""
    from tests.test_experiments import _load

    _load("copy_probe").main(["--steps", "2", "--length", "128", "--batch", "2", "--set", "window=300"])
    assert "answer" in capsys.readouterr().out.lower()


@pytest.mark.slow  # about 20 s of compilation on a 2-core CPU
def test_gca_readout_pairs_runs(tmp_path):
    """The page's gca_readout.py --pairs commands, in miniature: the JSON keeps the run's flags."""
    from tests.test_experiments import _load

    out = tmp_path / "pairs.json"
    assert _load("gca_readout").main(["--pairs", "2", "--steps", "1",
                                      "--chunks", "4", "--top-k", "2", "--window", "8", "--seeds", "0",
                                      "--wiring", "standard", "--noise-filler", "--log", "1", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["args"]["pairs"] == 2
