"""The `lmmrt` command: instant help (no torch import), one-line errors with an exit status and never a
traceback, damaged checkpoints, help texts, and the flags wired to the API (`lmmrt generate`'s own
option and input checks: tests/test_cli_generate.py)."""

import os
import shutil
import subprocess
import sys

import pytest
from cli_util import assert_one_error_line

import lmmrt
from lmmrt import cli
from lmmrt.cli import main

ENV = {**os.environ, "LMMRT_TRACEBACK": ""}


def run_lmmrt(*args, code=None):
    """`python -m lmmrt ARGS` (or the Python `code`) in a fresh interpreter: (status, stdout, stderr)."""
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "lmmrt", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)
    return r.returncode, r.stdout, r.stderr


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from lmmrt.demo import save_demo

    return save_demo(tmp_path_factory.mktemp("cli") / "demo")


@pytest.fixture
def broken(ckpt, tmp_path):
    """A copy of the demo checkpoint to damage."""
    dst = tmp_path / "broken"
    shutil.copytree(ckpt, dst)
    return dst


# -- instant help: `import lmmrt` and the parser import no torch ---------------------------------------

NO_TORCH = """
import runpy, sys
sys.argv = ["lmmrt", *{args!r}]
try:
    runpy.run_module("lmmrt", run_name="__main__")
except SystemExit as e:
    print("exit", e.code)
print("torch imported:", "torch" in sys.modules)
"""


@pytest.mark.parametrize("args", [["--help"], ["generate", "--help"], ["convert", "idefics", "--help"],
                                  ["generate", "m", "-p", "x", "--top-p", "2"], ["nosuchcommand"], [],
                                  ["--version"]])
def test_help_and_argument_errors_do_not_import_torch(args):
    status, out, err = run_lmmrt(code=NO_TORCH.format(args=args))
    assert status == 0, err
    assert "torch imported: False" in out, out
    assert ("exit 0" if {"--help", "--version"} & set(args) else "exit 2") in out


def test_bare_lmmrt_prints_the_help_with_status_2():
    """It said only "the following arguments are required: COMMAND". Status 2, as argparse gives a missing
    argument (nothing was done); the help on stdout, as --help prints it (`lmmrt | less` works)."""
    status, out, err = run_lmmrt()
    assert status == 2 and err == "", (status, err)
    assert out.startswith("usage: lmmrt") and "generate" in out and "serve" in out, out


def test_version_is_the_installed_version():
    from importlib.metadata import version

    status, out, err = run_lmmrt("--version")
    assert status == 0 and err == "", (status, err)
    assert out == f"lmmrt {version('lmmrt')}\n" and version("lmmrt") == lmmrt.__version__, out


def test_lazy_package_exposes_the_api():
    code = """
import sys
import lmmrt
assert "torch" not in sys.modules, "import lmmrt imported torch"
for name in lmmrt.__all__:
    assert name in dir(lmmrt), name
from lmmrt.info import info_text   # the submodule `info` must not shadow the function lmmrt.info
assert callable(lmmrt.info) and lmmrt.info_text is info_text
from lmmrt import generate
import lmmrt.api
assert generate is lmmrt.api.generate and lmmrt.load is lmmrt.api.load and lmmrt.logits is lmmrt.api.logits
assert lmmrt.load_video is lmmrt.runtime.video.load_video
try:
    lmmrt.no_such_name
except AttributeError as e:
    assert "no_such_name" in str(e)
print("ok")
"""
    status, out, err = run_lmmrt(code=code)
    assert status == 0 and out.strip() == "ok", err


# -- errors: one line, an exit status, no traceback ---------------------------------------------------

def test_keyboard_interrupt_exits_130_without_traceback():
    code = """
import os, signal
from lmmrt import cli
cli._cmd_info = lambda args: os.kill(os.getpid(), signal.SIGINT)   # a real Ctrl-C in the middle of a command
raise SystemExit(cli.main(["info"]))
"""
    status, _, err = run_lmmrt(code=code)
    assert status == 130 and "Traceback" not in err and "interrupted" in err, err


