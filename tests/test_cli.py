"""The `csm-jax` console command, installed by `pip install -e .` into a fresh virtual environment.

The environment is new and empty but for the project: `pip install --no-deps -e .` puts csm-jax (and its
console script) in it; pip, the build backend and the dependencies are the test environment's, made visible
by a .pth file (so nothing is downloaded). The command is then run as a user runs it, from the environment's bin/.
"""

import os
import re
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["synthesize", "serve", "converse", "finetune", "codec", "convert"]
SCRIPTS = {"synthesize": "synthesize", "serve": "serve", "converse": "converse", "finetune": "finetune",
           "codec": "codec", "convert": "convert_ckpt"}


def _env() -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    e["COLUMNS"] = "120"  # the help's layout follows the terminal width
    return e


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("venv") / "env"
    venv.EnvBuilder(with_pip=False).create(where)
    py = where / "bin" / "python"
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "test-dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    r = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation",
                        "--disable-pip-version-check", "-e", str(ROOT)], env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return where


def _run(argv, **kw):
    return subprocess.run([str(a) for a in argv], env=_env(), capture_output=True, text=True, timeout=300, **kw)


def test_the_console_command_comes_from_the_editable_install(fresh_env):
    r = _run([fresh_env / "bin" / "python", "-c", "import csm_jax; print(csm_jax.__file__)"], cwd=fresh_env)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == ROOT / "csm_jax" / "__init__.py"
    r = _run([fresh_env / "bin" / "csm-jax", "--help"], cwd=fresh_env)
    assert r.returncode == 0, r.stderr
    listed = re.findall(r"^  (\S+)  +\S", r.stdout, flags=re.M)
    assert listed == COMMANDS, r.stdout
    r = _run([fresh_env / "bin" / "csm-jax"], cwd=fresh_env)
    assert r.returncode == 2 and r.stderr.startswith("usage: csm-jax COMMAND"), r.stderr
    r = _run([fresh_env / "bin" / "csm-jax", "synth"], cwd=fresh_env)
    assert r.returncode == 2 and r.stderr == (
        "error: unknown command 'synth'; the commands are synthesize, serve, converse, finetune, codec, convert "
        "(csm-jax --help)\n"), r.stderr


@pytest.mark.parametrize("name", COMMANDS + ["codec encode", "codec decode", "serve converse"])
def test_each_command_has_the_help_of_its_script(fresh_env, name):
    words = name.split()
    script = f"scripts/{SCRIPTS[words[0]]}.py"
    cmd = _run([fresh_env / "bin" / "csm-jax", *words, "--help"], cwd=ROOT)
    old = _run([fresh_env / "bin" / "python", script, *words[1:], "--help"], cwd=ROOT)
    assert cmd.returncode == 0 and old.returncode == 0, cmd.stderr + old.stderr
    # The same text but for the program's name in the usage line.
    assert cmd.stdout.startswith(f"usage: csm-jax {name} ") and old.stdout.startswith(f"usage: {script} ")
    assert cmd.stdout.replace(f"csm-jax {words[0]}", "PROG", 1) == old.stdout.replace(script, "PROG", 1)


def test_a_mistake_is_one_line_and_status_2(fresh_env, tmp_path):
    r = _run([fresh_env / "bin" / "csm-jax", "synthesize", "--text", "   ", "--out", tmp_path / "a.wav"], cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == "error: text is empty: give the words to speak", r.stderr
    r = _run([fresh_env / "bin" / "csm-jax", "codec", "decode", tmp_path / "none.npy", tmp_path / "a.wav"],
             cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == f"error: codes file not found: {tmp_path / 'none.npy'}", r.stderr
    assert list(tmp_path.iterdir()) == []
