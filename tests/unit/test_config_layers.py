"""Layering a site file, presets and overrides (issue 26): ``extends:`` finds shipped names as
``--preset`` does, several ``--preset`` stack in order, ``--sources`` names where each value came
from, and submit makes ``run.output_dir`` absolute, warning when compute nodes may not see it."""

import subprocess
import sys
from pathlib import Path

import pytest

from deepscaler import submit
from deepscaler.config import ConfigError, load_config, load_layers, sources, stage_config, yaml_dir

REPO = Path(__file__).resolve().parents[2]
SITE = "run:\n  output_dir: /shared/runs\nslurm:\n  partition: debug\n  account: lab\n"


def _site(folder: Path, text: str = SITE, name: str = "site.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return folder / name


# --------------------------------------------------------------------------- extends

@pytest.mark.parametrize("name", ["tiny", "tiny.yaml"])
def test_extends_finds_a_shipped_name_from_a_file_anywhere(tmp_path, name):
    cfg = load_config(_site(tmp_path, f"extends: {name}\n" + SITE))
    assert cfg.model.name == "tiny" and cfg.data.train == "bundled:additions"  # tiny.yaml, and what it extends
    assert (cfg.slurm.partition, cfg.slurm.account, cfg.run.output_dir) == ("debug", "lab", "/shared/runs")


def test_extends_prefers_the_file_next_to_it_then_takes_absolute_paths(tmp_path):
    _site(tmp_path, "extends: tiny-random\nrun:\n  name: mine\n", name="tiny.yaml")  # shadows the shipped tiny.yaml
    assert load_config(_site(tmp_path, "extends: tiny.yaml\n")).run.name == "mine"
    assert load_config(_site(tmp_path, "extends: tiny\n")).run.name == "tiny"  # not a file here: as --preset tiny
    shipped = yaml_dir() / "tiny.yaml"
    assert load_config(_site(tmp_path / "b", f"extends: {shipped}\n")).data.train == "bundled:additions"
    _site(tmp_path / "sub", "run:\n  name: nested\n", name="x.yaml")
    assert load_config(_site(tmp_path, "extends: [tiny-random, sub/x.yaml]\n", name="y.yaml")).run.name == "nested"


def test_extends_of_an_unknown_name_is_one_line_naming_the_file_and_the_key(tmp_path):
    site = _site(tmp_path, "extends: tyni\n")
    with pytest.raises(ConfigError) as e:
        load_config(site)
    assert str(e.value) == (f"{site}: key 'extends' names a missing file 'tyni', neither next to it nor in the "
                            "shipped yaml/ (did you mean 'tiny'?)")
    # A path with a folder is a path: it is not looked up among the shipped names.
    site = _site(tmp_path, "extends: sub/tiny.yaml\n")
    with pytest.raises(ConfigError, match=r"^\S+site.yaml: key 'extends' names a missing file 'sub/tiny.yaml'$"):
        load_config(site)


# --------------------------------------------------------------------------- several presets

def test_presets_stack_in_order_the_later_winning(tmp_path):
    site = str(_site(tmp_path, SITE + "checkpoint:\n  interval: 7\n"))
    cfg = stage_config(1, [site, "tiny"])
    assert (cfg.slurm.partition, cfg.slurm.account, cfg.run.output_dir) == ("debug", "lab", "/shared/runs")
    assert cfg.model.name == "tiny" and cfg.checkpoint.interval == 5  # tiny's, given after the site file
    assert stage_config(1, ["tiny", site]).checkpoint.interval == 7  # the other order: the site file's
    assert stage_config(1, "tiny").checkpoint.interval == 5  # one preset as a plain string still works
    assert stage_config(1).model.name != "tiny"


def test_submit_takes_several_presets(tmp_path):
    site = str(_site(tmp_path, SITE.replace("/shared/runs", str(tmp_path / "runs"))))
    args = submit.build_parser().parse_args(["--preset", site, "--preset", "tiny-random", "--executor", "local"])
    assert args.presets == [site, "tiny-random"]
    (cfg,) = submit.resolve(args)
    assert (cfg.slurm.partition, cfg.slurm.account, cfg.run.output_dir) == ("debug", "lab", str(tmp_path / "runs"))
    assert cfg.model.name == "tiny"
    assert submit.build_parser().parse_args([]).presets is None  # no preset: the stage file alone


# --------------------------------------------------------------------------- sources

def test_sources_name_the_layer_that_set_each_value(tmp_path):
    site = _site(tmp_path, "extends: tiny\n" + SITE)
    cfg, layers = load_layers(["stage1", site], ["slurm.account=other"])
    where = {key: (value, source) for key, value, source in sources(cfg, layers)}
    assert where["slurm.partition"] == ("debug", str(site))
    assert where["slurm.account"] == ("other", "override 'slurm.account=other'")  # the override beats the file
    assert where["data.train"] == ("bundled:additions", str(yaml_dir() / "tiny.yaml"))  # what the site extends
    assert where["run.stage"] == (1, str(yaml_dir() / "stage1.yaml"))
    assert where["run.umask"] == ("0027", "default")
    assert where["eval.benchmarks.math500.samples"][1] == str(yaml_dir() / "tiny-random.yaml")  # a mapping's entry
    assert len(where) == len(sources(cfg, layers))  # one line per leaf key


def test_cli_prints_sources_and_keeps_plain_yaml_without_the_flag(tmp_path):
    site = _site(tmp_path)
    run = [sys.executable, "-m", "deepscaler.config", "stage1", str(site), "tiny", "run.max_steps=3"]
    out = subprocess.run([*run, "--sources"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    lines = {line.split(":")[0]: line for line in out.stdout.splitlines()}
    assert lines["slurm.partition"].endswith(f"# {site}") and '"debug"' in lines["slurm.partition"]
    assert lines["run.max_steps"].endswith("# override 'run.max_steps=3'")
    assert lines["run.umask"].endswith("# default")
    plain = subprocess.run(run, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert plain.returncode == 0 and plain.stdout.startswith("run:") and "#" not in plain.stdout.split("\n")[0]


# --------------------------------------------------------------------------- output_dir at submit

def _resolve(*argv: str):
    return submit.resolve(submit.build_parser().parse_args(["--preset", "tiny-random", *argv]))


def test_submit_makes_run_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (cfg,) = _resolve("--executor", "local", "--output-dir", "runs/../out", "data.cache_dir=cache")
    assert cfg.run.output_dir == str(tmp_path / "out") and cfg.data.cache_dir == str(tmp_path / "cache")
    (cfg,) = _resolve("--executor", "local")  # the default, outputs, from the folder submit runs in
    assert cfg.run.output_dir == str(tmp_path / "outputs") and cfg.data.cache_dir is None
    (cfg,) = _resolve("--executor", "local", "run.output_dir=~/runs")
    assert cfg.run.output_dir == str(tmp_path / "home" / "runs")
    # A stage chain: every stage, and the dry run's YAML (what run.yaml is written from), hold it.
    out = subprocess.run([sys.executable, "-m", "deepscaler.submit", "--stages", "1,2", "--preset", "tiny-random",
                          "--executor", "local", "--dry-run", "--output-dir", "rel"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(f"output_dir: {tmp_path / 'rel'}\n") == 2 and "output_dir: rel" not in out.stdout


@pytest.mark.parametrize("folder", ["/tmp", "/var/tmp", "/dev/shm"])
def test_a_node_local_output_dir_warns_for_slurm_only(folder, monkeypatch, capsys):
    monkeypatch.setattr(submit, "nodes_elsewhere", lambda: True)
    (cfg,) = _resolve("--executor", "slurm", "--output-dir", f"{folder}/runs")
    assert cfg.run.output_dir == f"{folder}/runs"  # a warning, not a refusal
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"warning: run.output_dir {folder}/runs is under {folder}, ")
    _resolve("--executor", "local", "--output-dir", f"{folder}/runs")  # runs on this machine: it sees its /tmp
    assert capsys.readouterr().err == ""


def test_a_shared_output_dir_or_a_one_machine_cluster_does_not_warn(monkeypatch, capsys):
    monkeypatch.setattr(submit, "nodes_elsewhere", lambda: True)
    for out in ("/shared/runs", "/tmpfs/runs", "/var/tmpx"):  # only the folders themselves, not look-alikes
        _resolve("--executor", "slurm", "--output-dir", out)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(submit, "nodes_elsewhere", lambda: False)  # the tests' local cluster, or no sinfo
    _resolve("--executor", "slurm", "--output-dir", "/tmp/runs")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("listing, code, elsewhere", [
    ("127.0.0.1\n10.0.0.5\n", 0, True), ("node7\n", 0, True),
    ("127.0.0.1\n127.0.0.1\n", 0, False), ("localhost\n", 0, False), ("", 0, False),
    ("10.0.0.5\n", 1, False), (None, 0, False),  # sinfo failed, or is not on the PATH: no evidence
])
def test_nodes_elsewhere_needs_a_node_that_is_not_this_machine(listing, code, elsewhere, monkeypatch):
    def fake_run(argv, **kwargs):
        if listing is None:
            raise FileNotFoundError("sinfo")
        return subprocess.CompletedProcess(argv, code, stdout=listing, stderr="")

    monkeypatch.setattr(submit.subprocess, "run", fake_run)
    assert submit.nodes_elsewhere() is elsewhere


@pytest.mark.slurm
def test_the_local_clusters_nodes_are_this_machine(slurm_cluster):
    """So the tests' runs under /tmp, which its nodes see, get no warning."""
    assert not submit.nodes_elsewhere()


def test_a_site_file_and_a_preset_both_reach_the_batch_script(tmp_path):
    """The issue's case: partition, account and a relative output directory from the site file,
    the rest from the preset given after it; the dry run's sbatch script holds all three."""
    _site(tmp_path, SITE.replace("/shared/runs", "runs"))
    out = subprocess.run([sys.executable, "-m", "deepscaler.submit", "--stage", "1", "--preset", "site.yaml",
                          "--preset", "tiny-random", "--executor", "slurm", "--dry-run"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "#SBATCH --partition=debug\n" in out.stdout and "#SBATCH --account=lab\n" in out.stdout
    assert f"#SBATCH --output={tmp_path / 'runs'}/tiny/stage1/logs/slurm/" in out.stdout
    assert "model:\n  name: tiny\n" in out.stdout  # the preset's