def test_closed_output_pipe_exits_141_without_traceback():
    p = subprocess.Popen([sys.executable, "-m", "lmmrt", "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=ENV)
    p.stdout.close()  # the reader goes away before lmmrt prints (it imports torch first)
    err = p.stderr.read()
    assert p.wait(timeout=120) == cli.EXIT_BROKEN_PIPE and not err, err


def test_unexpected_error_is_one_line_and_traceback_on_request(monkeypatch, capsys):
    def boom(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(cli, "_cmd_info", boom)
    monkeypatch.setenv("LMMRT_TRACEBACK", "")
    assert main(["info"]) == cli.EXIT_UNEXPECTED
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert "ZeroDivisionError: division by zero" in err and "LMMRT_TRACEBACK=1" in err
    monkeypatch.setenv("LMMRT_TRACEBACK", "1")
    with pytest.raises(ZeroDivisionError):
        main(["info"])


@pytest.mark.parametrize("make, what", [(lambda p: None, "does not exist"),
                                        (lambda p: p.write_text("x"), "is not a directory")])
def test_info_of_a_wrong_path_names_both_kinds_of_directory_it_reads(tmp_path, make, what, capsys):
    """It named only lmmrt's own format, although info also describes a transformers IDEFICS directory."""
    path = tmp_path / "nodir"
    make(path)
    assert main(["info", str(path)]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert f"{path} {what}" in err and "made by `lmmrt convert`" in err, err
    assert "or a transformers IDEFICS directory" in err, err


def _garbage_weights(d):
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")


def _json_list_config(d):
    (d / "config.json").write_text("[1, 2]")


def _null_config(d):
    (d / "config.json").write_text("null")


def _invalid_json_config(d):
    (d / "config.json").write_text("{not json")


def _garbage_tokenizer(d):
    (d / "tokenizer.json").write_text("garbage")


def _empty_tokenizer(d):
    (d / "tokenizer.json").write_text("")


def _directory_tokenizer(d):
    (d / "tokenizer.json").unlink()
    (d / "tokenizer.json").mkdir()


@pytest.mark.parametrize("damage, file", [(_garbage_weights, "model.safetensors"), (_json_list_config, "config.json"),
                                          (_null_config, "config.json"), (_invalid_json_config, "config.json"),
                                          (_garbage_tokenizer, "tokenizer.json"), (_empty_tokenizer, "tokenizer.json"),
                                          (_directory_tokenizer, "tokenizer.json")])
def test_damaged_checkpoint_is_one_error_line_naming_the_file(broken, damage, file, capsys, monkeypatch):
    monkeypatch.setenv("LMMRT_TRACEBACK", "")
    damage(broken)
    status = main(["generate", str(broken), "-p", "hi", "--device", "cpu", "--max-new-tokens", "1", "--quiet"])
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert status == cli.EXIT_ERROR and file in err, err


def test_parser_choices_agree_with_the_library():
    from lmmrt.api import _DTYPES
    from lmmrt.kernels.backend import BACKENDS

    assert set(cli.DTYPE_NAMES) == set(_DTYPES) and set(cli.BACKEND_NAMES) == set(BACKENDS)


@pytest.mark.parametrize("args", [["generate", "m", "-p", "x", "--dtype", "int8"], ["info", "--backend", "gpu"],
                                  ["convert", "idefics", "a", "b", "--dtype", "float64"]])
def test_dtype_and_backend_are_checked_by_the_parser(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


# -- help texts ----------------------------------------------------------------------------------------

def _subparser(*names):
    p = cli.build_parser()
    for name in names:
        p = next(a for a in p._actions if a.dest in ("cmd", "format")).choices[name]
    return p


def test_every_generate_option_is_described_with_its_default():
    p = _subparser("generate")
    text = p.format_help()
    for action in p._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{action.option_strings or action.dest} has no help"
        if action.default not in (None, False, []):
            assert "default" in cli.HelpFormatter("x")._get_help_string(action), action.option_strings
    for phrase in ("(default: 64)", "0 = greedy", "0 = no limit", "1 = no limit", "1 = off", "--no-cuda-graph"):
        assert phrase in " ".join(text.split()), phrase


def _every_parser():
    """(name, parser) of the top level and every subcommand, convert's formats included."""
    todo = [("lmmrt", cli.build_parser())]
    while todo:
        name, p = todo.pop()
        yield name, p
        for a in p._actions:
            if a.dest in ("cmd", "format"):
                todo += [(f"{name} {sub}", sp) for sub, sp in a.choices.items()]


def test_no_help_says_a_default_as_a_python_value():
    """--access-log said "(default: True)" where every other option says its default in words."""
    for name, p in _every_parser():
        text = " ".join(p.format_help().split())
        assert "(default: True)" not in text and "(default: False)" not in text, name


@pytest.mark.parametrize("command", ["info", "generate", "classify", "serve"])
def test_the_checkpoint_argument_has_one_name(command):
    """It was `model` in generate, classify and serve but CHECKPOINT in info."""
    p = _subparser(command)
    assert [a.metavar for a in p._actions if not a.option_strings and a.dest != "help"] == ["CHECKPOINT"]
    assert " ".join(p.format_usage().split()).endswith(("CHECKPOINT", "[CHECKPOINT]")), p.format_usage()


def test_serve_pixel_limits_state_their_defaults():
    from lmmrt.cli_serve import pixel_count

    p = _subparser("serve")
    text = " ".join(p.format_help().split())
    for option, words in (("max_image_pixels", "default 4096x4096"), ("max_request_pixels", "default 8192x8192")):
        default = next(a.default for a in p._actions if a.dest == option)
        assert words in text and pixel_count(words.split()[-1]) == default, option
    assert "above Pillow's own decompression-bomb limit, about 89 M pixels, raises that limit" in text


def test_convert_help_tells_about_tokenizer_json():
    text = " ".join(_subparser("convert", "idefics").format_help().split())
    assert "tokenizer.json is copied" in text and "token ids only" in text and "--force" in text


# -- flags wired to the API ----------------------------------------------------------------------------

class Called(Exception):
    pass


@pytest.fixture
def reraise(monkeypatch):
    monkeypatch.setenv("LMMRT_TRACEBACK", "1")  # main re-raises, so the test sees the exception


@pytest.mark.parametrize("flag, expected", [(None, "auto"), ("--cuda-graph", True), ("--no-cuda-graph", False)])
def test_cuda_graph_flag(monkeypatch, reraise, tmp_path, flag, expected):
    seen = {}

    def fake_load(path, **kw):
        seen.update(kw)
        raise Called

    monkeypatch.setattr(lmmrt, "load", fake_load)
    with pytest.raises(Called):
        main(["generate", str(tmp_path), "-p", "x", "--device", "cpu", *([flag] if flag else [])])
    assert seen["cuda_graph"] == expected


@pytest.mark.parametrize("fmt, module, function, extra", [
    ("idefics", "lmmrt.convert.idefics", "convert_idefics", ["src"]),
    ("openflamingo", "lmmrt.convert.openflamingo", "convert_openflamingo",
     ["--checkpoint", "c.pt", "--lm", "lm", "--vision", "v"]),
])
@pytest.mark.parametrize("force", [False, True])
def test_convert_force_flag(monkeypatch, reraise, fmt, module, function, extra, force):
    import importlib

    seen = {}

    def fake_convert(*args, **kw):
        seen.update(kw)
        raise Called

    monkeypatch.setattr(importlib.import_module(module), function, fake_convert)
    with pytest.raises(Called):
        main(["convert", fmt, *extra, "out", "--quiet", *(["--force"] if force else [])])
    assert seen["force"] is force


def test_demo_save_refuses_an_existing_dir_unless_force(ckpt, tmp_path, capsys):
    out = tmp_path / "demo"
    shutil.copytree(ckpt, out)
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert main(["demo", "--save", str(out)]) == cli.EXIT_ERROR
    assert_one_error_line(capsys.readouterr().err)
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    assert main(["demo", "--save", str(out), "--force"]) == 0
    assert (out / "model.safetensors").stat().st_mtime_ns != before


# -- what a new user following the README hit ---------------------------------------------------------

def test_parser_error_is_one_line_pointing_at_the_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "m", "-p", "x", "--top-p", "2"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert "see `lmmrt generate --help`" in err and "usage:" not in err, err


def test_demo_save_refuses_before_building_and_names_the_option(ckpt, tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    assert main(["demo", "--save", str(out)]) == cli.EXIT_ERROR
    captured = capsys.readouterr()
    assert "building" not in captured.out, captured.out
    assert "pass --force" in captured.err and "force=True" not in captured.err, captured.err


def test_every_command_has_a_description_and_the_families_are_listed():
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "cmd").choices
    for names in [(c,) for c in commands] + [("convert", f) for f in cli.CONVERTERS]:
        assert _subparser(*names).description, names
    described = parser.description.lower().replace("-", "")  # "BLIP-2" -> "blip2"
    for family in cli.CONVERTERS:
        assert family in described, family


def test_build_kernels_without_cupy_says_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda.libs.nvrtc", None)  # as if CuPy were not installed
    assert main(["build-kernels", "--arch", "90"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert "needs CuPy, which is not installed" in err and 'pip install "lmmrt[cupy]"' in err, err


def test_demo_prints_its_header_first_and_streams_the_same_request(capsys):
    assert main(["demo", "--max-new-tokens", "5", "--device", "cpu", "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    assert out.index("RANDOM weights") < out.index("building the demo model") < out.index("built in")
    assert "special tokens that print as nothing" in out
    assert "5 tokens" in out and "the same text as above" in out, out


@pytest.mark.parametrize("args, unknown, command", [
    (["serve", "ckpt", "--tp", "2"], "--tp 2", "lmmrt serve"),
    (["convert", "mllama", "a", "b", "--foo"], "--foo", "lmmrt convert mllama"),
    (["convert", "--foo", "mllama", "a", "b"], "--foo", "lmmrt convert"),
    (["--foo", "info"], "--foo", "lmmrt"),
])
def test_unknown_option_points_at_the_help_of_the_command_it_was_given_to(args, unknown, command, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert f"unrecognized arguments: {unknown} (see `{command} --help`)" in err, err
