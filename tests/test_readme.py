"""The documentation runs: README.md and docs/*.md code blocks, and the cluster recipes of docs/.

- Every ```python block runs, as written, in a scratch folder (``SEGSWAP_EXAMPLE_SIZE=128`` keeps the
  README's example tiny; the quick start's checkpoint ``runs/demo/last.pth`` is a tiny untrained
  model there). A block whose first line is ``# not run by the tests: needs ...`` is skipped: it
  needs data the tests do not have, and says so where the reader sees it.
- Every ``segswap-*`` command line of a ```bash block (also behind ``ray job submit ... --`` and
  ``torchrun ... -m segswap.train.cli``) is parsed by that command's own option parser, so a renamed
  or removed flag breaks this test rather than a reader's run.
- docs/slurm_array.sh and docs/slurm_train.sh pass ``bash -n`` and run with stand-ins for SLURM's
  ``srun``/``scontrol``, ``torchrun`` and ``segswap-gen`` that parse the command lines the scripts
  build with the real parsers.
"""
import importlib
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tiny_checkpoint import write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = "# not run by the tests:"
# Pages linked from the README that other branches write at the same time as this one (the merge
# brings them; then this set is emptied).
WRITTEN_ELSEWHERE: set[str] = set()  # pages other work would add; every link now resolves
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)

# The option parser of every console script (setup.cfg's entry points must all be here).
PARSERS = {
    "segswap-gen": "segswap.pipeline.config:get_parser",
    "segswap-shards": "segswap.shards.cli:get_parser",
    "segswap-show": "segswap.pipeline.show:get_parser",
    "segswap-segments": "segswap.segments.cli:get_args_parser",
    "segswap-adain-train": "segswap.nets.adain_train:get_args_parser",
    "segswap-train": "segswap.train.cli:get_args_parser",
    "segswap-predict": "segswap.apps.predict:get_args_parser",
    "segswap-eval": "segswap.apps.eval_cli:build_parser",
    "segswap-discover": "segswap.apps.discover:build_parser",
    "segswap-plot": "segswap.apps.plot:get_parser",
}


def blocks(lang: str) -> list:
    found = []
    for path in DOCS:
        for k, m in enumerate(b for b in FENCE.finditer(path.read_text()) if b.group(1) == lang):
            found.append(pytest.param(m.group(2), id=f"{path.relative_to(ROOT)}#{lang}{k}"))
    return found


def parser_for(command: str):
    module, func = PARSERS[command].split(":")
    return getattr(importlib.import_module(module), func)()


def command_lines(script: str) -> list[list[str]]:
    """Shell words of each simple command: continuations joined, comments dropped, split at && ; |."""
    joined = re.sub(r"\\\n", " ", script)
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        cmd = []
        for w in words + [";"]:
            if w in ("&&", "||", ";", "|"):
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(w)
    return out


def segswap_invocation(words: list[str]) -> tuple[str, list[str]] | None:
    """(command, its arguments) when the words run a segswap command, directly or through a launcher."""
    if words[0] in PARSERS:
        return words[0], words[1:]
    if words[:3] == ["ray", "job", "submit"] and "--" in words:
        return segswap_invocation(words[words.index("--") + 1:])
    if words[0] == "torchrun" and "segswap.train.cli" in words:
        return "segswap-train", words[words.index("segswap.train.cli") + 1:]
    return None


def parse_or_fail(command: str, args: list[str], where: str) -> None:
    # "..." stands for a value after an option (`--shards ...`), else for "more options": dropped
    args = [("PLACEHOLDER" if k and args[k - 1].startswith("--") else None) if a == "..." else a
            for k, a in enumerate(args)]
    args = [a for a in args if a is not None]
    try:
        parser_for(command).parse_args(args)
    except SystemExit as e:
        pytest.fail(f"{where}: `{command} {' '.join(args)}` does not parse (exit {e.code})")


def test_every_console_script_has_a_parser_here():
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    scripts = {ln.split("=")[0].strip() for ln in cfg["options.entry_points"]["console_scripts"].splitlines()
               if ln.strip()}
    assert scripts == set(PARSERS)


def test_readme_stays_short_and_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    for path in DOCS:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text()):
            resolved = (path.parent / target).resolve()
            if str(resolved.relative_to(ROOT)) in WRITTEN_ELSEWHERE:
                continue
            assert resolved.exists(), f"{path.name}: link to missing {target}"
    for image in (ROOT / "docs" / "images").iterdir():
        assert any(image.name in p.read_text() for p in DOCS), f"docs/images/{image.name} is not shown anywhere"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A folder laid out as after the README's quick start: a (tiny) runs/demo/last.pth."""
    d = tmp_path_factory.mktemp("readme")
    write_tiny_checkpoint(d / "runs" / "demo" / "last.pth")
    return d


@pytest.mark.parametrize("code", blocks("python"))
def test_python_block_runs(code, scratch):
    if code.startswith(NOT_RUN):
        assert "needs" in code.splitlines()[0], "say what the block needs"
        pytest.skip(code.splitlines()[0])
    env = {**os.environ, "SEGSWAP_EXAMPLE_SIZE": "128", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=scratch, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("script", blocks("bash"))
def test_bash_block_command_lines_parse(script):
    for words in command_lines(script):
        found = segswap_invocation(words)
        if found:
            parse_or_fail(*found, where=" ".join(words)[:80])


def test_ray_job_submit_options_exist():
    used = set()
    for path in DOCS:
        for m in FENCE.finditer(path.read_text()):
            for words in command_lines(m.group(2)):
                if words[:3] == ["ray", "job", "submit"]:
                    used |= {w.split("=")[0] for w in words[3:words.index("--")] if w.startswith("--")}
    assert used, "the docs show a `ray job submit` recipe"
    ray_cli = Path(sys.executable).with_name("ray")
    ray_cmd = [str(ray_cli)] if ray_cli.exists() else [sys.executable, "-m", "ray.scripts.scripts"]
    help_text = subprocess.run([*ray_cmd, "job", "submit", "--help"], capture_output=True, text=True,
                               timeout=120, check=True).stdout
    assert all(opt in help_text for opt in used), sorted(o for o in used if o not in help_text)


# ----------------------------------------------------------------------------------- cluster recipes

def _shim(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(body)
    path.chmod(0o755)


@pytest.mark.parametrize("script", ["slurm_array.sh", "slurm_train.sh"])
def test_recipe_is_valid_bash(script):
    subprocess.run(["bash", "-n", str(ROOT / "docs" / script)], check=True, timeout=30)


def test_slurm_array_dry_run(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _shim(bin_dir, "segswap-gen", textwrap.dedent(f"""\
        #!{sys.executable}
        import sys
        from segswap.pipeline.config import get_parser, resolve, selected_shards
        cfg = resolve(vars(get_parser().parse_args(sys.argv[1:])))
        print("shards", *selected_shards(cfg))
        """))
    (tmp_path / "gen.yaml").write_text("num_shards: 10\npairs_per_shard: 4\nstyle: none\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_COUNT": "4",
           "SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "1", "CONFIG": "gen.yaml", "OUT": "data/x"}
    proc = subprocess.run(["bash", str(ROOT / "docs" / "slurm_array.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["shards", "8", "9"]  # the last of 4 slices of 10 shards


def test_slurm_train_dry_run(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _shim(bin_dir, "srun", '#!/usr/bin/env bash\nexec "$@"\n')
    _shim(bin_dir, "scontrol", "#!/usr/bin/env bash\nprintf 'gpu17\\ngpu18\\n'\n")
    _shim(bin_dir, "torchrun", textwrap.dedent(f"""\
        #!{sys.executable}
        import sys
        from torch.distributed.run import get_args_parser
        from segswap.train.cli import config_from_args, get_args_parser as train_parser
        run = get_args_parser().parse_args(sys.argv[1:])
        assert run.module and run.training_script == "segswap.train.cli", run
        cfg = config_from_args(train_parser().parse_args(run.training_script_args))
        print(run.nnodes, run.nproc_per_node, run.rdzv_endpoint, cfg["train"]["device"],
              cfg["data"]["workers"], cfg["train"]["max_steps"], cfg["train"]["out"])
        """))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu[17-18]",
           "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "64", "SLURM_JOB_ID": "7",
           "OUT": "runs/x"}
    proc = subprocess.run(["bash", str(ROOT / "docs" / "slurm_train.sh"), "--max-steps", "10"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["2", "4", "gpu17:29500", "cuda", "8", "10", "runs/x"]
